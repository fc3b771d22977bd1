"""Filtered search: per-candidate attributes, `where` predicates and `allow` lists.

Everything here runs on the host, in NumPy, once per search call: a `where`
predicate becomes one boolean per candidate, and `allow` lists become (query
row, position) pairs, as exclusions do (`_candidate_ids.exclusions`). The
compiled step then gives every candidate a query may not return a score of
`-inf`, chunk by chunk, so memory stays that of the unfiltered search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from two_tower.retrieval import _candidate_ids
from two_tower.retrieval._candidate_ids import IdTable

RANGE_KEYS = ("min", "max")


def checked_attributes(attributes: Any, num_rows: int) -> dict[str, np.ndarray] | None:
    """`attributes` as our own `{name: [num_rows] array}` copies, or None.

    Raises:
        ValueError: not a mapping of names to one value per candidate; a name
            that is not a non-empty string; values that are not booleans,
            numbers or strings, or floats that are NaN.
    """
    if attributes is None:
        return None
    if not isinstance(attributes, Mapping) or not attributes:
        raise ValueError(
            "`attributes` must be a non-empty dict {name: one value per candidate}, e.g. "
            f"{{'category': [...], 'in_stock': [...]}}. Received {attributes!r:.80}"
        )
    checked: dict[str, np.ndarray] = {}
    for name, values in attributes.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Attribute names must be non-empty strings. Received {name!r}")
        if isinstance(values, np.ndarray) and values.dtype != object:
            array = np.array(values, copy=True)
        else:  # (NumPy would make strings of a list of numbers and strings)
            array = _one_kind_or_raise(np.array(values, dtype=object), name)
        if array.ndim != 1 or len(array) != num_rows:
            raise ValueError(
                f"Attribute {name!r} must hold one value per candidate: shape ({num_rows},). "
                f"Received shape {array.shape}"
            )
        if array.dtype.kind not in "biufU":
            raise ValueError(
                f"Attribute {name!r} must be booleans, numbers or strings. Received dtype "
                f"{array.dtype}"
            )
        if array.dtype.kind == "f" and np.isnan(array).any():
            raise ValueError(
                f"Attribute {name!r} holds NaN, which no condition could match. Give missing "
                "values a value of their own (e.g. -1, or a flag attribute)."
            )
        array.flags.writeable = False  # shared by concurrent searches
        checked[name] = array
    return checked


def _one_kind_or_raise(array: np.ndarray, name: str) -> np.ndarray:
    values = array.reshape(-1).tolist()
    kinds = {_kind(value) for value in values}
    if len(kinds) <= 1 and "" not in kinds:
        converted = np.array(values).reshape(array.shape) if values else np.zeros(array.shape)
        if converted.dtype == object:  # integers beyond int64
            raise ValueError(f"Attribute {name!r} holds integers beyond the int64 range.")
        return converted
    names = sorted({type(value).__name__ for value in values})
    raise ValueError(
        f"Attribute {name!r} must be all booleans, all numbers or all strings. Received "
        f"{'a mix of ' if len(kinds) > 1 else ''}{names}"
    )


def _kind(value: Any) -> str:
    """'b', 'n' (number) or 'U' for a condition value; '' for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return "b"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "n"
    if isinstance(value, str):
        return "U"
    return ""


def _attribute_kind(values: np.ndarray) -> str:
    return {"b": "b", "U": "U"}.get(values.dtype.kind, "n")


_KIND_NAMES = {"b": "booleans", "n": "numbers", "U": "strings"}


def where_mask(
    attributes: Mapping[str, np.ndarray] | None, where: Any, num_rows: int
) -> np.ndarray | None:
    """`[num_rows]` booleans: the candidates that meet every condition of `where`.

    Conditions, AND-ed: `name: value` (equal), `name: [v1, v2, ...]` (any of
    them; a list, tuple, set or 1D array) and `name: {"min": a, "max": b}`
    (a numeric range, both ends included, either end optional).

    Raises:
        ValueError: `where` is not a non-empty dict; no attributes were indexed;
            an unknown attribute; a condition of another kind than the
            attribute's values (a string for numbers, a number for booleans,
            ...); a malformed range or an empty list.
    """
    if where is None:
        return None
    if not isinstance(where, Mapping) or not where:
        raise ValueError(
            "`where` must be a non-empty dict {attribute: condition}, e.g. "
            "{'category': 3, 'in_stock': True, 'price': {'max': 20.0}}. "
            f"Received {where!r:.80}"
        )
    if not attributes:
        raise ValueError(
            "`where` filters on candidate attributes, but none were indexed: pass "
            "`attributes={name: one value per candidate}` when indexing."
        )
    mask = np.ones(num_rows, dtype=bool)
    for name, condition in where.items():
        if name not in attributes:
            raise ValueError(
                f"`where` names attribute {name!r}, which was not indexed. Indexed "
                f"attributes: {sorted(attributes)}"
            )
        values = attributes[name]
        mask &= _condition_mask(name, values, condition)
    return mask


def _condition_mask(name: str, values: np.ndarray, condition: Any) -> np.ndarray:
    kind = _attribute_kind(values)
    expected = _KIND_NAMES[kind]
    if isinstance(condition, Mapping):
        unknown = set(condition) - set(RANGE_KEYS)
        if not condition or unknown or kind != "n":
            raise ValueError(
                f"`where[{name!r}]`: a range is {{'min': a, 'max': b}} (either end optional) "
                f"on a numeric attribute; {name!r} holds {expected}. Received {condition!r}"
            )
        mask = np.ones(len(values), dtype=bool)
        for key, compare in (("min", np.greater_equal), ("max", np.less_equal)):
            if key in condition:
                bound = condition[key]
                if _kind(bound) != "n" or not math.isfinite(float(bound)):
                    raise ValueError(
                        f"`where[{name!r}][{key!r}]` must be a finite number. Received {bound!r}"
                    )
                mask &= compare(values, _comparable(bound, values))
        return mask
    if isinstance(condition, (list, tuple, set, frozenset, np.ndarray)):
        options = (
            np.asarray(condition).reshape(-1).tolist()
            if isinstance(condition, np.ndarray)
            else list(condition)
        )
        if not options:
            raise ValueError(f"`where[{name!r}]` is an empty list: no candidate could match.")
        wrong = [option for option in options if _kind(option) != kind]
        if wrong:
            raise ValueError(
                f"`where[{name!r}]` must list {expected}, like the attribute's values. "
                f"Received {wrong[:3]!r}"
            )
        return np.isin(values, [_comparable(option, values) for option in options])
    if _kind(condition) != kind:
        raise ValueError(
            f"`where[{name!r}]` must be one of {expected} (equality), a list of them, "
            f"{'or a range {min, max}, ' if kind == 'n' else ''}like the attribute's values. "
            f"Received {condition!r} ({type(condition).__name__})"
        )
    return np.asarray(values == _comparable(condition, values))


def _comparable(value: Any, values: np.ndarray) -> Any:
    """A condition's value as the attribute's values compare with it.

    Floats take the attribute's own float type, as NumPy does with a Python
    float (so 0.2 matches a float32 0.2 whether given as `0.2`, `[0.2]` or
    `np.float64(0.2)`); an integer beyond what an integer attribute holds is
    compared as a float (it matches nothing, and bounds everything).
    """
    if isinstance(value, (bool, np.bool_, str)):
        return value
    if values.dtype.kind == "f":
        with np.errstate(over="ignore"):  # beyond the float type: +-inf, as it compares
            return values.dtype.type(value)
    if values.dtype.kind in "iu" and isinstance(value, (int, np.integer)):
        limits = np.iinfo(values.dtype)
        if not limits.min <= int(value) <= limits.max:
            return float(value)
    return value


def allowed_pairs(
    table: IdTable,
    allow: Any,
    num_queries: int,
    ignore_unknown: bool,
    mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query rows, positions, restricted) of `allow`, within `mask` if given.

    `restricted[q]` is whether query q has an allow-list (an entry that is not
    None); its allowed candidates are exactly its (row, position) pairs.
    """
    entries = _candidate_ids.exclusion_lists(allow, num_queries, argument="allow")
    restricted = np.array([entry is not None for entry in entries], dtype=bool)
    rows, positions = [], []
    for row, ids in enumerate(entries):
        if ids is None:
            continue
        found = _candidate_ids.positions_of(
            table, ids, ignore_unknown, "ignore_unknown_exclusions", "allowed id(s)"
        )
        found = np.unique(found[found >= 0])
        if mask is not None:
            found = found[mask[found]]
        rows.append(np.full(len(found), row, dtype="int64"))
        positions.append(found)
    if not rows:
        return np.zeros(0, "int64"), np.zeros(0, "int64"), restricted
    return np.concatenate(rows), np.concatenate(positions), restricted


def candidate_subset(
    mask: np.ndarray | None, allowed: tuple[np.ndarray, np.ndarray, np.ndarray] | None
) -> np.ndarray | None:
    """Sorted positions that some query of the call may return, or None for all.

    Every query is held to `mask`, if given; when every query has an allow-list,
    to the union of those lists too (which `allowed_pairs` already cut to `mask`).
    """
    if allowed is not None and len(allowed[2]) and allowed[2].all():
        return np.unique(allowed[1])
    if mask is not None:
        return np.flatnonzero(mask)
    return None


def within(
    pairs: tuple[np.ndarray, np.ndarray], subset: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, positions) pairs whose positions are in sorted `subset`, as its indices."""
    rows, positions = pairs
    slots = np.minimum(np.searchsorted(subset, positions), max(len(subset) - 1, 0))
    inside = subset[slots] == positions if len(subset) else np.zeros(len(positions), bool)
    return rows[inside], slots[inside]


def write_attributes(file: Any, attributes: Mapping[str, np.ndarray]) -> None:
    """Writes `attributes` to `file` (a path or an open binary file) as an `.npz`:
    names and values side by side, so that any name is fine."""
    names = list(attributes)
    arrays = {f"values_{i}": attributes[name] for i, name in enumerate(names)}
    arrays["names"] = np.array(names, dtype=str)
    np.savez(file, allow_pickle=False, **arrays)


def read_attributes(file: Any) -> dict[str, np.ndarray]:
    """The attributes `write_attributes` wrote (unchecked: pass them to `checked_attributes`).

    Raises:
        ValueError: `file` is not such an `.npz` (damaged, or another file).
    """
    try:
        with np.load(file, allow_pickle=False) as stored:
            names = stored["names"].tolist()
            return {str(name): stored[f"values_{i}"] for i, name in enumerate(names)}
    except (ValueError, OSError, KeyError, EOFError, TypeError) as error:
        raise ValueError(f"not a readable attributes file ({error})") from error
