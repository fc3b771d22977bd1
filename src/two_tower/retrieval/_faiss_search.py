"""The query side of `FaissIndex`: query checks, the inner-product check, exclusions.

faiss scores only the inner product and cannot leave given candidates out of
one query's results, so a `similarity_fn` is checked to be the inner product,
and exclusions are applied to a longer faiss result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from keras import ops

from two_tower.types import SimilarityFn


def checked_queries(queries: Any, dim: int, name: str = "calibration_queries") -> np.ndarray:
    """`queries` as a float32 `[queries, dim]` array of finite numbers, or raises.

    `calibration_queries` needs at least one row; `query_embeddings` may have none.
    """
    if not isinstance(queries, np.ndarray):  # e.g. a torch tensor with grad
        queries = ops.convert_to_numpy(queries)
    array = np.asarray(queries)
    if array.dtype.kind not in "iuf":
        raise ValueError(
            f"`{name}` must be a numeric [queries, {dim}] array. Received dtype {array.dtype}"
        )
    if (
        array.ndim != 2
        or array.shape[1] != dim
        or (name == "calibration_queries" and not len(array))
    ):
        least = " with at least one query" if name == "calibration_queries" else ""
        raise ValueError(
            f"`{name}` must have shape [queries, {dim}]{least}, the dim of the indexed "
            f"candidates. Received shape: {array.shape}"
        )
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, refused below
        array = np.ascontiguousarray(array, dtype="float32")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contain NaN or infinite values (or overflow float32).")
    return array


def check_inner_product(similarity_fn: SimilarityFn, dim: int) -> None:
    """Raises unless `similarity_fn` scores a small random probe as the inner product."""
    probe = np.random.default_rng(0).standard_normal((5, dim)).astype("float32")
    queries, candidates = probe[:2], probe[2:]
    scores = np.asarray(ops.convert_to_numpy(similarity_fn(queries, candidates)), "float64")
    expected = queries.astype("float64") @ candidates.T.astype("float64")
    # Loose enough for TF32 matmuls on GPUs; a temperature or a metric is far off.
    if scores.shape != expected.shape or not np.allclose(
        scores, expected, rtol=1e-2, atol=1e-2 * math.sqrt(dim)
    ):
        raise ValueError(
            "FaissIndex scores candidates by their inner product with the query, but "
            "`similarity_fn` scores otherwise (on a random probe it gave "
            f"{np.round(scores, 3).tolist()} for inner products "
            f"{np.round(expected, 3).tolist()}). Use a BruteForceIndex for a model with its "
            "own `compute_similarities`, or search with similarity_fn=None."
        )


def without_excluded(
    scores: np.ndarray,
    positions: np.ndarray,
    excluded: tuple[np.ndarray, np.ndarray],
    k: int,
    num_candidates: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` results of each row that `excluded` (rows, positions) does not name."""
    rows = np.arange(len(positions), dtype="int64")[:, None]
    found = np.isin(rows * num_candidates + positions, excluded[0] * num_candidates + excluded[1])
    drop = found & (positions >= 0)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept results first, in order
    return np.take_along_axis(scores, keep, axis=1), np.take_along_axis(positions, keep, axis=1)
