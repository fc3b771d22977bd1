"""`BruteForceIndex.add`, `remove` and `update`: the catalogue changed in place.

Each change costs O(rows changed), not O(catalogue):

- **Rows.** New rows go after the last one, into the last chunk's free rows
  (then new chunks: zero pages, resident only once written); a removed row's
  place is taken by one of the last rows, so the rows stay contiguous and no
  search masks holes; an update overwrites its rows. The backend tensors share
  the chunks' memory on CPU, so nothing else is copied; where they do not (an
  accelerator, or a dtype the backend copies), each changed chunk is copied to
  the backend again.
- **Ids and attributes** follow `_id_book.IdBook`: buffers with room, and the
  ids sorted at `index` plus a dict of those added since.

Positions therefore change: ties still break lower position first, where a
position is where `candidate_ids` lists the candidate now.

Every function here runs under the index's write lock (`_catalogue_lock`) and
returns the new catalogue; checks happen before anything is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from two_tower.retrieval._catalogue_store import ChunkStore, aligned_zeros
from two_tower.retrieval._id_book import IdBook
from two_tower.retrieval._indexed_catalogue import IndexedCatalogue, chunk_tensor
from two_tower.retrieval.top_k import BLOCK


def buffers(catalogue: IndexedCatalogue) -> IdBook:
    """The catalogue's id book, made (one copy of ids and attributes) at the first change."""
    if catalogue.buffers is not None:
        return catalogue.buffers
    attributes = None if catalogue.attributes is None else dict(catalogue.attributes)
    return IdBook.of(catalogue.ids, catalogue.order, attributes)


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
    state.append(count, ids, attributes)
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
    holes, movers = state.remove(positions, count)
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
    state: IdBook, chunks: list[np.ndarray], tensors: list[Any], number: int, where: Any,
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


def _finished(
    catalogue: IndexedCatalogue,
    state: IdBook,
    chunks: list[np.ndarray],
    tensors: list[Any],
    rows: int,
) -> IndexedCatalogue:
    """The catalogue after a change; its ids sorted again once enough were added."""
    order, sorted_ids = state.lookup(rows, catalogue.sorted_ids)
    return catalogue._replace(
        host=ChunkStore(tuple(chunks), rows),
        chunks=tuple(tensors),
        ids=state.ids[:rows],
        order=order,
        sorted_ids=sorted_ids,
        attributes=state.attribute_views(rows),
        buffers=state,
    )
