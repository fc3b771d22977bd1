"""Growing a model's tables: what each side grows to, and the optimizer state that follows.

Narrow helpers for `TwoTowerRetrieval.grow_tables`: they take a tower, its
vocabularies and an optimizer, never the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from two_tower.distribution import _sharding
from two_tower.preprocessing.vocabulary import Vocabulary
from two_tower.towers import _table_growth
from two_tower.towers.tower_ids import GrowsTables, grows_tables


@dataclass(frozen=True)
class Growth:
    """One side's growth: how its tower grows, from what sizes to what sizes."""

    tower: GrowsTables
    before: int | dict[str, int]
    after: int | dict[str, int]

    def grows(self) -> bool:
        return self.before != self.after


def plan(side: str, tower: keras.layers.Layer, vocabularies: Any, sizes: Any) -> Growth | None:
    """What `side`'s tower grows to, checked in full before anything changes.

    Args:
        side: "query" or "candidate", for errors.
        tower: the side's tower.
        vocabularies: the side's vocabularies (one, a dict, or None).
        sizes: what the caller asked: an int (a tower over one id array), a
            dict of feature name -> size, or None (then the vocabularies'
            sizes, where they match the tower's tables).

    Returns:
        The growth, or None when nothing is asked and nothing can be inferred.

    Raises:
        ValueError: sizes for a tower that cannot grow, of the wrong shape
            (int against dict), for unknown features, or below the current
            sizes; a vocabulary larger than its table can be given no size.
    """
    growing = grows_tables(tower)
    if growing is None:
        if sizes is None:
            return None
        raise ValueError(
            f"The {side} tower ({type(tower).__name__}) cannot grow its tables: implement "
            "`two_tower.towers.tower_ids.GrowsTables` (`table_sizes` and `grow`), or use "
            "IdEmbeddingTower, FeatureTower, SparseEmbedding or keras.layers.Embedding. "
            f"Received {side}={sizes!r}"
        )
    before = growing.table_sizes()
    if sizes is None:
        sizes = _from_vocabularies(before, vocabularies)
        if sizes is None:
            return None
    if isinstance(before, int):
        if isinstance(sizes, Mapping):
            raise ValueError(
                f"The {side} tower takes one id array: pass its new number of ids as an "
                f"integer. Received {side}={sizes!r}"
            )
        after: int | dict[str, int] = _table_growth.checked_growth(
            f"The {side} tower", before, sizes
        )
    else:
        after = _table_growth.checked_sizes(f"The {side} tower", before, sizes)
        after = {name: size for name, size in after.items() if size != before[name]}
        before = {name: before[name] for name in after}  # the features that grow
    growth = Growth(growing, before, after)
    if growth.grows():
        _check_tables(side, tower, after)
    return growth


def _check_tables(side: str, tower: keras.layers.Layer, after: int | dict[str, int]) -> None:
    """Raises, before anything grows, for what would fail halfway: a table that
    cannot grow inside the tower, or a bare table whose new rows a model-parallel
    layout cannot divide (the library's towers pad theirs)."""
    for layer in tower._flatten_layers(include_self=True, recursive=True):  # noqa: SLF001
        table = isinstance(layer, keras.layers.Embedding) or hasattr(layer, "input_dim")
        if (
            table
            and getattr(layer, "built", False)
            and getattr(layer, "embeddings", None) is not None
        ):
            _table_growth.table_variable_name(layer)
            laid_out = getattr(layer.embeddings, "_layout", None) is not None
            if laid_out and keras.distribution.distribution() is None:
                raise ValueError(
                    f"Table {layer.name!r} of the {side} tower is laid out by a "
                    "keras.distribution, which is not active now: grow the tables under it "
                    "(inside `with distribution.scope():`, or after "
                    "`keras.distribution.set_distribution(distribution)`), so that they "
                    "stay sharded."
                )
    multiple = _sharding.model_axis_size()
    padded = getattr(tower, "pads_tables", False)
    if isinstance(after, int) and multiple > 1 and not padded and after % multiple:
        raise ValueError(
            f"The {side} tower's table would have {after} rows, which the model axis "
            f"({multiple} devices) cannot divide. Grow it to a multiple of {multiple}, or "
            "use IdEmbeddingTower, which pads its tables."
        )


def _from_vocabularies(before: int | dict[str, int], vocabularies: Any) -> Any:
    """The vocabularies' sizes in the shape of the tower's tables, or None.

    A table that already holds more ids than its vocabulary keeps its size.
    """
    # A table may already hold more rows than its vocabulary (room left ahead).
    if isinstance(vocabularies, Vocabulary) and isinstance(before, int):
        return max(vocabularies.size, before)
    if isinstance(vocabularies, Mapping) and isinstance(before, dict):
        sizes = {
            name: max(v.size, before[name]) for name, v in vocabularies.items() if name in before
        }
        return sizes or None
    return None


def fresh_optimizer(
    optimizer: Any, variables: list[keras.Variable]
) -> keras.optimizers.Optimizer | None:
    """An unbuilt copy of a built `optimizer` (same class and config), made before
    anything grows so that an optimizer that cannot be copied changes nothing;
    None for no optimizer or one not built yet (it builds over the grown tables).

    Raises:
        ValueError: an optimizer that its config does not rebuild.
    """
    if optimizer is None or not optimizer.built:
        return None
    try:
        fresh = type(optimizer).from_config(optimizer.get_config())
        # A probe over one-row stand-ins: its config must rebuild as many
        # variables, of the same ranks (an option missing from the config, e.g.
        # EMA, would not), before anything grows. Costs no table-sized memory.
        probe = type(optimizer).from_config(optimizer.get_config())
        probe.build(
            [
                keras.Variable(ops.zeros((1,) * len(v.shape), v.dtype), trainable=True)
                for v in variables
            ]
        )
    except Exception as error:  # a custom optimizer's own error, named
        raise ValueError(
            f"The optimizer ({type(optimizer).__name__}) cannot be rebuilt over the grown "
            f"tables from its config ({type(error).__name__}: {error}). Give it a "
            "`get_config` that `from_config` rebuilds it from."
        ) from error
    ranks = [len(v.shape) for v in optimizer.variables]
    if [len(v.shape) for v in probe.variables] != ranks:
        raise ValueError(
            f"The optimizer ({type(optimizer).__name__}) cannot be rebuilt over the grown "
            f"tables: its config rebuilds {len(probe.variables)} variables, it has "
            f"{len(ranks)}. Give it a `get_config` that `from_config` rebuilds it from."
        )
    return fresh


def carried_over(
    optimizer: keras.optimizers.Optimizer,
    fresh: keras.optimizers.Optimizer,
    before: list[keras.Variable],
    after: list[keras.Variable],
) -> keras.optimizers.Optimizer:
    """`fresh` built over the grown variables, `optimizer`'s state carried over.

    Keras optimizers keep one fixed-shape slot per variable (Adam's moments,
    Adagrad's accumulators), so a grown table needs new slots. `fresh` is
    built over `after` (the model's trainable variables, in Keras' order, as
    the old one was over `before`); each of its variables takes the old one's
    value, and a slot of a grown table takes the old rows first and keeps its
    fresh initial value (zeros, or Adagrad's initial accumulator) in the new
    ones. An exponential moving average of the weights (`use_ema`) starts at
    the new rows' values. `iterations` carries over, so learning-rate
    schedules go on; variables excluded from weight decay stay excluded.

    Raises:
        ValueError: when the fresh optimizer's variables do not match the old
            ones but for rows (a custom optimizer with state outside its config).
    """
    # Under mixed precision the optimizer is a `LossScaleOptimizer`: the options
    # below are its inner optimizer's.
    inner, fresh_inner = (getattr(o, "inner_optimizer", o) for o in (optimizer, fresh))
    renamed = {inner._var_key(a): b for a, b in zip(before, after, strict=True)}  # noqa: SLF001
    excluded = getattr(inner, "_exclude_from_weight_decay", None)
    pattern = getattr(inner, "_exclude_from_weight_decay_pattern", None)
    if excluded or pattern is not None:
        # Not in the config: Keras keeps it by variable (`exclude_from_weight_decay`).
        fresh_inner._exclude_from_weight_decay = {  # noqa: SLF001
            fresh_inner._var_key(renamed[key])  # noqa: SLF001
            for key in excluded or ()
            if key in renamed
        }
        fresh_inner._exclude_from_weight_decay_pattern = pattern  # noqa: SLF001
        fresh_inner._exclude_from_weight_decay_cache = {}  # noqa: SLF001
    fresh.build(after)
    old, new = optimizer.variables, fresh.variables
    shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(old, new, strict=False)]
    if len(old) != len(new) or not all(_carries(a, b) for a, b in shapes):
        raise ValueError(
            f"The optimizer ({type(optimizer).__name__}) could not be rebuilt over the grown "
            f"tables: its config rebuilds {len(new)} variables, it had {len(old)}, or their "
            "shapes differ in more than rows. Give it a `get_config` that `from_config` "
            "rebuilds it from."
        )
    for previous, current in zip(old, new, strict=True):
        if tuple(previous.shape) == tuple(current.shape):
            # A copy: JAX's steps donate the new optimizer's buffers, which must
            # not be the old one's.
            current.assign(ops.copy(previous.value))
        else:
            rows = int(previous.shape[0])
            fresh_rows = ops.convert_to_tensor(current.value)[rows:]
            current.assign(ops.concatenate([ops.convert_to_tensor(previous.value), fresh_rows], 0))
    if getattr(fresh_inner, "use_ema", False):
        averages = fresh_inner._model_variables_moving_average  # noqa: SLF001
        for variable, grown, average in zip(before, after, averages, strict=True):
            rows = int(variable.shape[0]) if len(variable.shape) else 0
            if tuple(variable.shape) != tuple(grown.shape):
                value = ops.convert_to_tensor(average.value)[:rows]
                rest = ops.convert_to_tensor(grown.value)[rows:]
                average.assign(ops.concatenate([value, ops.cast(rest, average.dtype)], 0))
    return fresh


def _carries(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a value of shape `before` carries into `after`: equal, or more rows."""
    return before == after or (
        len(before) == len(after) >= 1 and before[1:] == after[1:] and after[0] > before[0]
    )
