"""Evaluate retrieval over the full catalogue: results tables and recall@k plots.

`evaluate_retrieval` runs `FactorizedTopK` over a test set, with and without
leaving out each query's training items; `format_table` prints the results;
`plot_recall` saves a recall@k chart as PNG (needs matplotlib:
`pip install matplotlib`, the `plot` extra).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.metrics.factorized_top_k import FactorizedTopK, check_id_range
from two_tower.types import SimilarityFn

KS = (1, 5, 10, 50, 100)
STATS = ("accuracy", "recall", "ndcg")


def evaluate_retrieval(
    query_embeddings: Any,
    catalogue_embeddings: Any,
    test_query_ids: Any,
    test_candidate_ids: Any,
    *,
    exclude_query_ids: Any = None,
    exclude_candidate_ids: Any = None,
    ks: Sequence[int] = KS,
    batch_size: int = 4096,
    similarity_fn: SimilarityFn | None = None,
    num_queries: int | None = None,
) -> dict[str, dict[str, float]]:
    """Top-k accuracy, recall and NDCG of test pairs over the whole catalogue.

    Args:
        query_embeddings: `[num_queries, dim]`, row q embeds query id q; or a
            function that takes a `[batch]` array of query ids and returns
            their `[batch, dim]` embeddings, called once per batch of test
            pairs (then `num_queries` is required). The function form keeps
            memory at one batch: embed queries on the fly (a query tower over
            request-time histories, a baseline's `embed_histories`) instead
            of holding every query's embedding.
        catalogue_embeddings: `[catalogue_size, dim]`, row c embeds candidate c.
        test_query_ids: `[pairs]` query id of each test pair.
        test_candidate_ids: `[pairs]` candidate id (catalogue row) of each pair.
        exclude_query_ids: with `exclude_candidate_ids`, pairs to leave out of
            the ranking (usually the training pairs).
        exclude_candidate_ids: see `exclude_query_ids`.
        ks: cut-offs. A k at or above the catalogue's size counts every pair
            as a hit (the top k then holds the whole catalogue).
        batch_size: test pairs scored at once.
        similarity_fn: scores `[queries, candidates]`; the dot product by default
            (pass `model.compute_similarities` for a subclass that changes it).
        num_queries: the number of query ids, with a function
            `query_embeddings` (an array gives it by its rows).

    Returns:
        `{"all": {"accuracy_at_10": ..., ...}}`, plus `"unseen"` with the same
        keys when exclusions are given.

    Raises:
        ValueError: empty or non-integer test ids, NaN or infinite embeddings
            (the row is named), query and catalogue embeddings of different
            dimensions, test id arrays of different lengths, query ids outside
            `[0, num_queries)`, a function `query_embeddings` without a positive
            integer `num_queries` or returning the wrong number of rows, or bad
            `ks` or exclusions (as `FactorizedTopK`).

    Examples:
        >>> import numpy as np
        >>> results = two_tower.evaluation.evaluate_retrieval(
        ...     np.eye(2, dtype="float32"), np.eye(2, dtype="float32"),
        ...     np.array([0, 1]), np.array([0, 0]), ks=(1,))
        >>> results["all"]["accuracy_at_1"]
        0.5
    """
    if callable(query_embeddings):
        if (
            isinstance(num_queries, (bool, np.bool_))
            or not isinstance(num_queries, (int, np.integer))
            or num_queries < 1
        ):
            raise ValueError(
                "`num_queries` must be a positive integer when `query_embeddings` is a "
                f"function. Received: num_queries={num_queries!r}"
            )
        num_queries = int(num_queries)
        embed = query_embeddings
    else:
        queries = np.asarray(ops.convert_to_numpy(query_embeddings))
        if num_queries is not None and num_queries != queries.shape[0]:
            raise ValueError(
                f"`num_queries`={num_queries!r} differs from the {queries.shape[0]} rows of "
                "`query_embeddings`. Leave it None with an array."
            )
        num_queries = queries.shape[0]
        embed = queries.__getitem__
    batch_size = _arguments.integer("batch_size", batch_size, owner="evaluate_retrieval")
    catalogue_array = np.asarray(ops.convert_to_numpy(catalogue_embeddings))
    if catalogue_array.ndim != 2 or catalogue_array.shape[0] == 0:
        raise ValueError(
            "`catalogue_embeddings` must be [catalogue_size, dim] with at least one row. "
            f"Received shape {catalogue_array.shape}"
        )
    _check_finite(catalogue_array, "catalogue_embeddings")
    catalogue = ops.convert_to_tensor(catalogue_array)
    test_queries = _ids(test_query_ids, "test_query_ids")
    test_candidates = _ids(test_candidate_ids, "test_candidate_ids")
    if test_queries.shape != test_candidates.shape:
        raise ValueError(
            "`test_query_ids` and `test_candidate_ids` must have the same length. "
            f"Received {test_queries.shape[0]} and {test_candidates.shape[0]}"
        )
    if test_queries.size == 0:
        raise ValueError(
            "`test_query_ids` and `test_candidate_ids` are empty: expected at least one "
            "test pair (an empty test set has no accuracy)."
        )
    catalogue_size = int(catalogue.shape[0])
    check_id_range(test_queries, num_queries, "test_query_ids")
    check_id_range(test_candidates, catalogue_size, "test_candidate_ids")
    metrics = {
        "all": FactorizedTopK(ks, num_queries, catalogue_size, name="all"),
    }
    if exclude_query_ids is not None or exclude_candidate_ids is not None:
        metrics["unseen"] = FactorizedTopK(
            ks,
            num_queries,
            catalogue_size,
            exclude_query_ids=exclude_query_ids,
            exclude_candidate_ids=exclude_candidate_ids,
            name="unseen",
        )
    for start in range(0, test_queries.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        batch = np.asarray(ops.convert_to_numpy(embed(test_queries[rows])))
        if batch.ndim != 2 or batch.shape[0] != len(test_queries[rows]):
            raise ValueError(
                f"`query_embeddings` must return [batch, dim] for a batch of "
                f"{len(test_queries[rows])} query ids. Received shape {batch.shape}"
            )
        if similarity_fn is None and batch.shape[1] != catalogue_array.shape[1]:
            raise ValueError(
                f"Query embeddings have {batch.shape[1]} dimensions and "
                f"`catalogue_embeddings` {catalogue_array.shape[1]}: the dot product needs "
                "the same dimension on both sides."
            )
        _check_finite(batch, "query_embeddings", test_queries[rows])
        for metric in metrics.values():
            metric.update_state(
                batch,
                catalogue,
                test_candidates[rows],
                query_ids=test_queries[rows],
                similarity_fn=similarity_fn,
            )
    return {
        name: {
            key[len(name) + 1 :]: float(ops.convert_to_numpy(value))
            for key, value in metric.result().items()
        }
        for name, metric in metrics.items()
    }


def _ids(values: Any, name: str) -> np.ndarray:
    """`values` as a flat int64 array; integer-valued floats accepted, others refused."""
    array = np.asarray(values).reshape(-1)
    if array.dtype.kind in "iu":
        return array.astype("int64", copy=False)
    if array.size == 0 and array.dtype.kind == "f":
        return array.astype("int64")
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype("int64")
    example = ""
    if array.dtype.kind == "f":
        bad = array[~np.isfinite(array) | (array != np.round(array))]
        example = f", e.g. {bad[0].item()!r}"
    raise ValueError(
        f"`{name}` must hold integer ids (catalogue rows / query ids). Received dtype "
        f"{array.dtype}{example}"
    )


_FINITE_BLOCK = 2**16  # rows checked at once: a catalogue's check needs no mask of its size


def _check_finite(values: np.ndarray, name: str, ids: np.ndarray | None = None) -> None:
    """Raises ValueError naming the first non-finite row (by its id when `ids` is given)."""
    if values.dtype.kind not in "fc":
        return
    bad = []
    for start in range(0, len(values), _FINITE_BLOCK):
        part = values[start : start + _FINITE_BLOCK]
        finite = np.isfinite(part).reshape(len(part), -1).all(axis=1)
        if not finite.all():
            bad.append(start + np.flatnonzero(~finite))
    if bad:
        rows = np.concatenate(bad)
        where = f"query id {ids[rows[0]]}" if ids is not None else f"row {rows[0]}"
        raise ValueError(
            f"`{name}` holds NaN or infinite values (in {rows.size} row(s) here, e.g. "
            f"{where}): every score with them would be meaningless. Check the model's "
            "training (a diverged loss) or the embeddings passed."
        )


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    ks: Sequence[int] = (10, 50, 100),
    stat: str = "accuracy",
) -> str:
    """A Markdown table: one row per entry of `rows`, one column per k.

    Args:
        rows: row label → results (a dict like `evaluate_retrieval(...)["all"]`).
        ks: the columns.
        stat: `"accuracy"`, `"recall"` or `"ndcg"`.

    Returns:
        The table as one string; a k missing from a row's results prints `n/a`.

    Raises:
        ValueError: an unknown `stat`, `rows` that is empty or not a dict of
            dicts, or `ks` that are not positive integers.

    Examples:
        >>> print(two_tower.evaluation.format_table({"m": {"accuracy_at_10": 0.5}}, ks=(10,)))
        | model | top-10 |
        |---|---|
        | m | 0.500 |
    """
    if stat not in STATS:
        raise ValueError(f"`stat` must be one of {STATS}. Received: {stat!r}")
    _check_rows(rows, "format_table")
    ks = _arguments.cutoffs("ks", ks, owner="format_table")
    label = {"accuracy": "top-{}", "recall": "recall@{}", "ndcg": "ndcg@{}"}[stat]
    lines = [
        "| model | " + " | ".join(label.format(k) for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for name, results in rows.items():
        cells = []
        for k in ks:
            value = results.get(f"{stat}_at_{k}")
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_recall(
    rows: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    ks: Sequence[int] = KS,
    title: str = "Recall@k over the full catalogue",
) -> Path:
    """Saves a recall@k chart (one line per row) as PNG and returns its path.

    Args:
        rows: row label → results holding `recall_at_{k}` keys (a dict like
            `evaluate_retrieval(...)["all"]`).
        path: where the PNG goes; its suffix must be `.png`. Written to a
            temporary file beside it and renamed in, so an existing chart is
            replaced whole or not at all.
        ks: the k to plot, where a row has them.
        title: the chart's title.

    Raises:
        ImportError: matplotlib is not installed (`pip install matplotlib`).
        ValueError: `rows` empty or not a dict of dicts, a row without any
            `recall_at_{k}` for `ks`, or a `path` whose suffix is not `.png`.
        FileNotFoundError: the folder of `path` does not exist.
    """
    _check_rows(rows, "plot_recall")
    ks = _arguments.cutoffs("ks", ks, owner="plot_recall")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(
            f"plot_recall writes PNG: `path` must end in .png. Received: {str(path)!r}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"plot_recall: the folder {str(path.parent)!r} of `path` does not exist; create it "
            "first."
        )
    for name, results in rows.items():
        if not any(f"recall_at_{k}" in results for k in ks):
            raise ValueError(
                f"plot_recall: row {name!r} has no `recall_at_k` for ks={list(ks)}. Received "
                f"keys {sorted(results)[:6]}; pass results of `evaluate_retrieval` (recall needs "
                "query ids)."
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plot_recall needs matplotlib: pip install matplotlib (the two_tower `plot` extra)"
        ) from error
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, results in rows.items():
        points = [(k, results[f"recall_at_{k}"]) for k in ks if f"recall_at_{k}" in results]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=name)
    axes.set_xscale("log")
    axes.set_xticks(list(ks), [str(k) for k in ks])
    axes.set_xlabel("k")
    axes.set_ylabel("recall@k (mean over users)")
    axes.set_ylim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return path


def _check_rows(rows: Any, owner: str) -> None:
    if not isinstance(rows, Mapping) or not all(
        isinstance(results, Mapping) for results in rows.values()
    ):
        raise ValueError(
            f"{owner}: `rows` must be a dict of row label -> results dict (e.g. "
            f"{{'model': evaluate_retrieval(...)['all']}}). Received {type(rows).__name__}: "
            f"{rows!r:.80}"
        )
    if not rows:
        raise ValueError(f"{owner}: `rows` is empty: expected at least one row of results.")


def recall_against_exact(found_ids: Any, exact_ids: Any) -> float:
    """Mean share of the exact top k that an approximate search also returned.

    Args:
        found_ids: `[queries, k]` ids from an approximate index.
        exact_ids: `[queries, k]` ids from the exact index, for the same queries.

    Returns:
        The mean over queries of `|found ∩ exact| / k`, in [0, 1].

    Raises:
        ValueError: shapes that differ, or are not `[queries, k]` with k >= 1.

    Examples:
        >>> two_tower.evaluation.recall_against_exact([[1, 2, 3]], [[3, 2, 9]])
        0.6666666666666666
    """
    found, exact = np.asarray(found_ids), np.asarray(exact_ids)
    if found.shape != exact.shape or found.ndim != 2 or found.shape[1] == 0:
        raise ValueError(
            "`found_ids` and `exact_ids` must both be [queries, k] with k >= 1. "
            f"Received shapes {found.shape} and {exact.shape}"
        )
    hits = [len(np.intersect1d(f, e)) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits) / exact.shape[1])


from two_tower.evaluation.next_item import evaluate_next_item as evaluate_next_item  # noqa: E402
from two_tower.evaluation.next_item import sample_negatives as sample_negatives  # noqa: E402
from two_tower.evaluation.retrieval_validation import (  # noqa: E402
    RetrievalValidation as RetrievalValidation,
)
