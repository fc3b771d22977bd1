"""Next-item evaluation: the rank of each query's next item, over the catalogue or sampled items.

The protocols of sequential recommendation papers (SASRec, BERT4Rec): each query
(a user's history at a request) has one true next item. Its rank is the number of
other items scoring at least as high, ties counted against it:

- **full**: against every catalogue item, leaving out `exclude` (usually the
  items of the query's input history);
- **sampled**: against `negatives` only, e.g. 100 items the user never
  interacted with (`sample_negatives`), as SASRec's paper reports.

HR@k is the share of queries ranked below k; NDCG@k adds `1 / log2(rank + 2)` for
those; MRR@k adds `1 / (rank + 1)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.types import SimilarityFn

DISTRIBUTIONS = ("uniform", "popularity")
_CATALOGUE_BLOCK = 2**16  # catalogue rows scored at once: memory is [batch, block]


def evaluate_next_item(
    query_embeddings: Any,
    catalogue_embeddings: Any,
    targets: Any,
    *,
    exclude: Any = None,
    negatives: Any = None,
    ks: Sequence[int] = (10,),
    batch_size: int = 1024,
    similarity_fn: SimilarityFn | None = None,
) -> dict[str, float]:
    """HR, NDCG and MRR at each k of each query's next item.

    Without `negatives`, the target is ranked against the whole catalogue
    (less `exclude`); with them, against its row of `negatives` only. Memory is
    `[batch_size, 65536]` scores at a time, whatever the catalogue's size.

    Args:
        query_embeddings: `[queries, dim]`, or a function from a `[batch]` array
            of query positions (0, 1, ...) to their `[batch, dim]` embeddings
            (to embed histories on the fly instead of holding them all).
        catalogue_embeddings: `[catalogue_size, dim]`; row i embeds item i.
        targets: `[queries]` item index of each query's next item.
        exclude: full ranking only: `[queries, width]` item indices that do not
            compete with the target (the query's input items), -1 as padding;
            the target itself is always ranked, even when listed.
        negatives: `[queries, num]` item indices the target is ranked against
            instead of the catalogue (`sample_negatives`); a negative equal to
            the target is an error.
        ks: cut-offs, positive integers.
        batch_size: queries scored at once.
        similarity_fn: `[queries, dim] x [items, dim] -> [queries, items]`
            scores (a model's `compute_similarities`); the dot product by default.

    Returns:
        `{"hr@10": ..., "ndcg@10": ..., "mrr@10": ...}` for each k, the means
        over queries, as Python floats.

    Raises:
        ValueError: no queries; targets, exclusions or negatives that are not
            integer item indices in range (or of the wrong shape); a negative
            equal to its target; `exclude` together with `negatives`; NaN or
            infinite embeddings; embeddings of different widths; bad `ks` or
            `batch_size`.

    Examples:
        >>> import numpy as np
        >>> items = np.eye(4, dtype="float32")
        >>> queries = np.array([[0.0, 1.0, 0.5, 0.9]], "float32")  # item 3 ranks second
        >>> results = two_tower.evaluation.evaluate_next_item(queries, items, [3], ks=(1, 2))
        >>> results["hr@1"], results["hr@2"], round(results["ndcg@2"], 4), results["mrr@2"]
        (0.0, 1.0, 0.6309, 0.5)
        >>> two_tower.evaluation.evaluate_next_item(queries, items, [3], ks=(1,), exclude=[[1]])
        {'hr@1': 1.0, 'ndcg@1': 1.0, 'mrr@1': 1.0}
    """
    owner = "evaluate_next_item"
    ks = _arguments.cutoffs("ks", ks, owner=owner)
    batch_size = _arguments.integer("batch_size", batch_size, owner=owner)
    catalogue = np.asarray(ops.convert_to_numpy(catalogue_embeddings))
    if catalogue.ndim != 2 or catalogue.shape[0] == 0:
        raise ValueError(
            f"{owner}: `catalogue_embeddings` must be [catalogue_size, dim] with at least one "
            f"row. Received shape {catalogue.shape}"
        )
    _finite(catalogue, "catalogue_embeddings", owner)
    size = catalogue.shape[0]
    targets = _items(targets, "targets", size, owner, ndim=1)
    if targets.size == 0:
        raise ValueError(f"{owner}: `targets` is empty: expected at least one query.")
    if exclude is not None and negatives is not None:
        raise ValueError(
            f"{owner}: `exclude` applies to the full ranking, and `negatives` replace it with "
            "a sampled one: pass one of them. (Sample negatives among items the user never "
            "interacted with instead: `sample_negatives`.)"
        )
    excluded = None
    if exclude is not None:
        excluded = _unique_rows(_items(exclude, "exclude", size, owner, rows=len(targets)))
    sampled = None
    if negatives is not None:
        sampled = _items(negatives, "negatives", size, owner, rows=len(targets), padding=False)
        same = np.flatnonzero((sampled == targets[:, None]).any(axis=1))
        if same.size:
            raise ValueError(
                f"{owner}: `negatives` must not hold the query's own target. Query "
                f"{int(same[0])} (target {int(targets[same[0]])}) has it among "
                f"{sampled[same[0]].tolist()[:10]}"
            )
    embed = _embedder(query_embeddings, len(targets), owner)
    score = similarity_fn or _dot
    ranks = np.empty(len(targets), np.int64)
    for start in range(0, len(targets), batch_size):
        rows = np.arange(start, min(start + batch_size, len(targets)))
        queries = np.asarray(ops.convert_to_numpy(embed(rows)))
        if queries.ndim != 2 or queries.shape[0] != len(rows):
            raise ValueError(
                f"{owner}: `query_embeddings` must give [batch, dim] for a batch of {len(rows)} "
                f"queries. Received shape {queries.shape}"
            )
        if similarity_fn is None and queries.shape[1] != catalogue.shape[1]:
            raise ValueError(
                f"{owner}: query embeddings have {queries.shape[1]} dimensions and "
                f"`catalogue_embeddings` {catalogue.shape[1]}: the dot product needs the same."
            )
        _finite(queries, "query_embeddings", owner)
        if sampled is not None:
            ranks[rows] = _sampled_ranks(score, queries, catalogue, targets[rows], sampled[rows])
        else:
            ranks[rows] = _full_ranks(
                score,
                queries,
                catalogue,
                targets[rows],
                None if excluded is None else excluded[rows],
            )
    results: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        results[f"hr@{k}"] = float(hit.mean())
        results[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        results[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return results


def sample_negatives(
    seen: Any,
    num_items: int,
    num: int = 100,
    *,
    distribution: str = "uniform",
    item_counts: Any = None,
    seed: int = 0,
) -> np.ndarray:
    """`num` distinct items per query that its user never interacted with.

    Drawn without replacement, uniformly or in proportion to `item_counts`
    (popularity), with a NumPy generator seeded by `seed`: the same arguments
    give the same negatives on every backend and machine.

    Args:
        seen: `[queries, width]` item indices each query's user interacted with
            (all of them, target included), -1 as padding; e.g.
            `log.history(users, np.full(len(users), np.inf), width=None)`.
        num_items: items are `0 .. num_items - 1`.
        num: negatives per query.
        distribution: `"uniform"` or `"popularity"`.
        item_counts: `[num_items]` non-negative counts (e.g. training
            interactions per item), for `"popularity"`.
        seed: the generator's seed.

    Returns:
        `[queries, num]` int64 item indices.

    Raises:
        ValueError: a query whose user saw so many items that fewer than `num`
            remain (or fewer than `num` with a count above 0); bad arguments.

    Examples:
        >>> negatives = two_tower.evaluation.sample_negatives([[0, 1, -1]], 5, num=3)
        >>> sorted(negatives[0].tolist())
        [2, 3, 4]
    """
    owner = "sample_negatives"
    num_items = _arguments.integer("num_items", num_items, owner=owner)
    num = _arguments.integer("num", num, owner=owner)
    distribution = _arguments.choice("distribution", distribution, DISTRIBUTIONS, owner=owner)
    seed = _arguments.integer("seed", seed, minimum=0, owner=owner)
    seen_items = _items(seen, "seen", num_items, owner)
    weights = None
    if distribution == "popularity":
        if item_counts is None:
            raise ValueError(
                f"{owner}(distribution='popularity') needs `item_counts`, a count per item."
            )
        weights = np.asarray(item_counts, dtype="float64")
        if weights.shape != (num_items,) or not np.all(np.isfinite(weights) & (weights >= 0)):
            raise ValueError(
                f"{owner}: `item_counts` must be [num_items] (={num_items}) finite counts >= 0. "
                f"Received shape {weights.shape}"
            )
    elif item_counts is not None:
        raise ValueError(f"{owner}: `item_counts` applies to distribution='popularity' only.")
    queries = len(seen_items)
    seen_sorted = np.sort(np.where(seen_items < 0, num_items, seen_items), axis=1)
    allowed = (weights > 0) if weights is not None else np.ones(num_items, bool)
    distinct_seen = np.array(
        [np.count_nonzero(allowed[np.unique(row[row < num_items])]) for row in seen_sorted]
    )
    short = np.flatnonzero(int(allowed.sum()) - distinct_seen < num)
    if short.size:
        raise ValueError(
            f"{owner}: query {int(short[0])} has only "
            f"{int(allowed.sum()) - int(distinct_seen[short[0]])} items left to sample from "
            f"(the user saw {int(distinct_seen[short[0]])} of {int(allowed.sum())}); "
            f"num={num} asked for."
        )
    probabilities = None if weights is None else weights / weights.sum()
    generator = np.random.default_rng(seed)
    out = np.full((queries, num), -1, np.int64)
    filled = np.zeros(queries, np.int64)
    pending = np.arange(queries)
    while pending.size:
        # Draw a few more than missing, drop seen and repeated items, keep the first.
        need = num - filled[pending]
        draws = generator.choice(num_items, size=(len(pending), int(need.max()) * 2 + 8),
                                 p=probabilities)  # fmt: skip
        rows = seen_sorted[pending]
        slot = np.minimum(
            np.array([np.searchsorted(r, d) for r, d in zip(rows, draws, strict=True)]),
            rows.shape[1] - 1,
        )
        fresh = np.take_along_axis(rows, slot, axis=1) != draws
        for index, row in enumerate(pending):
            candidates = draws[index][fresh[index]]
            have = out[row, : filled[row]]
            candidates = candidates[~np.isin(candidates, have)]
            _, first = np.unique(candidates, return_index=True)
            candidates = candidates[np.sort(first)][: num - filled[row]]
            out[row, filled[row] : filled[row] + len(candidates)] = candidates
            filled[row] += len(candidates)
        pending = pending[filled[pending] < num]
    return out


# ------------------------------------------------------------------ internals
def _dot(queries: Any, items: Any) -> Any:
    return ops.matmul(queries, ops.transpose(items))


def _full_ranks(
    score: SimilarityFn,
    queries: np.ndarray,
    catalogue: np.ndarray,
    targets: np.ndarray,
    excluded: np.ndarray | None,
) -> np.ndarray:
    """Items (other than the target, not excluded) scoring at least the target's score.

    The target's and the excluded items' columns are masked out of each block's
    scores rather than subtracted afterwards, so that a score computed twice
    (in a block, and alone) cannot differ in its last bit and miscount.
    """
    query_tensor = ops.convert_to_tensor(queries)
    target_scores = _paired_scores(score, query_tensor, catalogue, targets[:, None])
    skipped = (
        targets[:, None]
        if excluded is None
        else np.concatenate([targets[:, None], excluded], axis=1)
    )
    ranks = np.zeros(len(targets), np.int64)
    for start in range(0, catalogue.shape[0], _CATALOGUE_BLOCK):
        stop = min(start + _CATALOGUE_BLOCK, catalogue.shape[0])
        block = ops.convert_to_tensor(catalogue[start:stop])
        scores = np.array(ops.convert_to_numpy(score(query_tensor, block)), np.float32)
        rows, columns = np.nonzero((skipped >= start) & (skipped < stop))
        scores[rows, skipped[rows, columns] - start] = -np.inf
        ranks += np.count_nonzero(scores >= target_scores, axis=1)
    return ranks


def _sampled_ranks(
    score: SimilarityFn,
    queries: np.ndarray,
    catalogue: np.ndarray,
    targets: np.ndarray,
    negatives: np.ndarray,
) -> np.ndarray:
    query_tensor = ops.convert_to_tensor(queries)
    scores = _paired_scores(
        score, query_tensor, catalogue, np.concatenate([targets[:, None], negatives], axis=1)
    )
    return np.count_nonzero(scores[:, 1:] >= scores[:, :1], axis=1)


def _paired_scores(
    score: SimilarityFn, queries: Any, catalogue: np.ndarray, items: np.ndarray
) -> np.ndarray:
    """`[batch, columns]` score of query i with item `items[i, j]`, `score`'s way.

    The dot product is one einsum. Another `score` takes `[queries, dim] x
    [items, dim]`; each query meets its own items, so blocks of 64 queries are
    scored against their rows' items and the diagonal blocks kept (memory
    `[64, 64 * columns]`).
    """
    batch, columns = items.shape
    if score is _dot:
        rows = ops.convert_to_tensor(catalogue[items])
        return np.asarray(ops.convert_to_numpy(ops.einsum("bd,bcd->bc", queries, rows)))
    out = np.empty((batch, columns), np.float32)
    block = 64
    for start in range(0, batch, block):
        stop = min(start + block, batch)
        rows = ops.convert_to_tensor(catalogue[items[start:stop].reshape(-1)])
        scores = ops.convert_to_numpy(score(queries[start:stop], rows))
        scores = scores.reshape(stop - start, stop - start, columns)
        out[start:stop] = scores[np.arange(stop - start), np.arange(stop - start)]
    return out


def _embedder(query_embeddings: Any, count: int, owner: str) -> Callable[[np.ndarray], Any]:
    if callable(query_embeddings):
        return query_embeddings
    queries = np.asarray(ops.convert_to_numpy(query_embeddings))
    if queries.ndim != 2 or queries.shape[0] != count:
        raise ValueError(
            f"{owner}: `query_embeddings` must be [queries, dim] with one row per target "
            f"({count}). Received shape {queries.shape}"
        )
    return queries.__getitem__


def _items(
    values: Any,
    name: str,
    size: int,
    owner: str,
    *,
    ndim: int = 2,
    rows: int | None = None,
    padding: bool = True,
) -> np.ndarray:
    """`values` as int64 item indices in `[0, size)` (or -1 with `padding`), checked."""
    array = np.asarray(values)
    if array.size == 0:  # (`np.asarray([])` is float64)
        array = array.astype(np.int64)
    if (
        array.dtype.kind not in "iu"
        or array.ndim != ndim
        or (rows is not None and array.shape[0] != rows)
    ):
        expected = "[queries]" if ndim == 1 else "[queries, width]"
        raise ValueError(
            f"{owner}: `{name}` must be {expected} integer item indices"
            + (f" with {rows} rows (one per target)" if rows is not None else "")
            + f". Received shape {array.shape}, dtype {array.dtype}"
        )
    array = array.astype(np.int64, copy=False)
    low = -1 if padding and ndim == 2 else 0
    if array.size and (int(array.min()) < low or int(array.max()) >= size):
        allowed = f"[0, {size})" + (" or -1 padding" if low < 0 else "")
        raise ValueError(
            f"{owner}: `{name}` must hold item indices in {allowed}. Received values from "
            f"{int(array.min())} to {int(array.max())}"
        )
    return array


def _unique_rows(array: np.ndarray) -> np.ndarray:
    """Each row's repeated items as -1, so that an item is left out once."""
    order = np.argsort(array, axis=1, kind="stable")
    ordered = np.take_along_axis(array, order, axis=1)
    repeated = np.zeros_like(ordered, dtype=bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    result = array.copy()
    np.put_along_axis(result, order, np.where(repeated, -1, ordered), axis=1)
    return result


def _finite(values: np.ndarray, name: str, owner: str) -> None:
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise ValueError(
            f"{owner}: `{name}` holds NaN or infinite values (row {row}): every score with "
            "them would be meaningless. Check the model's training (a diverged loss)."
        )
