"""Host-side checks of what users pass to `TwoTowerRetrieval`, before any step runs.

Each check raises the same `ValueError` on every backend, naming the argument,
what was received and what was expected. Without them the backends disagree:
JAX gathers out-of-range ids silently, as NaN rows or (negative ids) rows wrapped
from the end (TensorFlow and torch raise, each in its own words), an Embedding
casts 1.5 to 1 and -1.0 to the last row, and Keras' data adapters fail on empty or
ragged arrays with errors from deep inside.

Only NumPy-like inputs (arrays, lists, tuples) are checked; tf.data datasets,
generators and `keras.utils.PyDataset`s are passed through unchecked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from two_tower.distribution import _sharding
from two_tower.metrics.factorized_top_k import FactorizedTopK
from two_tower.models.retrieval_outputs import (
    CANDIDATE,
    QUERY,
    SAMPLING_PROBABILITY,
    is_pair,
)
from two_tower.towers.tower_ids import declares_ids, tower_ids


@dataclass(frozen=True)
class TowerSide:
    """One side of a model as the id checks see it; they take this, not the model.

    Attributes:
        name: "query" or "candidate".
        tower: the side's tower.
        id_key: the feature holding the ids when the tower takes a dict, or None.
        catalogue_size: the candidates' `catalogue_size` (the catalogue losses and
            metrics embed ids below it); None on the query side.
    """

    name: str
    tower: keras.layers.Layer
    id_key: str | None
    catalogue_size: int | None = None


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


def id_limit(side: TowerSide) -> tuple[int, str] | None:
    """The exclusive upper bound of `side`'s ids, and where it comes from.

    None when the tower is not known to take ids (a custom tower may take
    anything); then only negative integers are refused.
    """
    limit = tower_id_limit(side.tower, side.name)
    catalogue_size = side.catalogue_size
    if catalogue_size is not None and (limit is None or catalogue_size < limit[0]):
        # The catalogue losses and metrics embed ids 0..catalogue_size-1 only.
        return catalogue_size, "catalogue_size"
    return limit


def tower_id_limit(tower: keras.layers.Layer, side: str) -> tuple[int, str] | None:
    """The id range a tower declares (`two_tower.towers.tower_ids`), or None."""
    declared = tower_ids(tower)
    bound = None if declared is None else declared.id_range()
    return None if bound is None else (bound.size, f"the {side} tower's {bound.source}")


def tower_lowest_id(tower: keras.layers.Layer) -> int:
    """The lowest id a tower declares (`IdRange.low`): 0, or below for a hashing tower."""
    declared = tower_ids(tower)
    bound = None if declared is None else declared.id_range()
    return 0 if bound is None else bound.low


def lowest_id(tower: keras.layers.Layer, features: Any, side: TowerSide) -> int:
    """The lowest id the tower takes: below 0 for a tower that hashes its ids (and
    takes them as the whole input, with no catalogue of candidate rows)."""
    if isinstance(features, Mapping) or side.catalogue_size is not None:
        return 0
    return tower_lowest_id(tower)


def check_ids(side: TowerSide, features: Any, argument: str) -> Any:
    """Checks `side`'s ids, then any feature ranges the tower declares (see `_check_ids`)."""
    # The tower itself, not the first layer of a Sequential (which may take other inputs).
    declared = declares_ids(side.tower)
    if declared is not None and declared.id_range() is None and _is_array_like(features):
        # A bare array for a tower that reads a dict: its own message, before the id
        # checks below would read the array as ids. (Batches, a tf.data.Dataset or a
        # PyDataset of dicts, pass: each batch is a dict.)
        declared.check_feature_ranges(features, argument)
    checked = _check_ids(side, features, argument)
    if declared is not None and isinstance(checked, Mapping):
        declared.check_feature_ranges(checked, argument)
    return checked


def predicts_every_position(query_tower: keras.layers.Layer, query_features: Any) -> bool:
    """Whether the query tower returns a query per position for these features.

    A tower says so itself (`SequenceTower.predicts_every_position`); the
    candidates are then `[rows, length]` next items, -1 where padded.
    """
    declared = getattr(query_tower, "predicts_every_position", None)
    return callable(declared) and bool(declared(query_features))


def flat_positions(features: Any, id_key: str | None) -> Any:
    """Per-position candidates on the host: `[rows * length]`, padding (-1) as id 0."""

    def flat(values: Any) -> Any:
        array = np.asarray(values)
        return array.reshape((-1, *array.shape[2:])) if array.ndim >= 2 else array

    flattened = keras.tree.map_structure(flat, features)
    if isinstance(flattened, Mapping):
        if id_key is not None and id_key in flattened:
            flattened = {**flattened, id_key: np.maximum(flattened[id_key], 0)}
        return flattened
    return np.maximum(flattened, 0) if flattened.dtype.kind in "iu" else flattened


def check_position_candidates(side: TowerSide, features: Any, argument: str) -> None:
    """Checks per-position candidates: `[rows, length]` integer ids, -1 where padded."""
    ids = features.get(side.id_key) if isinstance(features, Mapping) else features
    if not _is_array_like(ids):
        return
    array = np.asarray(ids)
    where = argument if not isinstance(features, Mapping) else f"{argument}[{side.id_key!r}]"
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ValueError(
            f"With a query at every position (packed sequence rows), {where} must hold the "
            "next item id at each position: [rows, length] integers, -1 where the row is "
            f"padded. Received shape {array.shape}, dtype {array.dtype}"
        )
    if array.size and int(array.min()) < -1:
        raise ValueError(
            f"Candidate ids in {where} must be ids or -1 (padding). Received {int(array.min())}"
        )
    check_ids(side, flat_positions(features, side.id_key), argument)


def check_candidates(
    query_tower: keras.layers.Layer, query_features: Any, side: TowerSide, features: Any
) -> None:
    """`x['candidate']`'s ids: one per row, or per position when the query tower says so."""
    if predicts_every_position(query_tower, query_features):
        check_position_candidates(side, features, "x['candidate']")
    else:
        check_ids(side, features, "x['candidate']")


def _check_ids(side: TowerSide, features: Any, argument: str) -> Any:
    """Checks `side`'s ids in `features`; returns the features with float ids as int64.

    The ids are the features themselves (an id tower), or the `query_id_key` /
    `candidate_id_key` feature of a dict. Where the tower is known to take ids
    (an Embedding, an `IdEmbeddingTower`, or the id key of a dict), ids must be
    integers, or floats with integer values (3.0 is accepted as 3; 1.5, NaN and
    strings raise), and lie in the tower's range. For other towers only negative
    integers raise.

    Args:
        side: the side whose tower takes the features.
        features: an array-like, or a dict of them.
        argument: how the caller named `features` in the error, e.g. "`queries`".

    Returns:
        `features`, with integer-valued float ids converted to int64 (a new dict
        for dict features; the input is not modified).

    Raises:
        ValueError: on ids that are strings, booleans, non-integer floats, or out
            of range.
    """
    key, tower, limit = side.id_key, side.tower, id_limit(side)
    name = side.name.capitalize()
    if isinstance(features, Mapping):
        if tower_id_limit(tower, side.name) is not None:
            raise ValueError(
                f"The {side.name} tower takes an array of ids, but {argument} is a dict with keys "
                f"{sorted(map(str, features))}. Pass the ids alone, or use a tower over "
                "features (two_tower.FeatureTower)."
            )
        if key is None or key not in features:
            return features
        ids, is_id, where = features[key], True, f"{argument}[{key!r}]"
    else:
        ids, is_id, where = features, limit is not None, argument
    if not _is_array_like(ids):
        return features
    array, converted = np.asarray(ids), False
    takes_id_vectors = isinstance(tower, keras.layers.Embedding) or (
        declares_ids(tower) is not None and tower.id_range() is not None
    )  # the tower itself: a Sequential may reshape its ids (e.g. [batch, 1] and Flatten)
    if takes_id_vectors and not isinstance(features, Mapping) and array.ndim != 1:
        raise ValueError(
            f"{name} ids in {where} must be a 1D array, one id per row: the {side.name} tower "
            f"maps [batch] ids to [batch, dim] embeddings. Received shape {array.shape}"
        )
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
            if np.any(np.abs(array) >= 2.0**53):
                # Past 2**53 a float no longer names one integer: within a table's
                # range that cannot happen (tables are smaller), so this is refused
                # as out of range, or, for a tower that takes any int64 (one that
                # hashes its ids), as inexact.
                big = array.reshape(-1)[int(np.argmax(np.abs(array).reshape(-1)))].item()
                if limit is None or limit[0] > 2**53 or lowest_id(tower, features, side) < 0:
                    raise ValueError(
                        f"{name} ids in {where} are floats as large as {big!r}: past 2**53 "
                        "a float cannot name an integer id exactly. Pass integer (int64) ids."
                    )
                array = np.clip(array, -(2.0**62), 2.0**62)  # reported as out of range below
            array, converted = array.astype("int64"), True
        else:
            kind = {"U": "strings", "S": "bytes", "O": "objects", "b": "booleans"}.get(
                array.dtype.kind, array.dtype.kind
            )
            raise ValueError(
                f"{name} ids in {where} must be integer indices "
                f"{_range_text(limit)}. Received {kind} (dtype {array.dtype}). Map raw "
                "ids to indices first, e.g. with two_tower.Vocabulary."
            )
    lowest = lowest_id(tower, features, side)
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < lowest or (limit is not None and high >= limit[0]):
            raise ValueError(
                f"{name} ids must lie in {_range_text(limit)}. Received ids from {low} "
                f"to {high} in {where}."
            )
    if not converted:
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


def check_rows(what: str, named_inputs: list[tuple[str, Any]]) -> None:
    """All array-like inputs have the same number of rows, at least one.

    Args:
        what: the caller, for the message ("fit", "evaluate").
        named_inputs: (name, structure) pairs; leaves of dict structures are
            checked too.

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


def check_fit_arguments(
    what: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_name: str,
    sides: tuple[TowerSide, TowerSide],
    metrics: Sequence[FactorizedTopK],
) -> None:
    """Checks `fit` / `evaluate` arguments given as NumPy-like arrays.

    Args:
        what: "fit" or "evaluate", for the messages.
        args: the positional arguments, as Keras' `fit` takes them.
        kwargs: the keyword arguments.
        loss_name: the model's loss (`loss="mse"` takes labels, the others do not).
        sides: the model's query and candidate sides, whose ids are checked.
        metrics: the compiled `FactorizedTopK` metrics, whose `num_queries` bound
            the query ids.
    """
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
    batch_size = kwargs.get("batch_size")
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size <= 0
    ):
        raise ValueError(
            f"`batch_size` must be a positive integer (or None). Received: {batch_size!r}"
        )
    if isinstance(x, (tuple, list)):
        raise ValueError(
            f"{what} needs x = {{'query': query_features, 'candidate': candidate_features}}, "
            f"a dict. Received a {type(x).__name__} of {len(x)} items."
        )
    if isinstance(x, Mapping) and not is_pair(x):
        raise ValueError(
            f"{what} needs x = {{'query': query_features, 'candidate': "
            "candidate_features} (optionally with 'candidate_sampling_probability'): "
            "row i of each is one observed pair. Received x with keys "
            f"{sorted(map(str, x.keys()))}"
        )
    from two_tower.datasets.shard_dataset import ShardDataset

    if isinstance(x, ShardDataset):
        _sharding.check_batches(what, x.num_rows, x.batch_size)
    from two_tower.datasets.sequence_dataset import SequenceDataset

    if isinstance(x, SequenceDataset):
        _check_sequence_dataset(x, *sides)
    if loss_name in ("mse", "full_softmax") and (
        (isinstance(x, Mapping) and SAMPLING_PROBABILITY in x)
        or (isinstance(x, ShardDataset) and x.sampling_probability is not None)
        or (isinstance(x, SequenceDataset) and x.sampling_probability)
    ):
        raise ValueError(
            f"`{SAMPLING_PROBABILITY}` (the logQ correction) applies to loss='softmax' "
            f"and 'sampled_softmax', whose negatives are sampled; loss={loss_name!r} "
            "does not use it. Leave it out of x (or the ShardDataset's or "
            "SequenceDataset's `sampling_probability`)."
        )
    if not is_pair(x):
        return
    leaves = keras.tree.flatten(x[QUERY])
    if leaves and _is_array_like(leaves[0]) and np.ndim(leaves[0]):
        rows = len(leaves[0])
        _sharding.check_batches(what, rows, 32 if batch_size is None else int(batch_size))
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
    # Checked here, not only in the step: an error raised inside Keras' JAX step
    # leaves the model's variables emptied (see backends/jax.py).
    if loss_name == "mse" and labels is None:
        raise ValueError("loss='mse' needs labels: pass `y` (e.g. ratings) to fit/evaluate.")
    if loss_name != "mse" and labels is not None:
        raise ValueError(
            f"loss={loss_name!r} takes no labels, but `y` was given. Every pair in x "
            "is a positive; use `sample_weight` to weight pairs."
        )
    for values, label in ((labels, "labels `y`"), (sample_weight, "`sample_weight`")):
        if _is_array_like(values):
            array = np.asarray(values)
            if array.dtype.kind not in "iufb":
                raise ValueError(f"{label} must be numbers. Received dtype {array.dtype}")
            if array.ndim > 2 or (array.ndim == 2 and array.shape[1] != 1):
                raise ValueError(
                    f"{label} must have shape [batch] or [batch, 1], one per pair. "
                    f"Received shape {array.shape}"
                )
    check_finite(labels, "labels `y`")
    check_finite(sample_weight, "`sample_weight`")
    if _is_array_like(sample_weight) and np.any(np.asarray(sample_weight) < 0):
        raise ValueError("`sample_weight` must not be negative: it would maximise the loss.")
    query, candidate = sides
    check_ids(query, x[QUERY], "x['query']")
    if loss_name == "mse" and predicts_every_position(query.tower, x[QUERY]):
        raise ValueError(
            "Per-position training (packed sequence rows) needs a softmax loss; "
            "loss='mse' scores labelled pairs."
        )
    check_candidates(query.tower, x[QUERY], candidate, x[CANDIDATE])
    _check_metric_query_ids(query.id_key, metrics, x[QUERY])
    probability = x.get(SAMPLING_PROBABILITY)
    if _is_array_like(probability):
        probability = np.asarray(probability, dtype="float64")
        if probability.size and not np.all((probability > 0) & (probability <= 1)):
            raise ValueError(
                f"`{SAMPLING_PROBABILITY}` must lie in (0, 1]. Received values "
                f"from {probability.min()} to {probability.max()}"
            )


def _check_sequence_dataset(data: Any, query: TowerSide, candidate: TowerSide) -> None:
    """A `SequenceDataset` fits the towers: its items in their tables, its rows in range.

    Checked once on the host: inside the step, JAX would gather out-of-range
    rows as NaN while TensorFlow and torch raise.
    """
    limits = [id_limit(candidate)]
    table = getattr(query.tower, "item_table", None)
    if table is not None and getattr(table, "input_dim", None) is not None:
        limits.append((int(table.input_dim), "the query tower's item table"))
    for limit in limits:
        if limit is not None and data.max_item >= limit[0]:
            raise ValueError(
                f"The SequenceDataset holds item index {data.max_item}, but {limit[1]} takes "
                f"indices below {limit[0]}. Build the towers for every item of the log."
            )
    width = getattr(query.tower, "max_length", None)
    if isinstance(width, int) and data.max_length > width:
        raise ValueError(
            f"The SequenceDataset's rows have {data.max_length} columns, but the query tower "
            f"takes max_length={width}. Build the dataset with max_length={width}."
        )


def _check_metric_query_ids(
    key: str | None, metrics: Sequence[FactorizedTopK], query_features: Any
) -> None:
    """Query ids (`query_features`, or its `key` feature) in range of every metric's
    `num_queries`."""
    if isinstance(query_features, Mapping):
        query_features = query_features.get(key) if key is not None else None
    if not _is_array_like(query_features):
        return
    ids = np.asarray(query_features)
    if ids.size == 0 or ids.dtype.kind not in "iuf":
        return
    for metric in metrics:
        if metric.num_queries is None:
            continue
        low, high = ids.min(), ids.max()
        if low < 0 or high >= metric.num_queries:
            raise ValueError(
                f"Query ids must lie in [0, {metric.num_queries}) (num_queries of the "
                f"FactorizedTopK metric {metric.name!r}). Received ids from {low} to {high} "
                "in x['query']."
            )


def replace_x(
    args: tuple[Any, ...], kwargs: dict[str, Any], change: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`fit`/`evaluate` arguments with `x` (first positional, or keyword) as `change(x)`."""
    if args:
        return (change(args[0]), *args[1:]), kwargs
    if "x" in kwargs:
        return args, {**kwargs, "x": change(kwargs["x"])}
    return args, kwargs


_CALLBACKS_POSITION = {"fit": 5, "evaluate": 6}  # in Keras' signatures
_VALIDATION_DATA_POSITION = 7  # in Keras' `fit`


def replace_validation_x(
    args: tuple[Any, ...], kwargs: dict[str, Any], change: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`fit` arguments with the `x` of a `(x, y[, sample_weight])` `validation_data`
    as `change(x)`; other validation data (a dataset, None) as it is."""
    position = _VALIDATION_DATA_POSITION
    by_position = len(args) > position
    data = args[position] if by_position else kwargs.get("validation_data")
    if not isinstance(data, tuple) or not data:
        return args, kwargs
    data = (change(data[0]), *data[1:])
    if by_position:
        return (*args[:position], data, *args[position + 1 :]), kwargs
    return args, {**kwargs, "validation_data": data}


_BACKENDS = "two_tower.backends."


def for_backend(
    what: str, args: tuple[Any, ...], kwargs: dict[str, Any], backend: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`fit`/`evaluate` arguments with the backend module's `fit_input(x)` and
    its `loop_callbacks()` after the user's own callbacks."""
    args, kwargs = replace_x(args, kwargs, backend.fit_input)
    extra = backend.loop_callbacks()
    if not extra:
        return args, kwargs
    position = _CALLBACKS_POSITION[what]
    given = args[position] if len(args) > position else kwargs.get("callbacks")
    if isinstance(given, keras.callbacks.CallbackList):
        # `fit` validates with its own list, which has the backend's callbacks already:
        # each once, not once per epoch.
        present = {type(c) for c in given.callbacks if type(c).__module__.startswith(_BACKENDS)}
        extra = [callback for callback in extra if type(callback) not in present]
        given.callbacks.extend(extra)  # Keras' CallbackList keeps them in a list
        callbacks: Any = given
    else:
        callbacks = [*(given or []), *extra]
    if len(args) > position:
        return (*args[:position], callbacks, *args[position + 1 :]), kwargs
    return args, {**kwargs, "callbacks": callbacks}


def lists_as_arrays(structure: Any, argument: str) -> Any:
    """`structure` (a dict, possibly nested) with every Python list made a NumPy array.

    Keras' data adapters refuse lists inside a dict ("Unrecognized data type"). Rows
    of different lengths are named here, instead of NumPy's "inhomogeneous shape".
    """
    if isinstance(structure, Mapping):
        return {
            key: lists_as_arrays(value, f"{argument}[{key!r}]") for key, value in structure.items()
        }
    if not isinstance(structure, list):
        return structure
    try:
        return np.asarray(structure)
    except ValueError as error:
        lengths = sorted({len(row) for row in structure if isinstance(row, (list, tuple))})
        raise ValueError(
            f"{argument} must be a rectangular array. Received a list of rows of lengths "
            f"{lengths[:5]}: pad each row to the same length (with the padding the feature's "
            "tower expects), or pass a NumPy array."
        ) from error


def fit_arguments(
    what: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`fit`/`evaluate` arguments with lists made arrays, and a `ShardDataset` unshuffled.

    Keras' data adapters take arrays but not lists inside a dict ("Unrecognized
    data type"), while `recommend` takes lists; this makes `fit` take them too.

    A `ShardDataset` shuffles its shards and rows itself, seeded. Keras' `fit`
    would also permute its batch order with Keras' own random state (its
    default `shuffle=True`), and only for a `PyDataset`, so the batches would
    differ between backends (TensorFlow reads it through `tf.data`, see
    `backends.tensorflow.shard_stream`). So `fit` takes `shuffle=False` for it,
    and refuses `shuffle=True`.
    """
    from two_tower.datasets.shard_dataset import ShardDataset

    x = args[0] if args else kwargs.get("x")
    if is_pair(x):
        args, kwargs = replace_x(args, kwargs, lambda x: lists_as_arrays(x, "x"))
    elif isinstance(x, ShardDataset) and what == "fit":
        if kwargs.get("shuffle", False):
            raise ValueError(
                "fit(shuffle=True) would reorder a ShardDataset's batches with Keras' own "
                "random state, differently on each backend. A ShardDataset shuffles its "
                "shards and rows itself (ShardDataset(shuffle=..., seed=...)): leave "
                "`shuffle` out or pass shuffle=False."
            )
        kwargs = {**kwargs, "shuffle": False}
    return args, kwargs


def check_structure(spec: Any, features: Any, side: str, argument: str, hint: str = "") -> None:
    """Host-side: a dict where the built tower took an array (`spec`), or the reverse.

    Otherwise each backend fails in its own words inside the compiled call.
    `spec` is None before the tower was first called.
    """
    if spec is None:
        return
    if isinstance(spec, Mapping) and not isinstance(features, Mapping):
        received = np.asarray(features) if isinstance(features, (list, tuple)) else features
        kind = getattr(received, "dtype", type(received).__name__)
        raise ValueError(
            f"{argument} must be a dict of features {sorted(spec)}, as the {side} tower "
            f"takes. Received an array of {kind}.{hint}"
        )
    if not isinstance(spec, Mapping) and isinstance(features, Mapping):
        raise ValueError(
            f"{argument} must be one array, as the {side} tower takes. Received a dict "
            f"of features {sorted(map(str, features))}."
        )


def retrieval_metrics(
    metrics: Any, weighted_metrics: Any, catalogue_size: int | None
) -> list[FactorizedTopK]:
    """`compile`'s metrics, which must all be `FactorizedTopK` with distinct names."""
    if isinstance(metrics, FactorizedTopK):
        metrics = [metrics]
    found = [m for m in metrics or [] if isinstance(m, FactorizedTopK)]
    other_metrics = [m for m in metrics or [] if not isinstance(m, FactorizedTopK)]
    if other_metrics or weighted_metrics:
        raise ValueError(
            "TwoTowerRetrieval takes two_tower.FactorizedTopK metrics only: Keras "
            "metrics compare `y` with one prediction, and this model predicts "
            f"embeddings. Received metrics={metrics!r}"
        )
    if found and catalogue_size is None:
        raise ValueError(
            "FactorizedTopK metrics rank each positive against the whole "
            "catalogue, so the model needs `catalogue_size`. Received "
            "catalogue_size=None"
        )
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise ValueError(f"FactorizedTopK metrics need distinct names. Received: {names}")
    return found
