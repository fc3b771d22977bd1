"""`FaissIndex`'s inverted lists: where each candidate is, its stored vector, changes.

faiss labels each vector with its catalogue position. `locations` records, per
position, its list and its offset in that list (`list << 32 | offset`), read
once from the lists (O(candidates)) and then kept up to date by the changes
below, each O(candidates changed), through faiss' own inverted-list API
(`update_entry`, `resize`, as faiss' `remove_ids` does, without its scan of
every list):

- `add_rows`: faiss `add` (labels continue from the last position);
- `remove_rows`: a removed entry's place in its list is taken by the list's
  last entry, then each mover (see `_id_book`) is relabelled with its new
  position: its code is not touched, so IVF-PQ codes stay what they were;
- `update_rows`: the entries removed, then added again with the same labels.

The lists are not re-trained: vectors added long after `index` may sit far from
their list's centroid, which is why `FaissIndex` warns once the changes pass a
share of the catalogue.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OFFSET_BITS = 32


def locations(faiss: Any, index: Any, count: int, capacity: int) -> np.ndarray:
    """`[capacity]` int64, `list << 32 | offset` of each of the first `count` labels."""
    where = np.full(max(capacity, count), -1, dtype="int64")
    inverted = index.invlists
    for number in range(int(index.nlist)):
        size = inverted.list_size(number)
        if size:
            labels = np.array(faiss.rev_swig_ptr(inverted.get_ids(number), size), copy=True)
            where[labels] = (number << OFFSET_BITS) | np.arange(size)
    return where


def vectors(faiss: Any, index: Any, where: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`[positions, dim]` float32: the stored vectors (IVF-PQ: decoded) at `positions`."""
    found = np.empty((len(positions), int(index.d)), dtype="float32")
    spots = where[positions]
    lists, offsets = spots >> OFFSET_BITS, spots & ((1 << OFFSET_BITS) - 1)
    flat = faiss.downcast_index(index)
    raw = type(flat).__name__ == "IndexIVFFlat"  # codes are the float32 vectors
    inverted = index.invlists
    for number in np.unique(lists).tolist():
        inside = np.flatnonzero(lists == number)
        if raw:
            size = inverted.list_size(number)
            codes = faiss.rev_swig_ptr(inverted.get_codes(number), size * inverted.code_size)
            rows = np.frombuffer(codes, dtype="float32").reshape(size, -1)
            found[inside] = rows[offsets[inside]]
            continue
        for row in inside.tolist():
            index.reconstruct_from_offset(number, int(offsets[row]), faiss.swig_ptr(found[row]))
    return found


def add_rows(faiss: Any, index: Any, where: np.ndarray, count: int, rows: np.ndarray) -> np.ndarray:
    """`rows` added with labels `count..`; returns `where` (grown if needed) updated."""
    sizes = _sizes(index)
    index.add(np.ascontiguousarray(rows, dtype="float32"))  # labels ntotal.. = count..
    return _record_tails(faiss, index, sizes, _room(where, count + len(rows)))


def update_rows(faiss: Any, index: Any, where: np.ndarray, positions: np.ndarray,
                rows: np.ndarray) -> None:  # fmt: skip
    """The vectors at `positions` replaced by `rows`, labels kept."""
    for position in positions.tolist():
        _drop(faiss, index, where, position)
    index.ntotal = int(index.ntotal) - len(positions)
    sizes = _sizes(index)
    index.add_with_ids(
        np.ascontiguousarray(rows, dtype="float32"), np.ascontiguousarray(positions, "int64")
    )
    _record_tails(faiss, index, sizes, where)


def remove_rows(faiss: Any, index: Any, where: np.ndarray, positions: np.ndarray,
                holes: np.ndarray, movers: np.ndarray) -> None:  # fmt: skip
    """The entries at `positions` removed; the entries at `movers` relabelled `holes`."""
    for position in positions.tolist():
        _drop(faiss, index, where, position)
    inverted = index.invlists
    for mover, hole in zip(movers.tolist(), holes.tolist(), strict=True):
        spot = int(where[mover])
        number, offset = spot >> OFFSET_BITS, spot & ((1 << OFFSET_BITS) - 1)
        code = _code(faiss, inverted, number, offset)
        inverted.update_entry(number, offset, hole, faiss.swig_ptr(code))
        where[hole] = spot
    index.ntotal = int(index.ntotal) - len(positions)


def _drop(faiss: Any, index: Any, where: np.ndarray, position: int) -> None:
    """Takes `position`'s entry out of its list: the list's last entry takes its place."""
    inverted = index.invlists
    spot = int(where[position])
    number, offset = spot >> OFFSET_BITS, spot & ((1 << OFFSET_BITS) - 1)
    last = inverted.list_size(number) - 1
    if offset != last:
        label = int(inverted.get_single_id(number, last))
        code = _code(faiss, inverted, number, last)
        inverted.update_entry(number, offset, label, faiss.swig_ptr(code))
        where[label] = spot
    inverted.resize(number, last)
    where[position] = -1


def _code(faiss: Any, inverted: Any, number: int, offset: int) -> np.ndarray:
    """A copy of one entry's code."""
    pointer = inverted.get_single_code(number, offset)
    code = np.array(faiss.rev_swig_ptr(pointer, inverted.code_size), copy=True)
    inverted.release_codes(number, pointer)
    return code


def _sizes(index: Any) -> np.ndarray:
    inverted = index.invlists
    return np.array([inverted.list_size(n) for n in range(int(index.nlist))], dtype="int64")


def _record_tails(faiss: Any, index: Any, before: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Records where the entries appended since `before` (list sizes) went."""
    after = _sizes(index)
    inverted = index.invlists
    for number in np.flatnonzero(after > before).tolist():
        size = int(after[number])
        labels = np.array(faiss.rev_swig_ptr(inverted.get_ids(number), size), copy=True)
        first = int(before[number])
        where[labels[first:]] = (number << OFFSET_BITS) | np.arange(first, size)
    return where


def _room(where: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(where):
        return where
    grown = np.full(max(needed, 2 * len(where)), -1, dtype="int64")
    grown[: len(where)] = where
    return grown
