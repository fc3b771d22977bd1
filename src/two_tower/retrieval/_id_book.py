"""The ids and attributes of an index that changes in place (`add`, `remove`, `update`).

Shared by `BruteForceIndex` and `FaissIndex`, whose rows live in different
places (chunks, faiss' inverted lists) but whose ids follow one rule: new
candidates go after the last one, and a removed candidate's position is taken
by one of the last ones (ascending holes, ascending movers), so positions stay
`0..candidates-1`.

Each change costs O(candidates changed):

- ids and attributes are kept in buffers with spare room, doubled when full
  (the first change copies them once into such a buffer);
- lookups keep the ids sorted at `index`: a removed id's entry is marked -1 in
  `order`, a moved id's entry gets its new position (`slots` maps a position
  back to its entry), and ids added since are kept in a dict (`added`). When
  that dict passes 1/32 of the catalogue (or 4,096 ids), the ids are sorted
  again: O(candidates log candidates), once per that many adds.

`_candidate_ids.positions_of` reads `order` and `added` (through the table's
`buffers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from two_tower.retrieval import _candidate_ids, _catalogue_store, _filters
from two_tower.retrieval._candidate_ids import IdTable

MERGE_FRACTION = 32  # sort the ids again once the added ones pass 1/32 of the catalogue
MERGE_MINIMUM = 4096


@dataclass
class IdBook:
    """Buffers with spare room, and what finds a position from an id."""

    ids: np.ndarray
    attributes: dict[str, np.ndarray] | None
    order: np.ndarray  # sorted entry -> position; writable: -1 marks a removed id
    slots: np.ndarray  # position -> its id's sorted entry (-1: the id is in `added`)
    added: dict[Any, int] = field(default_factory=dict)
    shares_memory: bool | None = None  # (BruteForceIndex: do its tensors read its chunks?)

    @classmethod
    def of(
        cls, ids: np.ndarray, order: np.ndarray, attributes: dict[str, np.ndarray] | None
    ) -> IdBook:
        """A book for an index's ids (argsort `order`): one copy of each, with room."""
        rows = len(ids)
        rooms = None
        if attributes is not None:
            rooms = {name: _room(values, rows) for name, values in attributes.items()}
        return cls(
            ids=_room(ids, rows),
            attributes=rooms,
            order=np.array(order, copy=True),
            slots=_inverse(order, rows),
        )

    def append(self, count: int, ids: np.ndarray, attributes: dict[str, np.ndarray] | None) -> None:
        """`ids` (new, checked) and their `attributes` after the first `count`."""
        total = count + len(ids)
        self.ids = _fit(self.ids, count, total, ids)
        self.ids[count:total] = ids
        self.slots = _fit(self.slots, count, total, self.slots[:0])
        self.slots[count:total] = -1  # in `added`
        if self.attributes is not None:
            assert attributes is not None
            for name, values in attributes.items():
                self.attributes[name] = _fit(self.attributes[name], count, total, values)
                self.attributes[name][count:total] = values
        self.added.update(zip(ids.tolist(), range(count, total), strict=True))

    def remove(self, positions: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids at `positions` (unique) removed from the first `count`; returns
        `(holes, movers)`: the positions that the rows at `movers` now take."""
        holes, movers = moves(positions, count)
        gone = self.ids[positions]
        slots = self.slots[positions]
        self.order[slots[slots >= 0]] = -1
        for value in gone[slots < 0].tolist():
            del self.added[value]
        moved_ids = self.ids[movers]
        self.ids[holes] = moved_ids
        if self.attributes is not None:
            for values in self.attributes.values():
                values[holes] = values[movers]
        slots = self.slots[movers]
        self.slots[holes] = slots
        self.order[slots[slots >= 0]] = holes[slots >= 0]
        for value, hole in zip(moved_ids[slots < 0].tolist(), holes[slots < 0].tolist(),
                               strict=True):  # fmt: skip
            self.added[value] = hole
        return holes, movers

    def lookup(self, rows: int, sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(order, sorted_ids)` for `rows` candidates: as they are, or sorted again
        once the ids added since the last sort are too many."""
        if len(self.added) <= max(MERGE_MINIMUM, rows // MERGE_FRACTION):
            return self.order, sorted_ids
        ids = self.ids[:rows]
        order = np.argsort(ids, kind="stable")
        self.order, self.slots, self.added = order, _inverse(order, rows), {}
        return order, ids[order]

    def attribute_views(self, rows: int) -> dict[str, np.ndarray] | None:
        if self.attributes is None:
            return None
        return {name: values[:rows] for name, values in self.attributes.items()}


def moves(positions: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`(holes, movers)` when the rows at `positions` (unique) leave the first `count`:
    the rows at `movers` (the last ones kept, ascending) take the `holes` (the
    removed positions below the new count, ascending)."""
    remaining = count - len(positions)
    holes = np.sort(positions[positions < remaining])
    staying = np.ones(count - remaining, dtype=bool)  # the tail rows that stay
    staying[positions[positions >= remaining] - remaining] = False
    return holes, remaining + np.flatnonzero(staying)  # as many movers as holes


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


# Checks of what `add`, `remove` and `update` receive, before anything changes.


def change_positions(table: IdTable, ids: Any, ignore_unknown: bool, method: str) -> np.ndarray:
    """Positions of `ids` for `remove`/`update`: each id once."""
    if isinstance(ids, (str, bytes)) or np.ndim(ids) != 1:
        raise ValueError(f"`{method}` takes a 1D sequence of candidate ids. Received {ids!r:.80}")
    values = np.asarray(ids)
    # Repeats by one argsort (a stable sort of a few thousand ids takes microseconds;
    # `np.unique` took a twentieth of a whole `remove` at 10^6 candidates).
    ordered = values[np.argsort(values, kind="stable")] if values.dtype != object else values
    repeated = ordered[1:][ordered[1:] == ordered[:-1]] if values.dtype != object else None
    if repeated is None and len(values) != len(np.unique(values)):
        unique, counts = np.unique(values, return_counts=True)
        repeated = unique[counts > 1]
    if repeated is not None and len(repeated):
        raise ValueError(f"`{method}` got ids more than once: {np.unique(repeated)[:5].tolist()}")
    return _candidate_ids.positions_of(
        table, values, ignore_unknown, "ignore_unknown", f"id(s) to {method}"
    )


def new_rows(
    dim: int, dtype: Any, embeddings: Any, what: str, count: int | None = None
) -> np.ndarray:
    """`embeddings` for `what` (`add`, `update`): finite, `dim` columns, at least one
    row (`count` of them if given: one per id), cast to `dtype`."""
    array = _catalogue_store.checked_block(embeddings, 0, None)
    if array.shape[1] != dim:
        raise ValueError(
            f"`{what}` received embeddings of dim {array.shape[1]}; the index holds dim {dim}."
        )
    if array.shape[0] == 0:
        raise ValueError(f"`{what}` received no rows: pass at least one.")
    if count is not None and len(array) != count:
        raise ValueError(
            f"`{what}` needs one embedding row per id: {count} ids, {len(array)} rows."
        )
    return np.asarray(array, dtype=dtype)


def new_ids(table: IdTable, candidate_ids: Any, rows: int) -> np.ndarray:
    """`candidate_ids` for `add`: one per row, unique, of the indexed kind, new."""
    if candidate_ids is None:
        raise ValueError("`add` needs `candidate_ids`: one new id per row.")
    ids = _candidate_ids.checked_ids(candidate_ids, rows).ids
    if (ids.dtype.kind == "U") != (table.ids.dtype.kind == "U"):
        raise ValueError(
            f"The index holds ids of dtype {table.ids.dtype}; `add` received ids of "
            f"dtype {ids.dtype}."
        )
    ids = _as_dtype(ids, table.ids.dtype, "The ids to add")
    known = _candidate_ids.positions_of(table, ids, True) >= 0
    if known.any():
        raise ValueError(
            f"{int(known.sum())} ids to add are already indexed, e.g. "
            f"{ids[known][:5].tolist()}: `update` changes their embeddings."
        )
    return ids


def new_attributes(
    indexed: Mapping[str, np.ndarray] | None, attributes: Mapping[str, Any] | None, rows: int
) -> dict[str, np.ndarray] | None:
    """`attributes` for `add`: the `indexed` names, one value per row, the same kinds."""
    if indexed is None:
        if attributes is not None:
            raise ValueError(
                "The index has no attributes, so `add` takes none: index the catalogue "
                "again with `attributes` to filter on them."
            )
        return None
    if attributes is None or set(attributes) != set(indexed):
        given = None if attributes is None else sorted(attributes)
        raise ValueError(
            f"`add` needs a value per new row for each indexed attribute "
            f"{sorted(indexed)}. Received {given}"
        )
    checked = _filters.checked_attributes(attributes, rows)
    assert checked is not None
    for name, values in checked.items():
        kinds = {"b": "booleans", "i": "numbers", "u": "numbers", "f": "numbers",
                 "U": "strings"}  # fmt: skip
        old, new = indexed[name].dtype, values.dtype
        same = kinds[old.kind] == kinds[new.kind] and (old.kind == "f") == (new.kind == "f")
        if not same:
            raise ValueError(
                f"Attribute {name!r} holds {old}; `add` received {new}. Give values of "
                "the same kind, or index the catalogue again to change it."
            )
        checked[name] = _as_dtype(values, old, f"Attribute {name!r}'s new values")
    return checked


def _as_dtype(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Integers in the indexed integer `dtype` (int64 with uint64 would make floats of
    both, and two ids one), refused if they do not fit; other kinds as they are."""
    if values.dtype.kind not in "iu" or dtype.kind not in "iu" or values.dtype == dtype:
        return values
    bounds = np.iinfo(dtype)
    if len(values) and (int(values.min()) < bounds.min or int(values.max()) > bounds.max):
        raise ValueError(
            f"{what} range from {int(values.min())} to {int(values.max())}, beyond the "
            f"indexed {dtype} ({bounds.min} to {bounds.max})."
        )
    return values.astype(dtype)
