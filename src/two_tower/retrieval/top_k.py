"""Exact top-k kernels in `keras.ops`, ties lower column first on every backend.

`stable_top_k` and its neighbours confine each backend quirk (torch `topk`
ties, XLA's `-0.0`) to one small function whose docstring states the exact
difference. `BruteForceIndex`'s compiled step is `_top_k_step.TopKStep`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from keras import ops

from two_tower.backends import backend_module
from two_tower.types import Tensor

BLOCK = 32  # block width of `_blocked_top_k`


def dot_similarities(query_embeddings: Tensor, candidate_embeddings: Tensor) -> Tensor:
    """`[queries, candidates]` dot products: the default `similarity_fn`."""
    return ops.matmul(query_embeddings, ops.transpose(candidate_embeddings))


def stable_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of each row, best first, equal scores in column order.

    `keras.ops.top_k` puts the lower index first on JAX and TensorFlow (both
    document it), but `torch.topk` promises nothing about ties: neither which
    tied columns make the cut nor their order. On torch we therefore pick the
    cut explicitly: every column above the k-th value, then the leftmost tied
    columns until there are k, and order them with a stable sort.

    XLA's `top_k` (JAX) orders `-0.0` below `0.0`; everywhere else they are
    equal. When a zero reaches the top k, the rows are redone with `-0.0`
    folded into `0.0` (`keras.ops.cond`, so only then). If no zero is among the
    top k values, the sign of zeros cannot change the result.

    Args:
        scores: `[rows, columns]` float tensor with no NaN.
        k: `1 <= k <= columns`.

    Returns:
        `(values, columns)`, both `[rows, k]`; columns are int32.
    """
    return _with_zeros_folded(_top_k, scores, k)


def _blocked_top_k(scores: Tensor, k: int, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """`stable_top_k` for long rows: top k of the block maxima first.

    The columns are cut into blocks of `block`; the true top k lie in at most k
    blocks, all among the k blocks with the highest maxima (ties: lower block
    first, whose columns are all lower). So one pass for the maxima, a top k
    over `columns / block` of them, and a top k over the `k × block` gathered
    scores give the exact result, ties included, much faster than a top k over
    every column.

    Args:
        scores: `[rows, columns]`, `columns` a multiple of `block`; no NaN.
        k: `1 <= k <= columns`.
        block: block width.
    """
    return _with_zeros_folded(lambda x, kk: _blocked(x, kk, block), scores, k)


def _with_zeros_folded(
    top_k: Callable[[Tensor, int], tuple[Tensor, Tensor]], scores: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    values, columns = top_k(scores, k)
    if not backend_module().top_k_orders_signed_zeros:
        return values, columns  # torch compares -0.0 and 0.0 as equal

    def folded() -> tuple[Tensor, Tensor]:
        return top_k(ops.where(ops.equal(scores, 0.0), ops.zeros_like(scores), scores), k)

    return ops.cond(ops.any(ops.equal(values, 0.0)), folded, lambda: (values, columns))


def _top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Ties to the lower column; zeros compared as the backend does."""
    if not backend_module().top_k_ties_to_lower_column:
        return _explicit_top_k(scores, k)
    values, columns = ops.top_k(scores, k)
    return values, ops.cast(columns, "int32")


def _blocked(scores: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
    rows, width = ops.shape(scores)[0], int(scores.shape[1])
    num_blocks = width // block
    maxima = ops.max(ops.reshape(scores, (rows, num_blocks, block)), axis=2)
    _, best_blocks = _top_k(maxima, min(k, num_blocks))
    # In column order, so that ties in the final top k go to the lower column.
    best_blocks = ops.sort(best_blocks, axis=1)
    offsets = ops.arange(block, dtype="int32")
    columns = ops.expand_dims(best_blocks * block, 2) + ops.reshape(offsets, (1, 1, block))
    columns = ops.reshape(columns, (rows, -1))
    values, picked = _top_k(ops.take_along_axis(scores, columns, axis=1), k)
    return values, ops.take_along_axis(columns, picked, axis=1)


def _explicit_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`stable_top_k` for torch, whose `topk` leaves ties unspecified.

    When every column tied with a row's k-th score made its cut (no tie
    straddles the cut: almost always, on real-valued scores), `topk`'s set is
    the only right one and just needs ordering. Otherwise the leftmost tied
    columns are chosen explicitly, which takes 5x as long (`_chosen_explicitly`).
    Torch runs eagerly, so the check is a plain Python branch.
    """
    values, columns = ops.top_k(scores, k)
    threshold = values[:, k - 1 : k]
    tied = ops.sum(ops.cast(ops.equal(scores, threshold), "int32"), axis=1)
    taken = ops.sum(ops.cast(ops.equal(values, threshold), "int32"), axis=1)
    if not bool(ops.convert_to_numpy(ops.all(ops.equal(tied, taken)))):
        return _chosen_explicitly(scores, k, threshold)
    by_column = ops.argsort(columns, axis=1)
    columns = ops.take_along_axis(columns, by_column, axis=1)
    return _by_score(ops.take_along_axis(values, by_column, axis=1), columns)


def _chosen_explicitly(scores: Tensor, k: int, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """`_explicit_top_k` when ties straddle the cut: every column above the k-th
    score, then the leftmost tied ones until there are k."""
    above = ops.greater(scores, threshold)
    tied = ops.equal(scores, threshold)
    needed = k - ops.sum(ops.cast(above, "int32"), axis=1, keepdims=True)
    tie_rank = ops.cumsum(ops.cast(tied, "int32"), axis=1)
    chosen = ops.logical_or(above, ops.logical_and(tied, ops.less_equal(tie_rank, needed)))
    # Exactly k columns are chosen; distinct keys make this top_k tie-free.
    keys = -ops.arange(ops.shape(scores)[1], dtype="float32")
    _, picked = ops.top_k(ops.where(chosen, keys, float("-inf")), k)  # in column order
    return _by_score(ops.take_along_axis(scores, picked, axis=1), picked)


def _by_score(values: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of `(values, columns)` in column order, sorted by value, ties kept in order."""
    order = ops.argsort(-values, axis=1)  # Keras' torch argsort is stable
    return (
        ops.take_along_axis(values, order, axis=1),
        ops.cast(ops.take_along_axis(columns, order, axis=1), "int32"),
    )


def _per_device_top_k(scores: Tensor, k: int, mesh: Any) -> tuple[Tensor, Tensor]:
    """`_blocked_top_k` of each device's `columns / devices` scores, side by side.

    The columns of `scores` are one equal group per device of `mesh` (the
    chunk's rows are spread that way). Each device ranks its own group
    (`map_devices`) and only the `[rows, k]` results meet: `[rows, devices × k]`,
    group after group, each in (score, column) order, with columns of the
    whole chunk. Without a mesh this is plain `_blocked_top_k`.
    """
    if mesh is None:
        return _blocked_top_k(scores, k)
    shards = math.prod(mesh.shape)
    rows, width = ops.shape(scores)[0], int(scores.shape[1]) // shards
    grouped = ops.transpose(ops.reshape(scores, (rows, shards, width)), (1, 0, 2))
    grouped = ops.reshape(grouped, (shards * rows, width))
    values, columns = backend_module().map_devices(
        lambda own: _blocked_top_k(own, k), grouped, mesh
    )
    offsets = ops.reshape(ops.arange(shards, dtype="int32") * width, (shards, 1, 1))
    columns = ops.reshape(columns, (shards, rows, k)) + offsets

    def side_by_side(x: Tensor) -> Tensor:
        x = ops.transpose(ops.reshape(x, (shards, rows, k)), (1, 0, 2))
        return ops.reshape(x, (rows, shards * k))

    return side_by_side(values), side_by_side(columns)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
