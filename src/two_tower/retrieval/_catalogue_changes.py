"""`BruteForceIndex.add`, `remove` and `update`: the catalogue changed in place.

Each change costs O(rows changed), not O(catalogue):

- **Rows.** New rows go after the last one, into the last chunk's free rows
  (then new chunks: zero pages, resident only once written); a removed row's
  place is taken by one of the last rows, so the rows stay contiguous and no
  search masks holes; an update overwrites its rows. The backend tensors share
  the chunks' memory on CPU, so nothing else is copied; where they do not (an
  accelerator, or a dtype the backend copies), each changed chunk is copied to
  the backend again.
- **Ids and attributes** are kept in buffers with spare room, doubled when full
  (the first change copies them once into such a buffer).
- **Lookups.** The ids sorted at `index` stay; a removed id's entry is marked
  (-1), a moved id's entry gets its new position, and ids added since are kept
  in a dict. When that dict passes 1/32 of the catalogue (or 4,096 ids), the
  ids are sorted again: O(catalogue log catalogue), once per that many adds.

Positions therefore change: ties still break lower position first, where a
position is where `candidate_ids` lists the candidate now.

Every function here runs under the index's write lock (`_catalogue_lock`) and
returns the new catalogue; checks happen before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from keras import ops

from two_tower.retrieval import _catalogue_store
from two_tower.retrieval._catalogue_store import ChunkStore, aligned_zeros
from two_tower.retrieval._indexed_catalogue import IndexedCatalogue, chunk_tensor
from two_tower.retrieval.top_k import BLOCK

MERGE_FRACTION = 32  # re-sort the ids once the added ones pass 1/32 of the catalogue
MERGE_MINIMUM = 4096


@dataclass
class Buffers:
    """What changes in place: buffers with spare room, and the added ids' positions."""

    ids: np.ndarray
    attributes: dict[str, np.ndarray] | None
    order: np.ndarray  # writable: -1 marks a removed id
    slots: np.ndarray  # position -> its id's entry in the sorted ids (-1: in `added`)
    added: dict[Any, int] = field(default_factory=dict)
    shares_memory: bool | None = None  # do the backend tensors read the chunks?


def buffers(catalogue: IndexedCatalogue) -> Buffers:
    """The catalogue's buffers, made (one copy of ids and attributes) at the first change."""
    if catalogue.buffers is not None:
        return catalogue.buffers
    rows = len(catalogue.ids)
    attributes = None
    if catalogue.attributes is not None:
        attributes = {name: _room(values, rows) for name, values in catalogue.attributes.items()}
    return Buffers(
        ids=_room(catalogue.ids, rows),
        attributes=attributes,
        order=np.array(catalogue.order, copy=True),
        slots=_inverse(catalogue.order, rows),
    )


def _inverse(order: np.ndarray, rows: int) -> np.ndarray:
    """Position -> sorted entry, with room as `_room` leaves (the inverse of `order`)."""
    slots = np.full(max(2 * rows, 16), -1, dtype="int64")
    slots[order] = np.arange(len(order))
    return slots


def _room(values: np.ndarray, rows: int, needed: int | None = None, like: Any = None) -> np.ndarray:
    """A writable copy of `values[:rows]` with room for `needed` rows (doubling), in
    a dtype that also holds `like` (e.g. longer strings)."""
    capacity = max(needed or rows, 2 * rows, 16)
    dtype = values.dtype if like is None else np.result_type(values.dtype, like)
    grown = np.zeros(capacity, dtype=dtype)
    grown[:rows] = values[:rows]
    return grown


def _fit(buffer: np.ndarray, rows: int, needed: int, values: np.ndarray) -> np.ndarray:
    """`buffer`, or a bigger or wider copy of its first `rows`, that holds `needed` rows
    and `values`'s dtype."""
    wider = np.result_type(buffer.dtype, values.dtype) != buffer.dtype
    if needed <= len(buffer) and not wider:
        return buffer
    return _room(buffer, rows, max(needed, 2 * len(buffer)), values.dtype)


def added(
    catalogue: IndexedCatalogue,
    rows: np.ndarray,
    ids: np.ndarray,
    attributes: dict[str, np.ndarray] | None,
    chunk_size: int,
) -> IndexedCatalogue:
    """`rows` appended with their `ids` (new, checked) and `attributes` (checked)."""
    store = catalogue.host
    assert store is not None
    state = buffers(catalogue)
    count, total = store.num_rows, store.num_rows + len(rows)
    chunks, tensors = list(store.chunks), list(catalogue.chunks or ())
    width = store.width
    full = -(-chunk_size // BLOCK) * BLOCK
    if len(chunks) == 1 and total > width and width < full:
        # A small catalogue's one chunk grows (doubling, up to a full chunk).
        grown = aligned_zeros(min(full, max(2 * width, -(-total // BLOCK) * BLOCK)), store.dim,
                              store.dtype)  # fmt: skip
        grown[:count] = chunks[0][:count]
        chunks, tensors, width = [grown], [chunk_tensor(grown)], len(grown)
    changed = set()
    position, start = count, 0
    while start < len(rows):
        number, offset = divmod(position, width)
        if number == len(chunks):
            chunks.append(aligned_zeros(width, store.dim, store.dtype))
            tensors.append(None)
        step = min(width - offset, len(rows) - start)
        _write(state, chunks, tensors, number, slice(offset, offset + step), rows[start:][:step])
        changed.add(number)
        position, start = position + step, start + step
    for number in changed:
        if tensors[number] is None:
            tensors[number] = chunk_tensor(chunks[number])
    state.ids = _fit(state.ids, count, total, ids)
    state.ids[count:total] = ids
    state.slots = _fit(state.slots, count, total, state.slots[:0])
    state.slots[count:total] = -1  # in `added`
    if state.attributes is not None:
        assert attributes is not None
        for name, values in attributes.items():
            state.attributes[name] = _fit(state.attributes[name], count, total, values)
            state.attributes[name][count:total] = values
    state.added.update(zip(ids.tolist(), range(count, total), strict=True))
    return _finished(catalogue, state, chunks, tensors, total)


def removed(catalogue: IndexedCatalogue, positions: np.ndarray) -> IndexedCatalogue | None:
    """The rows at `positions` (unique) removed, the last rows moved into their places;
    None when nothing is left."""
    store = catalogue.host
    assert store is not None
    count = store.num_rows
    remaining = count - len(positions)
    if remaining == 0:
        return None
    state = buffers(catalogue)
    holes = np.sort(positions[positions < remaining])
    tail = np.arange(remaining, count)
    movers = tail[~np.isin(tail, positions)]  # as many as the holes
    chunks, tensors = list(store.chunks), list(catalogue.chunks or ())
    width = store.width
    moving = np.empty((len(movers), store.dim), store.dtype)
    sources = movers // width
    for number in np.unique(sources).tolist():
        inside = sources == number
        moving[inside] = chunks[number][movers[inside] - number * width]
    targets = holes // width
    for number in np.unique(targets).tolist():
        inside = targets == number
        _write(state, chunks, tensors, number, holes[inside] - number * width, moving[inside])
    gone = state.ids[positions]
    moved_ids = state.ids[movers]
    state.ids[holes] = moved_ids
    if state.attributes is not None:
        for values in state.attributes.values():
            values[holes] = values[movers]
    _forget(state, positions, gone)
    _relocate(state, movers, holes, moved_ids)
    kept = -(-remaining // width)
    for number in range(remaining // width, kept):  # rows past the end are zeros again
        low, high = remaining - number * width, min(width, count - number * width)
        chunks[number][low:high] = 0  # (beyond the valid rows: no search reads them)
    return _finished(catalogue, state, chunks[:kept], tensors[:kept], remaining)


def updated(
    catalogue: IndexedCatalogue, positions: np.ndarray, rows: np.ndarray
) -> IndexedCatalogue:
    """The rows at `positions` (unique) replaced by `rows`."""
    store = catalogue.host
    assert store is not None
    state = buffers(catalogue)
    chunks, tensors = list(store.chunks), list(catalogue.chunks or ())
    width = store.width
    numbers = positions // width
    for number in np.unique(numbers).tolist():
        inside = numbers == number
        _write(state, chunks, tensors, number, positions[inside] - number * width, rows[inside])
    return _finished(catalogue, state, chunks, tensors, store.num_rows)


def _write(
    state: Buffers, chunks: list[np.ndarray], tensors: list[Any], number: int, where: Any,
    rows: np.ndarray,
) -> None:  # fmt: skip
    """Writes `rows` at `where` in chunk `number`, and in its backend tensor if that
    does not read the chunk's memory (found out at the first write that changes a row)."""
    chunk = chunks[number]
    if tensors[number] is None or state.shares_memory is not None:
        chunk[where] = rows
        if tensors[number] is not None and not state.shares_memory:
            tensors[number] = chunk_tensor(chunk)
        return
    before = chunk[where]
    differs = np.flatnonzero(np.any(before != rows, axis=1)) if len(rows) else np.zeros(0, int)
    chunk[where] = rows
    if not len(differs):
        return  # nothing changed: nothing learned
    row = np.arange(len(chunk))[where][differs[0]]
    seen = np.asarray(ops.convert_to_numpy(tensors[number][row]))
    state.shares_memory = bool(np.array_equal(seen, chunk[row]))
    if not state.shares_memory:
        tensors[number] = chunk_tensor(chunk)


def _forget(state: Buffers, positions: np.ndarray, ids: np.ndarray) -> None:
    """The ids at `positions` (being removed) are no longer found."""
    slots = state.slots[positions]
    state.order[slots[slots >= 0]] = -1
    for value in ids[slots < 0].tolist():
        del state.added[value]


def _relocate(state: Buffers, sources: np.ndarray, targets: np.ndarray, ids: np.ndarray) -> None:
    """The ids at `sources` (`ids`) move to `targets`."""
    slots = state.slots[sources]
    state.slots[targets] = slots
    state.order[slots[slots >= 0]] = targets[slots >= 0]
    for value, target in zip(ids[slots < 0].tolist(), targets[slots < 0].tolist(), strict=True):
        state.added[value] = target


def _finished(
    catalogue: IndexedCatalogue,
    state: Buffers,
    chunks: list[np.ndarray],
    tensors: list[Any],
    rows: int,
) -> IndexedCatalogue:
    """The catalogue after a change; its ids sorted again once enough were added."""
    ids = state.ids[:rows]
    order, sorted_ids = state.order, catalogue.sorted_ids
    if len(state.added) > max(MERGE_MINIMUM, rows // MERGE_FRACTION):
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        state.order, state.slots, state.added = order, _inverse(order, rows), {}
    attributes = None
    if state.attributes is not None:
        attributes = {name: values[:rows] for name, values in state.attributes.items()}
    return catalogue._replace(
        host=ChunkStore(tuple(chunks), rows),
        chunks=tuple(tensors),
        ids=ids,
        order=order,
        sorted_ids=sorted_ids,
        attributes=attributes,
        buffers=state,
    )


def rows_for(dim: int, dtype: Any, embeddings: Any, what: str) -> np.ndarray:
    """`embeddings` checked (2-D, of `dim` columns, finite) and cast to `dtype`."""
    array = _catalogue_store.checked_block(embeddings, 0, None)
    if array.shape[1] != dim:
        raise ValueError(
            f"`{what}` received embeddings of dim {array.shape[1]}; the index holds dim {dim}."
        )
    if array.shape[0] == 0:
        raise ValueError(f"`{what}` received no rows: pass at least one.")
    return np.asarray(array, dtype=dtype)
