"""Host-side checks of what users pass to `TwoTowerRetrieval`, before any step runs.

Each check raises the same `ValueError` on every backend, naming the argument,
what was received and what was expected. Without them the backends disagree:
JAX clamps out-of-range gathers silently (TensorFlow and torch raise, each in its
own words), an Embedding casts 1.5 to 1 and -1.0 to the last row, and Keras'
data adapters fail on empty or ragged arrays with errors from deep inside.

Only NumPy-like inputs (arrays, lists, tuples) are checked; tf.data datasets,
generators and `keras.utils.PyDataset`s are passed through unchecked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

if TYPE_CHECKING:
    from two_tower.two_tower_retrieval import TwoTowerRetrieval

QUERY = "query"
CANDIDATE = "candidate"
SAMPLING_PROBABILITY = "candidate_sampling_probability"
PAIR_KEYS = (QUERY, CANDIDATE)


def is_pair(inputs: Any) -> bool:
    """Whether `inputs` is `{"query": ..., "candidate": ...}` (plus the logQ entry)."""
    if not isinstance(inputs, Mapping):
        return False
    keys = set(inputs.keys())
    return {QUERY, CANDIDATE} <= keys <= {QUERY, CANDIDATE, SAMPLING_PROBABILITY}


def _is_array_like(values: Any) -> bool:
    return isinstance(values, (np.ndarray, list, tuple))


def check_finite(values: Any, what: str) -> None:
    """Raises before training when NumPy-like values hold NaN or infinity."""
    if not _is_array_like(values):
        return
    array = np.asarray(values)
    if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array.reshape(-1)))
        raise ValueError(
            f"{what} contain {bad.size} NaN or infinite value(s), first at flat "
            f"position {bad[0]}. Clean or drop those rows before training."
        )


def id_limit(model: TwoTowerRetrieval, side: str) -> tuple[int, str] | None:
    """The exclusive upper bound of `side`'s ids, and where it comes from.

    None when the tower is not known to take ids (a custom tower may take
    anything); then only negative integers are refused.
    """
    from two_tower.id_embedding_tower import IdEmbeddingTower

    tower = model.query_tower if side == QUERY else model.candidate_tower
    if isinstance(tower, keras.Sequential) and tower.layers:
        tower = tower.layers[0]
    if isinstance(tower, keras.layers.Embedding):
        return int(tower.input_dim), f"the {side} tower's Embedding input_dim"
    if isinstance(tower, IdEmbeddingTower):
        return tower.vocabulary_size, f"the {side} tower's vocabulary_size"
    if side == CANDIDATE and model.catalogue_size is not None:
        return model.catalogue_size, "catalogue_size"
    return None


def check_ids(model: TwoTowerRetrieval, features: Any, side: str, argument: str) -> Any:
    """Checks `side`'s ids in `features`; returns the features with float ids as int64.

    The ids are the features themselves (an id tower), or the `query_id_key` /
    `candidate_id_key` feature of a dict. Where the tower is known to take ids
    (an Embedding, an `IdEmbeddingTower`, or the id key of a dict), ids must be
    integers, or floats with integer values (3.0 is accepted as 3; 1.5, NaN and
    strings raise), and lie in the tower's range. For other towers only negative
    integers raise.

    Args:
        model: the model whose towers take the features.
        features: an array-like, or a dict of them.
        side: "query" or "candidate".
        argument: how the caller named `features` in the error, e.g. "`queries`".

    Returns:
        `features`, with integer-valued float ids converted to int64 (a new dict
        for dict features; the input is not modified).

    Raises:
        ValueError: on ids that are strings, booleans, non-integer floats, or out
            of range.
    """
    key = model.candidate_id_key if side == CANDIDATE else model.query_id_key
    limit = id_limit(model, side)
    if isinstance(features, Mapping):
        if key is None or key not in features:
            return features
        ids, is_id, where = features[key], True, f"{argument}[{key!r}]"
    else:
        ids, is_id, where = features, limit is not None, argument
    if not _is_array_like(ids):
        return features
    array = np.asarray(ids)
    name = side.capitalize()
    if array.dtype.kind not in "iu":
        if not is_id or array.size == 0:
            return features
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            whole = finite & (array == np.round(np.where(finite, array, 0)))
            if not np.all(whole):
                position = int(np.flatnonzero(~whole.reshape(-1))[0])
                raise ValueError(
                    f"{name} ids in {where} must be integers. Received {array.dtype} ids "
                    f"with non-integer values, e.g. {array.reshape(-1)[position].item()!r} at flat "
                    f"position {position}. Integer-valued floats (3.0) are accepted."
                )
            if np.any(np.abs(array) >= 2.0**62):
                array = np.clip(array, -(2.0**62), 2.0**62)  # reported as out of range below
            array = array.astype("int64")
        else:
            kind = {"U": "strings", "S": "bytes", "O": "objects", "b": "booleans"}.get(
                array.dtype.kind, array.dtype.kind
            )
            raise ValueError(
                f"{name} ids in {where} must be integer indices "
                f"{_range_text(limit)}. Received {kind} (dtype {array.dtype}). Map raw "
                "ids to indices first, e.g. with two_tower.Vocabulary."
            )
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or (limit is not None and high >= limit[0]):
            raise ValueError(
                f"{name} ids must lie in {_range_text(limit)}. Received ids from {low} "
                f"to {high} in {where}."
            )
    if array is ids or np.asarray(ids).dtype.kind in "iu":
        return features
    if isinstance(features, Mapping):
        return {**features, key: array}
    return array


def _range_text(limit: tuple[int, str] | None) -> str:
    return f"[0, {limit[0]}) ({limit[1]})" if limit else "[0, ...)"


def _leaves(structure: Any, name: str) -> list[tuple[str, Any]]:
    """(name, value) of every array-like leaf, named like `x['query']['age']`."""
    if isinstance(structure, Mapping):
        named: list[tuple[str, Any]] = []
        for key, value in structure.items():
            named.extend(_leaves(value, f"{name}[{key!r}]"))
        return named
    return [(name, structure)] if _is_array_like(structure) else []


def check_rows(what: str, named_inputs: list[tuple[str, Any]]) -> int | None:
    """All array-like inputs have the same number of rows, at least one.

    Args:
        what: the caller, for the message ("fit", "evaluate").
        named_inputs: (name, structure) pairs; leaves of dict structures are
            checked too.

    Returns:
        The common number of rows, or None when no input is array-like.

    Raises:
        ValueError: on 0-dimensional or empty inputs, or different row counts.
    """
    rows: dict[str, int] = {}
    for name, structure in named_inputs:
        for leaf_name, leaf in _leaves(structure, name):
            shape = np.shape(leaf)
            if not shape:
                raise ValueError(
                    f"{leaf_name} must be an array with one row per pair. Received a "
                    f"scalar: {leaf!r}"
                )
            rows[leaf_name] = shape[0]
    if not rows:
        return None
    empty = [name for name, count in rows.items() if count == 0]
    if empty:
        raise ValueError(
            f"{what} received 0 rows in {', '.join(empty)}: it needs at least one "
            "(query, candidate) pair."
        )
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name}: {count}" for name, count in rows.items())
        raise ValueError(
            f"The inputs to {what} must have one row per (query, candidate) pair, the "
            f"same number in each. Received {counts}."
        )
    return next(iter(rows.values()))


def check_fit_arguments(
    model: TwoTowerRetrieval, what: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Checks `fit` / `evaluate` arguments given as NumPy-like arrays."""
    x: Any = args[0] if args else kwargs.get("x")
    labels = args[1] if len(args) > 1 else kwargs.get("y")
    sample_weight = kwargs.get("sample_weight")
    if sample_weight is not None and labels is None:
        # Keras' array adapter silently drops `sample_weight` when `y` is None.
        raise ValueError(
            "Keras ignores `sample_weight` when `y` is None. To weight softmax "
            "pairs, pass a tf.data.Dataset or generator yielding "
            "(x, None, sample_weight) tuples."
        )
    if isinstance(x, Mapping) and not is_pair(x):
        raise ValueError(
            f"{what} needs x = {{'query': query_features, 'candidate': "
            "candidate_features} (optionally with 'candidate_sampling_probability'): "
            "row i of each is one observed pair. Received x with keys "
            f"{sorted(map(str, x.keys()))}"
        )
    if not is_pair(x):
        return
    check_rows(
        what,
        [
            ("x['query']", x[QUERY]),
            ("x['candidate']", x[CANDIDATE]),
            (f"x[{SAMPLING_PROBABILITY!r}]", x.get(SAMPLING_PROBABILITY)),
            ("y", labels),
            ("sample_weight", sample_weight),
        ],
    )
    check_finite(labels, "labels `y`")
    check_finite(sample_weight, "`sample_weight`")
    check_ids(model, x[QUERY], QUERY, "x['query']")
    check_ids(model, x[CANDIDATE], CANDIDATE, "x['candidate']")
    probability = x.get(SAMPLING_PROBABILITY)
    if _is_array_like(probability):
        probability = np.asarray(probability, dtype="float64")
        if probability.size and not np.all((probability > 0) & (probability <= 1)):
            raise ValueError(
                f"`{SAMPLING_PROBABILITY}` must lie in (0, 1]. Received values "
                f"from {probability.min()} to {probability.max()}"
            )
