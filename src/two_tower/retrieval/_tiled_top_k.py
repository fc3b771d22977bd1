"""Exact top k of one chunk of candidates, scored tile by tile so the scores stay in cache.

`BruteForceIndex` scores `[queries, chunk]` at a time. Written to memory whole,
that score matrix (1 GiB for 1,024 queries × 2^18 candidates) costs more than
the arithmetic: with dim 64 a product is memory-bound. Here the chunk is cut
into tiles of `tile` candidates; each tile's `[queries, tile]` scores are
reduced, while still in cache, to the maximum of every block of `BLOCK`
consecutive candidates. Only those maxima (1/32 of the scores) reach memory.

The exact top k then comes in two small steps, as in `top_k._blocked`:

1. The k candidates with the best scores lie in at most k blocks, all among
   the k blocks with the highest maxima (ties: lower block first, whose
   positions are all lower). A top k over the maxima picks them.
2. Those k blocks are scored again (gathered, `GROUP` queries at a time, so the
   gathered rows stay in cache too) and ranked: the top k among them, ties to
   the lower position.

Filters and exclusions keep this exact. A column mask (the padded tail of the
last chunk, a `where` filter) is applied to each tile before its maxima are
taken. Per-query exclusions and allow-lists change only the blocks that hold
one of their positions: those `(query, block)` pairs come as sorted keys with
a bit per position (`block_bits`), their maxima are computed again with the
bits applied, and every query that has an allow-list starts with no block at
all. The same bits mask the final scores.

Exact means exact on the scores the search computes: the blocks are chosen on
the first pass's scores and ranked on the second's, so both must be the same
numbers, bit for bit. A matrix product may sum in another order for another
shape (an `einsum` over gathered rows does, on JAX and torch), and then
candidates within float32 rounding of each other could swap, or excluding an
unrelated candidate could change a ranking. Each backend therefore scores both
passes with a pair of operations that agree there (`search_candidates_major_rows`
and `search_rescore_einsum` in `two_tower.backends`; checked on real-valued data
by `tests/test_tiled_search.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from keras import ops

from two_tower.backends import backend_module
from two_tower.retrieval.top_k import BLOCK, stable_top_k
from two_tower.types import SimilarityFn, Tensor

GROUP = 8  # queries whose chosen blocks are gathered and scored again at once
# (query, block) keys whose block is scored again at once. A general similarity
# scores every key of a group against all of the group's rows (64 times the
# arithmetic, 5% of a search with 50 exclusions per query); fewer keys a step
# cost more in loop steps on torch, which runs them eagerly.
KEY_GROUP = 64


def usable(width: int, k: int, rows: int, tile: int) -> bool:
    """Whether a `width`-candidate chunk is searched tile by tile.

    It pays once the chunk holds several tiles and the k chosen blocks are a
    small part of it (otherwise scoring the chunk whole is as cheap); the
    `(query, block)` keys must fit in int32.
    """
    return width >= 4 * tile and 4 * k * BLOCK <= width and rows * (width // BLOCK) < 2**31


def padded_rows(rows: int) -> int:
    """Query rows of a tiled step: at least `GROUP`, so that groups divide them."""
    return max(rows, GROUP)


def block_bits(
    pairs: tuple[np.ndarray, np.ndarray], start: int, width: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """`(keys, bits)` of one chunk's `(query row, position)` pairs, or None.

    `keys` are the sorted distinct `row * blocks + block` of the pairs inside
    `start .. start + width`, `bits` (int32) has bit `p % BLOCK` set for each of
    their positions.
    """
    rows, positions = pairs
    inside = (positions >= start) & (positions < start + width)
    if not np.any(inside):
        return None
    columns = positions[inside] - start
    keys = rows[inside].astype("int64") * (width // BLOCK) + columns // BLOCK
    unique, owner = np.unique(keys, return_inverse=True)
    bits = np.zeros(len(unique), "uint32")
    np.bitwise_or.at(bits, owner, np.left_shift(np.uint32(1), (columns % BLOCK).astype("uint32")))
    return unique.astype("int32"), bits.view("int32")


def merged_bits(
    excluded: tuple[np.ndarray, np.ndarray] | None,
    allowed: tuple[np.ndarray, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """The step inputs of one chunk's exclusion and allow-list bits (see `block_bits`).

    One sorted key array for both: `excluded_bits` and `allowed_bits` are
    aligned with `block_keys`, zero where a key has none of that kind. Padded
    to a power of two by repeating the last key, so that the compiled step
    sees a handful of shapes, and to at least `KEY_GROUP` keys.
    """
    if excluded is None and allowed is None:
        return {}
    keys = np.unique(np.concatenate([part[0] for part in (excluded, allowed) if part is not None]))
    inputs = {"block_keys": keys}
    for name, part in (("excluded_bits", excluded), ("allowed_bits", allowed)):
        bits = np.zeros(len(keys), "int32")
        if part is not None:
            bits[np.searchsorted(keys, part[0])] = part[1]
        inputs[name] = bits
    padded = max(KEY_GROUP, 1 << max(0, len(keys) - 1).bit_length())
    return {
        name: np.concatenate([v, np.repeat(v[-1:], padded - len(v))]) for name, v in inputs.items()
    }


def tiled_top_k(
    inputs: Mapping[str, Tensor],
    similarity_fn: SimilarityFn,
    k: int,
    tile: int,
    by_candidates: bool,
    by_einsum: bool,
) -> tuple[Tensor, Tensor]:
    """Top k of one chunk: `(scores, columns)`, `[rows, k]`, ties to the lower column.

    Args:
        inputs: the step's inputs (`TopKStep.call`): `queries`, `chunk` and the
            optional `num_valid`, `allowed`, `restricted`, `block_keys`,
            `excluded_bits`, `allowed_bits`.
        similarity_fn: `[queries, dim] × [candidates, dim] -> [queries, candidates]`.
        k: results per query, at most the chunk's width / `BLOCK`.
        tile: candidates scored at once.
        by_candidates: score the tiles as `tile @ queries.T` (`similarity_fn`
            is the plain dot product), not with `similarity_fn`.
        by_einsum: score the chosen blocks again with `einsum` (the dot
            product), not with `similarity_fn`. The two flags come from
            `TopKStep.tiled_passes`.
    """
    queries, chunk = inputs["queries"], inputs["chunk"]
    # Static chunk shapes (a step serves one chunk width); the number of queries
    # and of block keys may not be (TensorFlow relaxes traced shapes).
    width, dim = int(chunk.shape[0]), int(chunk.shape[1])
    blocks = width // BLOCK
    columns_kept = _column_mask(inputs, width)
    layout = _Layout(width, tile)
    maxima = _block_maxima(queries, chunk, similarity_fn, layout, by_candidates, columns_kept)
    if "restricted" in inputs:  # rows with an allow-list have only the blocks it names
        maxima = ops.where(ops.expand_dims(inputs["restricted"], 1), float("-inf"), maxima)
    slabs = ops.reshape(chunk, (blocks, BLOCK, dim))
    if "block_keys" in inputs:
        keys = inputs["block_keys"]
        key_rows, key_blocks = keys // blocks, keys % blocks
        scores = _scored_again(
            similarity_fn, by_einsum, ops.take(queries, key_rows, axis=0), slabs,
            ops.expand_dims(key_blocks, 1), KEY_GROUP,
        )  # fmt: skip
        kept = _kept(inputs, key_rows, ops.expand_dims(key_blocks, 1), columns_kept, blocks)
        assert kept is not None
        corrected = ops.max(ops.where(kept, scores, float("-inf")), axis=1)
        pairs = ops.stack([key_rows, layout.entry(key_blocks)], axis=1)
        maxima = ops.scatter_update(maxima, pairs, corrected)
    chosen = min(k, blocks)
    _, entries = stable_top_k(maxima, chosen)
    entries = ops.sort(entries, axis=1)  # position order: ties below go to the lower position
    best = layout.block(entries)
    scores = _scored_again(similarity_fn, by_einsum, queries, slabs, best, GROUP)
    rows = ops.arange(ops.shape(queries)[0], dtype="int32")
    real = ops.repeat(layout.real(entries), BLOCK, axis=1)  # not a block scored twice
    kept = _both(_kept(inputs, rows, best, columns_kept, blocks), real)
    scores = ops.where(kept, scores, float("-inf"))
    offsets = ops.reshape(ops.arange(BLOCK, dtype="int32"), (1, 1, BLOCK))
    columns = ops.reshape(ops.expand_dims(best * BLOCK, 2) + offsets, (-1, chosen * BLOCK))
    values, picked = stable_top_k(scores, k)
    return values, ops.take_along_axis(columns, picked, axis=1)


def _both(kept: Tensor | None, more: Tensor) -> Tensor:
    """`kept` and `more`, where None keeps everything."""
    return more if kept is None else ops.logical_and(kept, more)


def _column_mask(inputs: Mapping[str, Tensor], width: int) -> Tensor | None:
    """`[width]` bools: the chunk's real rows (not its padded tail) that `where` keeps."""
    kept = None
    if "num_valid" in inputs:
        kept = ops.less(ops.arange(width, dtype="int32"), inputs["num_valid"][0])
    if "allowed" in inputs:
        kept = _both(kept, inputs["allowed"])
    return kept


class _Layout:
    """Where each block's maximum sits in the maxima of a chunk scored `tile` at a time.

    The chunk is cut into `ceil(width / tile)` tiles read in place (no copy of
    the chunk); when `tile` does not divide the width, the last tile starts at
    `width - tile` and overlaps its predecessor, and its first entries, blocks
    already scored, are -inf (`repeated`). So entry `p` holds block `p` before
    the last tile and block `p - shift` in it.
    """

    def __init__(self, width: int, tile: int) -> None:
        self.tile, self.count = tile, -(-width // tile)
        self.per_tile = tile // BLOCK
        self.last = (self.count - 1) * self.per_tile  # first entry of the last tile
        self.shift = self.last - (width - tile) // BLOCK
        self.entries = self.count * self.per_tile

    def start(self, index: Tensor) -> Tensor:
        """The first row of tile `index`."""
        return ops.minimum(index * self.tile, (self.last - self.shift) * BLOCK)

    def repeated(self, index: Tensor) -> Tensor:
        """`[per_tile]` bools: which of tile `index`'s blocks an earlier tile holds."""
        blocks = self.start(index) // BLOCK + ops.arange(self.per_tile, dtype="int32")
        return ops.less(blocks, index * self.per_tile)

    def block(self, entry: Tensor) -> Tensor:
        return ops.where(ops.less(entry, self.last), entry, entry - self.shift)

    def entry(self, block: Tensor) -> Tensor:
        return ops.where(ops.less(block, self.last), block, block + self.shift)

    def real(self, entry: Tensor) -> Tensor:
        """Whether `entry` is not a repeated block."""
        return ops.logical_or(
            ops.less(entry, self.last), ops.greater_equal(self.block(entry), self.last)
        )


def _block_maxima(
    queries: Tensor,
    chunk: Tensor,
    similarity_fn: SimilarityFn,
    layout: _Layout,
    by_candidates: bool,
    columns_kept: Tensor | None,
) -> Tensor:
    """`[rows, layout.entries]`: each block's best score, one tile of the chunk at a time."""
    dim, tile = int(chunk.shape[1]), layout.tile

    def one(index: Tensor) -> Tensor:
        start = layout.start(index)
        rows = ops.slice(chunk, (start, 0), (tile, dim))
        kept = None if columns_kept is None else ops.slice(columns_kept, (start,), (tile,))
        maxima = _tile_maxima(queries, similarity_fn, by_candidates, rows, kept)
        repeated = layout.repeated(index)
        return ops.where(ops.expand_dims(repeated, int(by_candidates)), float("-inf"), maxima)

    stacked = backend_module().map_slices(one, ops.arange(layout.count, dtype="int32"))
    if by_candidates:  # [tiles, tile / BLOCK, rows]
        return ops.transpose(ops.reshape(stacked, (layout.entries, -1)))
    # [tiles, rows, tile / BLOCK]
    return ops.reshape(ops.transpose(stacked, (1, 0, 2)), (-1, layout.entries))


def _tile_maxima(
    queries: Tensor,
    similarity_fn: SimilarityFn,
    by_candidates: bool,
    tile: Tensor,
    kept: Tensor | None,
) -> Tensor:
    """Block maxima of a tile: `[tile / BLOCK, rows]` by candidates, else `[rows, tile / BLOCK]`."""
    size = int(tile.shape[0])
    if by_candidates:
        scores = ops.matmul(tile, ops.transpose(queries))  # [tile, rows]
        if kept is not None:
            scores = ops.where(ops.expand_dims(kept, 1), scores, float("-inf"))
        return ops.max(ops.reshape(scores, (size // BLOCK, BLOCK, -1)), axis=1)
    scores = similarity_fn(queries, tile)
    if kept is not None:
        scores = ops.where(ops.expand_dims(kept, 0), scores, float("-inf"))
    return ops.max(ops.reshape(scores, (-1, size // BLOCK, BLOCK)), axis=2)


def _scored_again(
    similarity_fn: SimilarityFn,
    by_einsum: bool,
    queries: Tensor,
    slabs: Tensor,
    blocks: Tensor,
    group: int,
) -> Tensor:
    """`[n, m × BLOCK]` scores of row i's query against the rows of its blocks `blocks[i]`.

    `n` must be a multiple of `group`. `group` queries at a time, so that their
    gathered rows stay in cache (all of them at once took 3× longer, measured on
    JAX). Without `by_einsum`, `similarity_fn` scores the group's queries against
    all of the group's rows and each query keeps its own: `group` times the
    arithmetic, which is small here.
    """
    m, dim = int(blocks.shape[1]), int(slabs.shape[2])
    width = m * BLOCK

    def one(xs: tuple[Tensor, Tensor]) -> Tensor:
        own, chosen = xs
        rows = ops.reshape(ops.take(slabs, ops.reshape(chosen, (-1,)), axis=0), (group, width, dim))
        if by_einsum:
            return ops.einsum("gd,gcd->gc", own, rows)
        every = ops.reshape(similarity_fn(own, ops.reshape(rows, (group * width, dim))),
                            (group, group, width))  # fmt: skip
        return ops.transpose(ops.diagonal(every, axis1=0, axis2=1))

    grouped = (
        ops.reshape(queries, (-1, group, dim)),
        ops.reshape(blocks, (-1, group, m)),
    )
    return ops.reshape(backend_module().map_slices(one, grouped), (-1, width))


def _kept(
    inputs: Mapping[str, Tensor],
    rows: Tensor,
    blocks: Tensor,
    columns_kept: Tensor | None,
    num_blocks: int,
) -> Tensor | None:
    """`[n, m × BLOCK]` bools: the positions of blocks `blocks[i]` that row `rows[i]` may return."""
    m = int(blocks.shape[1])
    offsets = ops.reshape(ops.arange(BLOCK, dtype="int32"), (1, 1, BLOCK))
    kept = None
    if columns_kept is not None:
        columns = ops.expand_dims(blocks * BLOCK, 2) + offsets
        kept = ops.take(columns_kept, ops.reshape(columns, (-1, m * BLOCK)), axis=0)
    excluded_bits = allowed_bits = None
    if "block_keys" in inputs:
        keys = inputs["block_keys"]
        wanted = ops.reshape(ops.expand_dims(rows, 1) * num_blocks + blocks, (-1,))
        found = ops.minimum(
            ops.cast(ops.searchsorted(keys, wanted), "int32"), ops.shape(keys)[0] - 1
        )
        match = ops.reshape(ops.equal(ops.take(keys, found, axis=0), wanted), (-1, m))

        def bits_of(name: str) -> Tensor:
            bits = ops.reshape(ops.take(inputs[name], found, axis=0), (-1, m))
            return ops.where(match, bits, ops.zeros_like(bits))

        excluded_bits, allowed_bits = bits_of("excluded_bits"), bits_of("allowed_bits")
    if excluded_bits is not None:
        kept = _both(kept, ops.logical_not(_set(excluded_bits, offsets, m)))
    if "restricted" in inputs:
        restricted = ops.reshape(ops.take(inputs["restricted"], rows, axis=0), (-1, 1))
        own = ops.logical_not(restricted)
        if allowed_bits is not None:
            own = ops.logical_or(own, _set(allowed_bits, offsets, m))
        kept = _both(kept, own)
    return kept


def _set(bits: Tensor, offsets: Tensor, m: int) -> Tensor:
    """`[n, m × BLOCK]` bools: bit `offset` of each block's int32 `bits`."""
    shifted = ops.right_shift(ops.expand_dims(bits, 2), offsets)
    return ops.reshape(ops.equal(ops.bitwise_and(shifted, 1), 1), (-1, m * BLOCK))
