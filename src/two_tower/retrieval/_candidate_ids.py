"""Candidate ids of an index: checking them, finding their positions, exclusions.

Ids stay on the host as a NumPy array (int64 or strings), never in a compiled
graph; positions are looked up in the ids sorted once at `index`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

from two_tower.retrieval import _catalogue_store
from two_tower.retrieval.top_k import next_power_of_two


class CandidateIds(NamedTuple):
    """Indexed ids and what looks them up: their argsort and the sorted ids."""

    ids: np.ndarray
    order: np.ndarray  # argsort of `ids`
    sorted_ids: np.ndarray


class IdTable(Protocol):
    """What `positions_of` reads: `CandidateIds`, or an index's catalogue snapshot."""

    @property
    def ids(self) -> np.ndarray: ...
    @property
    def order(self) -> np.ndarray: ...
    @property
    def sorted_ids(self) -> np.ndarray: ...


def _normalise_ids(candidate_ids: Any) -> np.ndarray:
    """Ids as an integer or string NumPy array; mixed or other kinds raise."""
    if not isinstance(candidate_ids, np.ndarray) and hasattr(candidate_ids, "__next__"):
        raise ValueError(
            "`candidate_ids` must be an array-like of ids (a list or an array), not an "
            f"iterator. Received: {type(candidate_ids).__name__}. Pass list(ids), or give "
            "the catalogue as (embeddings, ids) pairs."
        )
    ids = np.asarray(candidate_ids)
    if ids.dtype == object:
        values = ids.reshape(-1).tolist()
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            try:
                ids = np.asarray(values, dtype="int64").reshape(ids.shape)
            except OverflowError:
                raise ValueError(
                    "Integer `candidate_ids` must fit in int64. Received values up to "
                    f"{max(values)}"
                ) from None
        elif all(isinstance(v, str) for v in values):
            ids = ids.astype(str)
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise ValueError(
                f"`candidate_ids` must be all integers or all strings. Received a mix of {kinds}"
            )
    if ids.dtype.kind not in "iuU":
        raise ValueError(f"`candidate_ids` must be integers or strings. Received dtype {ids.dtype}")
    return ids


def check_catalogue(
    candidate_embeddings: Any, candidate_ids: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validates a catalogue; returns (embeddings, ids, argsort of the ids).

    Raises:
        ValueError: on an empty catalogue, a non-2D embedding matrix, non-finite
            embeddings, ids whose length differs from the embeddings, or
            duplicate ids.
    """
    # The same checks as a block of `BruteForceIndex.index` (no copy of an array).
    embeddings = _catalogue_store.checked_block(candidate_embeddings, 0, None)
    if embeddings.shape[0] == 0:
        raise ValueError("Cannot index an empty catalogue: 0 candidate embeddings.")
    ids, order, _ = checked_ids(candidate_ids, embeddings.shape[0])
    return embeddings, ids, order


def checked_ids(candidate_ids: Any, num_rows: int) -> CandidateIds:
    """`(ids, argsort of the ids, sorted ids)`, the ids our own copy.

    Positions when None: then all three are one `arange` (8 bytes a candidate,
    not 24). Otherwise unique, one per row.
    """
    if candidate_ids is None:
        ids = np.arange(num_rows, dtype="int64")
        return CandidateIds(ids, ids, ids)
    ids = np.array(_normalise_ids(candidate_ids), copy=True)
    if ids.ndim != 1 or len(ids) != num_rows:
        raise ValueError(
            "`candidate_ids` must be 1D with one id per embedding row. "
            f"Received ids of shape {ids.shape} for {num_rows} embeddings."
        )
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(repeated):
        raise ValueError(
            "`candidate_ids` must be unique. Received duplicates: "
            f"{np.unique(repeated)[:5].tolist()}"
        )
    return CandidateIds(ids, order, sorted_ids)


def padding_id(ids: np.ndarray) -> int | str:
    """The id of a result slot no candidate filled (score -inf): -1, or "" for strings."""
    return "" if ids.dtype.kind == "U" else -1


def excluded_indices(
    excluded: tuple[np.ndarray, np.ndarray] | None, start: int, size: int
) -> np.ndarray | None:
    """`[P, 2]` (row, column) indices of one chunk's excluded scores, or None.

    P is padded to a power of two by repeating an index (setting -inf twice is
    harmless), so that the compiled step sees a handful of shapes.
    """
    if excluded is None:
        return None
    rows, positions = excluded
    inside = (positions >= start) & (positions < start + size)
    if not np.any(inside):
        return None
    indices = np.stack([rows[inside], positions[inside] - start], axis=1).astype("int32")
    padded = next_power_of_two(len(indices))
    return np.concatenate([indices, np.repeat(indices[:1], padded - len(indices), axis=0)])


def exclusion_lists(
    exclude: Any,
    num_rows: int,
    what: str = "query",
    plural: str = "queries",
    argument: str = "exclude",
) -> list[np.ndarray | None]:
    """`exclude` as one 1D id array (or None) per row; a flat list of ids raises.

    `exclude=[5, 7]` for two queries could mean "leave 5 and 7 out of both" or
    "5 from the first, 7 from the second", and once meant the second silently.
    So every entry must itself be a sequence of ids, or None: `[[5], [7]]`, or
    `[[5, 7], [5, 7]]`.

    Raises:
        ValueError: if `exclude` is not a sequence with one entry per row, or an
            entry is a single id instead of a sequence of ids.
    """
    if isinstance(exclude, (str, bytes, Mapping)) or not hasattr(exclude, "__len__"):
        raise ValueError(
            f"`{argument}` must hold one sequence of ids (or None) per {what}. "
            f"Received: {type(exclude).__name__}"
        )
    if len(exclude) != num_rows:
        raise ValueError(
            f"`{argument}` must have one entry per {what}: {num_rows} {plural}, "
            f"received {len(exclude)} entries."
        )
    entries: list[np.ndarray | None] = []
    for row, ids in enumerate(exclude):
        if ids is None:
            entries.append(None)
            continue
        if isinstance(ids, (set, frozenset)):
            ids = sorted(ids)  # a set of ids is a fine sequence; NumPy sees it as one object
        if isinstance(ids, (str, bytes)) or np.ndim(ids) == 0:
            raise ValueError(
                f"`{argument}[{row}]` is a single id ({ids!r}), but each entry of `{argument}` "
                f"must be a sequence of ids (or None) for that {what}: e.g. "
                f"{argument}=[[{ids!r}], ...], one list per {what}."
            )
        entries.append(np.asarray(ids).reshape(-1))
    return entries


# Ids per window of the two-level search (see `sorted_slots`), and the size from which
# it is used.
_WINDOW = 64
_TWO_LEVEL_FROM = 1 << 15
_SAMPLES: dict[int, tuple[weakref.ref[np.ndarray], np.ndarray]] = {}


def sorted_slots(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`searchsorted(sorted_ids, values)`, clipped to the last slot.

    What costs here is reading `sorted_ids` out of cache (an index's ids are
    looked up between other work). A plain binary search of 1,000 ids in 10^6
    touches about 20 scattered cache lines per id. From `_TWO_LEVEL_FROM` ids
    on, the search runs in two levels: in a sample of every 64th id (a
    sixty-fourth of the size, made once per sorted array and kept while it
    lives), then within the 64 ids of the window found, all values at once
    (7 vectorised halvings over one or two cache lines each). Measured on
    1,000 random ids in 10^6, caches flushed: median 0.25 ms against 0.58 ms.
    Smaller arrays take NumPy's search, in sorted order (consecutive searches
    share their first steps).
    """
    count = len(sorted_ids)
    if count < _TWO_LEVEL_FROM:
        order = np.argsort(values, kind="stable")
        slots = np.empty(len(values), dtype="int64")
        slots[order] = np.searchsorted(sorted_ids, values[order])
        return np.minimum(slots, count - 1)
    window = np.searchsorted(_sample(sorted_ids), values).astype("int64")
    low = window * _WINDOW
    high = np.minimum(low + _WINDOW, count)
    for _ in range(_WINDOW.bit_length()):  # lower bound in [low, high)
        middle = (low + high) >> 1
        below = sorted_ids[np.minimum(middle, count - 1)] < values
        below &= middle < high
        low = np.where(below, middle + 1, low)
        high = np.where(below, high, middle)
    return np.minimum(low, count - 1)


def _sample(sorted_ids: np.ndarray) -> np.ndarray:
    """The last id of each window of `sorted_ids`, made once per array (weakly keyed)."""
    key = id(sorted_ids)
    found = _SAMPLES.get(key)
    if found is not None and found[0]() is sorted_ids:
        return found[1]
    sample = np.ascontiguousarray(sorted_ids[_WINDOW - 1 :: _WINDOW])
    if len(sorted_ids) % _WINDOW:
        sample = np.append(sample, sorted_ids[-1:])

    def forget(_: object) -> None:
        _SAMPLES.pop(key, None)

    _SAMPLES[key] = (weakref.ref(sorted_ids, forget), sample)
    return sample


def positions_of(
    table: IdTable,
    ids: Any,
    ignore_unknown: bool,
    flag: str = "ignore_unknown",
    what: str = "ids",
) -> np.ndarray:
    """Positions of `ids` in `table.ids`; -1 for unknown ids when `ignore_unknown`.

    `flag` and `what` name the caller's own argument and input in the error
    (`positions_of(ignore_unknown=...)`, `search(ignore_unknown_exclusions=...)`).
    """
    values = np.asarray(ids).reshape(-1)
    if values.dtype.kind == "b":
        raise ValueError(
            "Candidate ids must be integers or strings, not booleans (True would name id "
            f"1). Received {values[:5].tolist()}"
        )
    if values.dtype == object:
        values = _normalise_ids(values) if len(values) else values.astype("int64")
    indexed = table.ids
    if len(values) and (values.dtype.kind == "U") != (indexed.dtype.kind == "U"):
        raise ValueError(
            f"Ids of dtype {values.dtype} cannot name candidates indexed with ids of "
            f"dtype {indexed.dtype}."
        )
    if len(values) == 0:
        return np.zeros(0, dtype="int64")
    sorted_ids = table.sorted_ids
    slots = sorted_slots(sorted_ids, values)
    positions = np.where(sorted_ids[slots] == values, table.order[slots], -1).astype("int64")
    # After `BruteForceIndex.add`/`remove`: removed ids are -1 in `order`, and ids
    # added since the ids were sorted are in `buffers.added`.
    buffers = getattr(table, "buffers", None)
    if buffers is not None and buffers.added:
        missing = np.flatnonzero(positions < 0)
        get = buffers.added.get
        positions[missing] = [get(value, -1) for value in values[missing].tolist()]
    found = positions >= 0
    if not ignore_unknown and not np.all(found):
        unknown = np.unique(values[~found])[:5].tolist()
        raise ValueError(
            f"{int(np.sum(~found))} {what} are not in the indexed catalogue, e.g. "
            f"{unknown}. Pass {flag}=True to skip them."
        )
    return positions


def exclusions(
    table: IdTable, exclude: Any, num_queries: int, k: int, ignore_unknown: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, positions) of the excluded candidates, deduplicated."""
    num_candidates = len(table.ids)
    rows, positions = [], []
    for row, ids in enumerate(exclusion_lists(exclude, num_queries)):
        if ids is None:
            continue
        found = positions_of(
            table, ids, ignore_unknown, "ignore_unknown_exclusions", "excluded id(s)"
        )
        found = np.unique(found[found >= 0])
        if num_candidates - len(found) < k:
            raise ValueError(
                f"Query {row} excludes {len(found)} of {num_candidates} "
                f"candidates, which leaves fewer than k={k}."
            )
        rows.append(np.full(len(found), row, dtype="int64"))
        positions.append(found)
    if not rows:
        return np.zeros(0, "int64"), np.zeros(0, "int64")
    return np.concatenate(rows), np.concatenate(positions)
