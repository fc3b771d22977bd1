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
        if not isinstance(sizes, Mapping):
            raise ValueError(
                f"The {side} tower grows by feature: pass a dict of feature name -> new size, "
                f"for features among {sorted(before)}. Received {side}={sizes!r}"
            )
        unknown = sorted(set(sizes) - set(before))
        if unknown:
            raise ValueError(
                f"The {side} tower has no table for {unknown}. Features with tables: "
                f"{sorted(before)}"
            )
        after = dict(before)
        for name, size in sizes.items():
            after[name] = _table_growth.checked_growth(f"Feature {name!r}", before[name], size)
    return Growth(growing, before, after)


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


def extended_optimizer(
    optimizer: keras.optimizers.Optimizer | None, variables: list[keras.Variable]
) -> keras.optimizers.Optimizer | None:
    """A built `optimizer` rebuilt over `variables`, its state carried over.

    Keras optimizers keep one fixed-shape slot per variable (Adam's moments,
    Adagrad's accumulators), so a grown table needs new slots. A fresh
    optimizer of the same class and config is built over the model's
    variables (in Keras' order, as the old one was); each of its variables
    takes the old one's value, and a slot of a grown table takes the old
    rows first and keeps its fresh initial value (zeros, or Adagrad's
    initial accumulator) in the new ones. `iterations` carries over, so
    learning-rate schedules go on.

    Args:
        optimizer: the model's optimizer (None, or not built: returned as is).
        variables: the model's trainable variables after growing.

    Returns:
        The optimizer to train on with.

    Raises:
        ValueError: an optimizer whose config does not rebuild it with the same
            variables (a custom optimizer without a full `get_config`).
    """
    if optimizer is None or not optimizer.built:
        return optimizer
    fresh = type(optimizer).from_config(optimizer.get_config())
    fresh.build(variables)
    old, new = optimizer.variables, fresh.variables
    shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(old, new, strict=False)]
    if len(old) != len(new) or not all(_carries(a, b) for a, b in shapes):
        raise ValueError(
            f"The optimizer ({type(optimizer).__name__}) could not be rebuilt over the grown "
            f"tables: its config rebuilds {len(new)} variables, it had {len(old)}, or their "
            "shapes differ in more than rows. Give it a `get_config` that `from_config` "
            "rebuilds it from."
        )
    for before, after in zip(old, new, strict=True):
        if tuple(before.shape) == tuple(after.shape):
            # A copy: JAX's steps donate the new optimizer's buffers, which must
            # not be the old one's.
            after.assign(ops.copy(before.value))
        else:
            rows = int(before.shape[0])
            fresh_rows = ops.convert_to_tensor(after.value)[rows:]
            after.assign(ops.concatenate([ops.convert_to_tensor(before.value), fresh_rows], 0))
    return fresh


def _carries(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a value of shape `before` carries into `after`: equal, or more rows."""
    return before == after or (
        len(before) == len(after) >= 1 and before[1:] == after[1:] and after[0] > before[0]
    )
