"""Growing embedding tables in place: more rows, the old rows kept, the new ones initialised.

Keras variables have a fixed shape, so a table grows by replacing its variable
with a larger one (the pattern Keras' own `Embedding.quantize` uses): the new
variable has the old one's path, dtype and trainability, is created in the
active distribution's scope (so a `LayoutMap` shards it as it did the old
one), holds the old rows first, and gives the new rows the layer's own
initializer. The optimizer's state follows in
`two_tower.models._growth`. Growing costs O(table rows) once; training steps
afterwards cost what they did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import keras
from keras import ops

from two_tower.distribution import _sharding


def table_variable_name(layer: keras.layers.Layer) -> str:
    """The attribute holding `layer`'s table: Keras' `Embedding` or `SparseEmbedding`.

    Raises:
        ValueError: another layer, or a Keras `Embedding` that is quantized or
            has LoRA (its table is several variables).
    """
    if isinstance(layer, keras.layers.Embedding):
        if layer.quantization_mode or layer.lora_enabled:
            raise ValueError(
                f"Embedding {layer.name!r} is quantized or has LoRA; only a plain table can "
                "grow. Grow it before quantizing or enabling LoRA."
            )
        return "_embeddings"
    # `SparseEmbedding` (not imported: it imports this module).
    if isinstance(getattr(layer, "embeddings", None), keras.Variable) and hasattr(
        layer, "input_dim"
    ):
        return "embeddings"
    raise ValueError(
        f"Only keras.layers.Embedding and two_tower.SparseEmbedding tables can grow. "
        f"Received {type(layer).__name__} {layer.name!r}."
    )


@contextlib.contextmanager
def _scopes(path: str) -> Iterator[None]:
    """Keras name scopes that make a variable created inside get `path`'s parents
    (hence `path` itself, and under a `LayoutMap` the old variable's layout)."""
    with contextlib.ExitStack() as stack:
        for part in path.split("/")[:-1]:
            stack.enter_context(keras.name_scope(part))
        yield


def grow_embedding(layer: keras.layers.Layer, ids: int, new_ids: int, rows: int) -> None:
    """Gives `layer` a table of `rows` rows: the first `ids` kept, `[ids, new_ids)` new.

    Rows `[ids, new_ids)` are drawn from the layer's initializer (the base one,
    under a sharding pad), drawn for the whole table's shape so that
    initializers scaled by fan-in or fan-out draw at the table's scale; rows
    from `new_ids` on are zero padding that no id reaches (see
    `two_tower.distribution._sharding.pad_tables`). `input_dim` becomes `rows`.
    With `rows` equal to the table's rows the variable is kept (padding rows
    becoming ids). The new variable is made before the old one is let go, so
    a failure (e.g. rows a sharding cannot divide) leaves the layer as it was.

    Args:
        layer: a built `keras.layers.Embedding` or `SparseEmbedding`.
        ids: the ids in use before (rows kept as they are).
        new_ids: the ids in use after.
        rows: the table's rows after, at least `new_ids` and the current rows.
    """
    attribute = table_variable_name(layer)
    old = getattr(layer, attribute)
    current, width = (int(d) for d in old.shape)
    assert ids <= new_ids <= rows and rows >= current
    if new_ids == ids and rows == current:
        return
    initializer = layer.embeddings_initializer
    initializer = getattr(initializer, "base", initializer)  # a sharding pad's base
    parts = [ops.convert_to_tensor(old.value)[:ids]]
    if new_ids > ids:
        parts.append(_drawn(initializer, (rows, width), new_ids - ids, old.dtype))
    if rows > new_ids:
        parts.append(ops.zeros((rows - new_ids, width), dtype=old.dtype))
    value = ops.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if rows == current:
        old.assign(value)
        return
    with _scopes(old.path):
        variable = keras.Variable(
            initializer=value, shape=(rows, width), dtype=old.dtype, trainable=old.trainable,
            name=old.name,
        )  # fmt: skip
    # Keras' Embedding keeps its penalty and constraint on the variable.
    variable.regularizer, variable.constraint = old.regularizer, old.constraint
    tracker = layer._tracker  # noqa: SLF001 (Keras' quantize does the same)
    locked = tracker.locked
    tracker.unlock()
    try:
        delattr(layer, attribute)  # untracks the old variable (torch: its parameter too)
        setattr(layer, attribute, variable)  # tracks the new one
    finally:
        if locked:
            tracker.lock()
    layer.input_dim = rows


def _drawn(initializer: Any, table: tuple[int, int], count: int, dtype: Any) -> Any:
    """`count` rows drawn as `initializer` draws rows of a `table`-shaped variable.

    Keras' fan-scaled initializers (Glorot, He, LeCun: `VarianceScaling`) set
    their scale from the shape they are called with, so rows drawn on their
    own would come at the scale of a `count`-row table; they are drawn with
    the scale the whole table gets, without drawing the whole table.
    """
    if isinstance(initializer, keras.initializers.VarianceScaling):
        # (Glorot's and He's configs hold only the seed: read the attributes.)
        fan_in, fan_out = table
        whole, part = {
            "fan_in": (fan_in, count),
            "fan_out": (fan_out, fan_out),
            "fan_avg": ((fan_in + fan_out) / 2, (count + fan_out) / 2),
        }[initializer.mode]
        initializer = keras.initializers.VarianceScaling(
            scale=initializer.scale * part / whole,
            mode=initializer.mode,
            distribution=initializer.distribution,
        )
    elif not isinstance(
        initializer,
        (keras.initializers.RandomUniform, keras.initializers.RandomNormal,
         keras.initializers.TruncatedNormal, keras.initializers.Zeros,
         keras.initializers.Ones, keras.initializers.Constant),
    ):  # fmt: skip
        # Another shape-dependent initializer (orthogonal, identity...): whole table.
        return ops.cast(initializer(table, dtype=dtype), dtype)[table[0] - count :]
    return ops.cast(initializer((count, table[1]), dtype=dtype), dtype)


def checked_growth(what: str, current: int, new: Any) -> int:
    """`new` as a Python int, at least `current`; raises naming `what` otherwise."""
    if isinstance(new, bool) or not isinstance(new, int) and not hasattr(new, "__index__"):
        raise ValueError(f"{what} must grow to an integer size. Received {new!r}")
    new = int(new)
    if new < current:
        raise ValueError(
            f"{what} can only grow: it has {current} ids, received a size of {new}. "
            "Tables never shrink (retire candidates with the index's `remove`)."
        )
    return new


def checked_sizes(owner: str, current: dict[str, int], sizes: Any) -> dict[str, int]:
    """`sizes` for a tower over a dict of features, checked: a mapping of features
    that have tables (`current`: name -> ids now), each to at least its size.

    Raises:
        ValueError: naming `owner`, for anything else.
    """
    if not isinstance(sizes, Mapping):
        raise ValueError(
            f"{owner} grows by feature: pass a dict of feature name -> new size, for "
            f"features among {sorted(current)}. Received {sizes!r}"
        )
    unknown = sorted(set(sizes) - set(current))
    if unknown:
        raise ValueError(
            f"{owner} has no table for {unknown}. Features with tables: {sorted(current)}"
        )
    return {
        name: checked_growth(f"Feature {name!r}", current[name], size)
        for name, size in sizes.items()
    }


def padded_rows(ids: int, current_rows: int) -> int:
    """Rows for `ids` ids: at least the current rows, rounded up to the model axis."""
    multiple = _sharding.model_axis_size()
    rows = max(ids, current_rows)
    return -(-rows // multiple) * multiple
