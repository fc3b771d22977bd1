"""The item table a history tower shares with its model's candidate tower."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.towers import _table_growth


class SharedItemTable:
    """Mixin of the towers that embed a user's past items (`HistoryTower`, `SequenceTower`).

    With `num_items=None` such a tower has no table of its own: `TwoTowerRetrieval`
    hands it the candidate tower's id table (`share_candidate_items`), so a history
    item is embedded by the same row that scores it as a candidate. The table stays
    the candidate tower's: it is kept out of this layer's tracking, so its weights
    are saved, loaded and trained once.

    The tower sets `own_table` (its own `Embedding`, or None) and `embedding_dim`
    in its `__init__`, then calls `_init_shared_table()`.
    """

    own_table: keras.layers.Layer | None
    embedding_dim: int | None
    num_items: int | None
    history_key: str

    @staticmethod
    def _table_arguments(
        num_items: int | None, embedding_dim: int | None, owner: str
    ) -> tuple[int | None, int | None]:
        """`num_items` and `embedding_dim` checked (Python ints); a width for an own table."""
        if num_items is not None:
            num_items = _arguments.integer("num_items", num_items, owner=owner)
        if embedding_dim is not None:
            embedding_dim = _arguments.integer("embedding_dim", embedding_dim, owner=owner)
        if num_items is not None and embedding_dim is None:
            raise ValueError(
                f"{owner}: `embedding_dim` is required with `num_items` (the own table). "
                f"Received: num_items={num_items}, embedding_dim=None"
            )
        return num_items, embedding_dim

    def _init_shared_table(self) -> None:
        object.__setattr__(self, "_shared", None)

    @property
    def item_table(self) -> keras.layers.Layer | None:
        """The layer that embeds history items: the own table or the shared one."""
        if self.own_table is not None:
            return self.own_table
        shared = getattr(self, "_shared", None)
        return None if shared is None else shared[1]

    def _shared_width(self, width: int) -> None:
        """Called once a shared table of `width` columns is set (a tower's own layers)."""

    def share_candidate_items(
        self, candidate_tower: keras.layers.Layer, candidate_id_key: str | None = None
    ) -> None:
        """Takes the candidate tower's id table as the item table (`num_items=None`).

        `TwoTowerRetrieval` calls this when it is given the towers. A tower with
        its own table (`num_items` set) ignores the call.

        Args:
            candidate_tower: an `IdEmbeddingTower`, a `keras.layers.Embedding`,
                or a `FeatureTower` whose `candidate_id_key` feature is
                categorical.
            candidate_id_key: the candidate id feature of a `FeatureTower`.

        Raises:
            ValueError: a candidate tower with no such table, a sparse table,
                or a table whose width is not `embedding_dim`.
        """
        if self.own_table is not None:
            return
        from two_tower.sparse.sparse_embedding import SparseEmbedding
        from two_tower.towers.feature_tower import FeatureTower
        from two_tower.towers.id_embedding_tower import IdEmbeddingTower

        owner = type(self).__name__
        table: Any = None
        if isinstance(candidate_tower, IdEmbeddingTower):
            table = candidate_tower.embedding
        elif isinstance(candidate_tower, keras.layers.Embedding):
            table = candidate_tower
        elif (
            isinstance(candidate_tower, FeatureTower)
            and candidate_id_key is not None
            and candidate_id_key in candidate_tower.categorical
        ):
            table = candidate_tower.embeddings[candidate_id_key]
        if table is None:
            raise ValueError(
                f"{owner}(num_items=None) embeds history items with the candidate tower's "
                "id table: the candidate tower must be an IdEmbeddingTower, a "
                "keras.layers.Embedding, or a FeatureTower with `candidate_id_key` among its "
                f"categorical features. Received {type(candidate_tower).__name__} with "
                f"candidate_id_key={candidate_id_key!r}. Give the {owner} its own table "
                "with `num_items`."
            )
        if isinstance(table, SparseEmbedding):
            raise ValueError(
                f"{owner} cannot share a sparse candidate table (sparse=True): sparse "
                "training updates the rows the candidate tower looks up only. Give the "
                f"{owner} its own table with `num_items`, or use a dense candidate table."
            )
        width = int(table.output_dim)
        if self.embedding_dim is not None and self.embedding_dim != width:
            raise ValueError(
                f"`embedding_dim`={self.embedding_dim} differs from the shared candidate "
                f"table's width {width}. Leave embedding_dim None to use the table's."
            )
        object.__setattr__(self, "_shared", (candidate_tower, table))
        self._shared_width(width)
        pending = getattr(self, "_pending_build", None)
        if pending is not None:  # (deserialization marks the tower built regardless)
            object.__setattr__(self, "_pending_build", None)
            keras.layers.Layer.build_from_config(self, pending)

    def build_from_config(self, config: dict[str, Any]) -> None:
        # Loading a model deserializes this tower before `TwoTowerRetrieval`
        # hands it the candidate table: the build waits for the table.
        if self.item_table is None:
            object.__setattr__(self, "_pending_build", config)
            return
        keras.layers.Layer.build_from_config(self, config)

    def table_sizes(self) -> dict[str, int]:
        """`{history_key: num_items}` for an own table; `{}` when the candidate
        tower's is shared (it grows with that tower)."""
        num_items = self.num_items
        if self.own_table is None or num_items is None:
            return {}
        return {self.history_key: num_items}

    def grow(self, num_items: int | Mapping[str, int]) -> None:
        """Gives the own item table `num_items` ids: old rows kept, new rows initialised.

        A shared table (`num_items=None`) is the candidate tower's: it grows
        with that tower, and this one reads the new rows (`grow({})` does
        nothing). A model's optimizer state must follow: grow through
        `TwoTowerRetrieval.grow_tables` (with `{history_key: size}`, or the
        model's vocabulary of the history feature).

        Args:
            num_items: the new number of items, or `{history_key: it}`.

        Raises:
            ValueError: a size below the current one, another feature, or a
                size for a shared table. Nothing grows then.
        """
        owner = f"{type(self).__name__} {self.name!r}"  # type: ignore[attr-defined]
        current = self.table_sizes()
        sizes = dict(num_items) if isinstance(num_items, Mapping) else None
        if sizes == {}:
            return
        if not current:
            raise ValueError(
                f"{owner} shares the candidate tower's item table (num_items=None): grow the "
                "candidate tower (`TwoTowerRetrieval.grow_tables(candidate=...)`) and this "
                f"tower reads its new rows. Received {num_items!r}"
            )
        if sizes is not None and set(sizes) != {self.history_key}:
            raise ValueError(
                f"{owner} has one item table, for {self.history_key!r}. Received {num_items!r}"
            )
        before = current[self.history_key]
        new = _table_growth.checked_growth(
            owner, before, num_items if sizes is None else sizes[self.history_key]
        )
        table = self.own_table
        assert table is not None
        if table.built:
            rows = _table_growth.padded_rows(new, int(table.input_dim))
            _table_growth.grow_embedding(table, before, new, rows)
            backend_module().variables_replaced(self)
        else:
            table.input_dim = new
        self.num_items = new

    def _table(self) -> keras.layers.Layer:
        table = self.item_table
        if table is None:
            owner = type(self).__name__
            raise ValueError(
                f"This {owner} shares the candidate tower's item table (num_items=None) "
                "but has none yet: give it to two_tower.TwoTowerRetrieval with its candidate "
                "tower, or call `share_candidate_items(candidate_tower)`."
            )
        return table

    def _build_table(self) -> keras.layers.Layer:
        """Builds the item table (a shared one through its candidate tower); returns it."""
        table = self._table()
        shared = getattr(self, "_shared", None)
        if shared is not None and not shared[0].built:
            # The candidate tower builds its table (and pads it under a
            # ModelParallel layout) before the history reads it.
            shared[0].build((None,))
        elif not table.built:
            table.build((None,))
        return table

    @property
    def _width(self) -> int:
        return int(self._table().output_dim)
