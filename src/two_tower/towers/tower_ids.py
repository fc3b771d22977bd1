"""What a tower declares about its inputs, so the model can check them on the host."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import keras


class IdRange(NamedTuple):
    """Ids in `[low, size)`; `source` names where the bound comes from, for errors.

    `low` is 0 for a table indexed by ids; a tower that hashes its ids
    (`HashedEmbedding`) takes every int64, `IdRange(2**63, ..., low=-2**63)`.
    """

    size: int
    source: str
    low: int = 0


@runtime_checkable
class TowerIds(Protocol):
    """A tower that declares its id range and checks its own features.

    `TwoTowerRetrieval` checks NumPy-like inputs on the host before any compiled
    step, because JAX gathers out-of-range ids silently while TensorFlow and torch
    raise in their own words. It asks the tower through this protocol, never by
    its type, so a new tower only implements these two methods:

    - `id_range()`: the `IdRange` of a tower that maps `[batch]` integer ids to
      `[batch, dim]` (`IdEmbeddingTower`, `SparseEmbedding`; `HashedEmbedding`,
      whose range is every int64, negative ids included); None for a tower
      over a dict of features (`FeatureTower`, `HistoryTower`), whose id feature,
      if any, the model names with `query_id_key` / `candidate_id_key`.
    - `check_feature_ranges(features, where)`: raises `ValueError` on inputs the
      tower would gather out of range; given a bare array, a tower over a dict
      raises saying so. `where` is how the caller names `features`.

    A tower that does not implement it (a custom layer) gets the checks that hold
    for any tower: only negative integer ids raise. Keras' own `Embedding` (alone,
    or first in a `Sequential`) is read through `tower_ids`.

    Example:
        >>> from two_tower.towers.tower_ids import tower_ids
        >>> tower_ids(two_tower.IdEmbeddingTower(50, 8)).id_range()
        IdRange(size=50, source='vocabulary_size', low=0)
        >>> tower_ids(keras.layers.Embedding(7, 4)).id_range().size
        7
    """

    def id_range(self) -> IdRange | None: ...

    def check_feature_ranges(self, features: Any, where: str = "features") -> None: ...


class _KerasEmbedding:
    """`TowerIds` of Keras' own `Embedding`, which cannot implement it itself."""

    def __init__(self, layer: keras.layers.Embedding) -> None:
        self.size = int(layer.input_dim)

    def id_range(self) -> IdRange:
        return IdRange(self.size, "Embedding input_dim")

    def check_feature_ranges(self, features: Any, where: str = "features") -> None:
        del features, where  # its ids are checked against `id_range`


@runtime_checkable
class GrowsTables(Protocol):
    """A tower whose tables can take more ids (see `TwoTowerRetrieval.grow_tables`).

    - `table_sizes()`: the ids its tables take now: an int for a tower over
      one id array (`IdEmbeddingTower`, `SparseEmbedding`, a history tower's
      own table), or feature name -> size for a tower over a dict of features
      (`FeatureTower`; `{}` for a history tower sharing the candidate table).
    - `grow(sizes)`: the same shape, each at least the current size; old rows
      stay as they are and new rows get the table's initializer.

    Keras' own `Embedding` (alone, or first in a `Sequential`) grows through
    `grows_tables`.
    """

    def table_sizes(self) -> int | dict[str, int]: ...

    def grow(self, sizes: Any) -> None: ...


class _GrowingKerasEmbedding:
    """`GrowsTables` of Keras' own `Embedding`."""

    def __init__(self, layer: keras.layers.Embedding) -> None:
        self.layer = layer

    def table_sizes(self) -> int:
        return int(self.layer.input_dim)

    def grow(self, sizes: Any) -> None:
        from two_tower.towers import _table_growth

        current = self.table_sizes()
        new = _table_growth.checked_growth(f"Embedding {self.layer.name!r}", current, sizes)
        if self.layer.built:
            _table_growth.grow_embedding(self.layer, current, new, new)
        self.layer.input_dim = new


def grows_tables(tower: keras.layers.Layer) -> GrowsTables | None:
    """How `tower` grows its tables, or None for a tower that cannot."""
    found: GrowsTables | None = _implementing(tower, GrowsTables, _GrowingKerasEmbedding)
    return found


def _implementing(tower: keras.layers.Layer, protocol: Any, keras_embedding: Any) -> Any:
    """`tower` (or a `Sequential`'s first layer) if it implements `protocol`;
    `keras_embedding(it)` for Keras' own `Embedding`, which cannot; else None."""
    if isinstance(tower, keras.Sequential) and tower.layers:
        tower = tower.layers[0]
    if isinstance(tower, protocol):
        return tower
    if isinstance(tower, keras.layers.Embedding):
        return keras_embedding(tower)
    return None


def declares_ids(tower: keras.layers.Layer) -> TowerIds | None:
    """`tower` itself if it implements `TowerIds`, else None (no look inside a `Sequential`)."""
    return tower if isinstance(tower, TowerIds) else None


def tower_ids(tower: keras.layers.Layer) -> TowerIds | None:
    """What `tower` declares about its inputs, or None for a tower that declares nothing."""
    found: TowerIds | None = _implementing(tower, TowerIds, _KerasEmbedding)
    return found
