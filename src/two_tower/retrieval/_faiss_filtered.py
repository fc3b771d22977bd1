"""`FaissIndex`'s filtered search: faiss ID selectors, or the exact scores of few rows.

A query held to a filter (a `where` mask shared by the call, or its own `allow`
list) is searched in one of two ways:

- **Few allowed rows** (`m` with `m² <= SCAN_PER_RESULT × k × candidates`, e.g.
  up to 80,000 of 10^6 at k = 100: no more than the codes the filtered faiss
  search below would scan for one query, `SCAN_PER_RESULT × k × candidates / m`,
  and scored with a matrix product instead of one by one): their stored vectors are
  read back (`_faiss_lists.vectors`, through the candidates' recorded places in
  the lists) and scored exactly, ties lower position first. This
  is exact over what the index stores (IVF-PQ's decoded vectors).
- **Many**: faiss searches with an ID selector (`IDSelectorBitmap` for a mask,
  `IDSelectorBatch` for a list). Each query reads its lists nearest first,
  skipping those with no allowed candidate, until they hold as many allowed
  candidates as an unfiltered search reads candidates (`to_read(k)`): faiss'
  `search_preassigned` with each query's own lists. A filter
  that follows the clusters (a category living in a few of them) therefore
  reads farther lists for the queries whose nearest lists hold little of it,
  where one `nprobe` for all would miss (measured: recall 0.87 instead of 0.95).

Queries without an `allow` list share one faiss call (or one exact block);
each query with a list is searched on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from two_tower.retrieval._faiss_lists import OFFSET_BITS, vectors
from two_tower.retrieval._faiss_search import without_excluded

SCAN_PER_RESULT = 64  # as FaissIndex: candidates read per requested result
EXACT_SCORES = 2**22  # scores held at once by the exact path (16 MiB of float32)

# to_read(k) -> the allowed candidates a filtered search for k results reads;
# nprobe_for(k) -> the lists an unfiltered one reads
ReadRule = Callable[[int], float]
NprobeRule = Callable[[int], int]


def filtered_search(
    faiss: Any,
    index: Any,
    where: np.ndarray,
    queries: np.ndarray,
    k: int,
    to_read: ReadRule,
    nprobe_for: NprobeRule,
    mask: np.ndarray | None,
    allowed: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    excluded: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`(scores, positions)`, `[queries, k]`, best first; -inf and -1 where none is left.

    Args:
        faiss: the faiss module.
        index: the faiss IVF index.
        where: each position's place in the lists (`_faiss_lists.locations`).
        queries: `[queries, dim]` float32.
        k: results per query.
        to_read: the allowed candidates a query for `k` results reads.
        nprobe_for: the lists an unfiltered query for `k` results reads (the
            queries without an `allow` list, when there is no `where`).
        mask: `[candidates]` bool, every query's filter (None: all).
        allowed: `(rows, positions, restricted)` of the `allow` lists, already
            cut to `mask` (`_filters.allowed_pairs`), rows ascending.
        excluded: `(rows, positions)` to leave out, rows ascending.
    """
    num_queries = len(queries)
    scores = np.full((num_queries, k), -np.inf, dtype="float32")
    positions = np.full((num_queries, k), -1, dtype="int64")
    restricted = allowed[2] if allowed is not None else np.zeros(num_queries, dtype=bool)
    free = np.flatnonzero(~restricted)
    if len(free):
        shared = None if mask is None else np.flatnonzero(mask)
        free_excluded = None if excluded is None else _rows_of(excluded, free)
        found = _search_rows(
            faiss,
            index,
            where,
            queries[free],
            k,
            (to_read, nprobe_for),
            shared,
            mask,
            free_excluded,
        )
        scores[free], positions[free] = found
    for row in np.flatnonzero(restricted).tolist():
        assert allowed is not None
        candidates = _positions_of_row(allowed[:2], row)
        if excluded is not None:
            candidates = np.setdiff1d(candidates, _positions_of_row(excluded, row))
        found = _search_rows(
            faiss,
            index,
            where,
            queries[row : row + 1],
            k,
            (to_read, nprobe_for),
            candidates,
            None,
            None,
        )
        scores[row], positions[row] = found[0][0], found[1][0]
    return scores, positions


def _search_rows(
    faiss: Any,
    index: Any,
    where: np.ndarray,
    queries: np.ndarray,
    k: int,
    rules: tuple[ReadRule, NprobeRule],
    candidates: np.ndarray | None,
    mask: np.ndarray | None,
    excluded: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` of `queries` among sorted `candidates` (None: all), less `excluded`."""
    num_candidates = int(index.ntotal)
    count = num_candidates if candidates is None else len(candidates)
    if count == 0:
        shape = (len(queries), k)
        return np.full(shape, -np.inf, "float32"), np.full(shape, -1, "int64")
    if candidates is not None and count * count <= SCAN_PER_RESULT * k * num_candidates:
        return _exact(faiss, index, where, queries, k, candidates, excluded)
    fetch = k
    if excluded is not None and len(excluded[0]):
        fetch = min(num_candidates, k + int(np.bincount(excluded[0]).max()))
    if mask is None and candidates is None:  # an unrestricted query beside restricted ones
        parameters = faiss.SearchParametersIVF(nprobe=rules[1](fetch))
        scores, positions = index.search(queries, fetch, params=parameters)
        return _finished(scores, positions, excluded, k, num_candidates)
    nlist = int(index.nlist)
    # Each query reads its lists nearest first, skipping lists with nothing
    # allowed, until they hold as many allowed candidates as an unfiltered
    # search reads candidates (or every list with one).
    target = rules[0](fetch)
    if candidates is None:
        assert mask is not None
        candidates = np.flatnonzero(mask)
    allowed_per_list = np.bincount(where[candidates] >> OFFSET_BITS, minlength=nlist)
    distances, lists = index.quantizer.search(queries, nlist)  # every list, nearest first
    held = allowed_per_list[np.maximum(lists, 0)] * (lists >= 0)
    before = np.cumsum(held, axis=1) - held  # allowed in the nearer lists
    lists = np.ascontiguousarray(np.where((held > 0) & (before < target), lists, -1))
    keep: np.ndarray  # the selector reads it: alive until the search returns
    if mask is not None:
        keep = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(keep))  # (bytes)
    else:
        keep = np.ascontiguousarray(candidates, dtype="int64")
        selector = faiss.IDSelectorBatch(len(keep), faiss.swig_ptr(keep))
    parameters = faiss.SearchParametersIVF(nprobe=nlist, sel=selector)
    scores = np.empty((len(queries), fetch), "float32")
    positions = np.empty((len(queries), fetch), "int64")
    # The SWIG method itself: faiss' Python wrapper of `search_preassigned`
    # refuses search parameters, which carry the selector.
    index.search_preassigned_c(
        len(queries), faiss.swig_ptr(queries), fetch, faiss.swig_ptr(lists),
        faiss.swig_ptr(np.ascontiguousarray(distances, dtype="float32")),
        faiss.swig_ptr(scores), faiss.swig_ptr(positions), False, parameters,
    )  # fmt: skip
    del keep
    return _finished(scores, positions, excluded, k, num_candidates)


def _finished(
    scores: np.ndarray,
    positions: np.ndarray,
    excluded: tuple[np.ndarray, np.ndarray] | None,
    k: int,
    num_candidates: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` results that are not excluded; -inf where no candidate was found."""
    if positions.shape[1] > k:
        assert excluded is not None
        scores, positions = without_excluded(scores, positions, excluded, k, num_candidates)
    return np.where(positions < 0, -np.inf, scores).astype("float32"), positions.astype("int64")


def _exact(
    faiss: Any,
    index: Any,
    where: np.ndarray,
    queries: np.ndarray,
    k: int,
    candidates: np.ndarray,
    excluded: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top `k` over the stored vectors of sorted `candidates`, ties lower first."""
    stored = vectors(faiss, index, where, candidates)
    width = min(k, len(candidates))
    batch = max(1, EXACT_SCORES // len(candidates))
    scores = np.full((len(queries), k), -np.inf, "float32")
    positions = np.full((len(queries), k), -1, "int64")
    for start in range(0, len(queries), batch):
        block = queries[start : start + batch] @ stored.T
        if excluded is not None:
            rows, slots = _within(excluded, candidates, start, len(block))
            block[rows, slots] = -np.inf
        order = _top_columns(block, width)
        best = np.take_along_axis(block, order, axis=1)
        scores[start : start + len(block), :width] = best
        positions[start : start + len(block), :width] = np.where(
            np.isneginf(best), -1, candidates[order]
        )
    return scores, positions


def _top_columns(scores: np.ndarray, width: int) -> np.ndarray:
    """The columns of each row's `width` best scores, best first, ties lower column
    first: a partition, then a sort of those `width` only (not of the row)."""
    if width < scores.shape[1]:
        picked = np.argpartition(-scores, width - 1, axis=1)[:, :width]
        threshold = np.min(np.take_along_axis(scores, picked, axis=1), axis=1, keepdims=True)
        above = scores > threshold
        tied = scores == threshold  # the partition picked any of them: take the first
        wanted = width - above.sum(axis=1, keepdims=True)
        chosen = above | (tied & (np.cumsum(tied, axis=1) <= wanted))
        columns = np.nonzero(chosen)[1].reshape(len(scores), width)  # ascending per row
    else:
        columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    values = np.take_along_axis(scores, columns, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")  # equal scores keep column order
    return np.take_along_axis(columns, order, axis=1)


def _rows_of(
    pairs: tuple[np.ndarray, np.ndarray], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of sorted query `rows`, renumbered 0.. in that order."""
    slots = np.searchsorted(rows, pairs[0])
    inside = (slots < len(rows)) & (rows[np.minimum(slots, len(rows) - 1)] == pairs[0])
    return slots[inside], pairs[1][inside]


def _positions_of_row(pairs: tuple[np.ndarray, np.ndarray], row: int) -> np.ndarray:
    """The positions paired with `row` (pairs are sorted by row)."""
    low, high = np.searchsorted(pairs[0], [row, row + 1])
    return pairs[1][low:high]


def _within(
    excluded: tuple[np.ndarray, np.ndarray], candidates: np.ndarray, start: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row in the block, index in `candidates`) of the block's excluded candidates."""
    low, high = np.searchsorted(excluded[0], [start, start + rows])
    positions = excluded[1][low:high]
    slots = np.minimum(np.searchsorted(candidates, positions), len(candidates) - 1)
    inside = candidates[slots] == positions
    return excluded[0][low:high][inside] - start, slots[inside]
