"""A tower that embeds integer ids, with an optional bias column."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.distribution import _sharding
from two_tower.sparse.sparse_embedding import SparseEmbedding
from two_tower.towers import _table_growth
from two_tower.towers.tower_ids import IdRange
from two_tower.types import Tensor

BIASES = (None, "learned", "constant")


@keras.saving.register_keras_serializable(package="two_tower")
class IdEmbeddingTower(keras.layers.Layer):
    """Embeds integer ids in `[0, vocabulary_size)`, with an optional L2 penalty.

    With `bias="learned"` a learned scalar per id is appended as a last column;
    with `bias="constant"` a column of ones is appended. Give the candidate tower
    `"learned"` and the query tower `"constant"`: their dot product is then
    `query · candidate + candidate_bias`, a per-item popularity term that keeps
    training and the dot-product index consistent.

    Args:
        vocabulary_size: number of ids; ids run from 0 to `vocabulary_size - 1`.
        embedding_dim: width of the id embedding (the output has one more
            column when `bias` is set).
        l2: L2 penalty on the embedding table (and on the bias table), added to
            the model's loss every step: on the whole table, or with `sparse`
            on the rows each batch looks up.
        bias: None, `"learned"` or `"constant"`.
        sparse: make the tables `two_tower.SparseEmbedding`s, so that
            `TwoTowerRetrieval.fit` updates only the rows a batch looks up (a
            step then costs O(batch), not O(vocabulary_size); see
            `SparseEmbedding` for the optimizers it takes).
        table_rows: rows of the tables, if more than `vocabulary_size`. Set
            when the tower builds under a `keras.distribution.ModelParallel`,
            which shards tables by rows: the rows are rounded up to the model
            axis, and the extra rows start at zero and are never looked up
            (`TwoTowerRetrieval` checks ids against `vocabulary_size`). Kept in the config so
            a saved model reloads with the same shapes. Leave it None.
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: an option out of range (sizes, `l2`, `bias`, `table_rows`),
            or of the wrong type (`sparse` that is not True or False). NumPy
            scalars (`np.int64(943)`) are accepted as numbers.

    Call arguments:
        - `ids`: `[batch]` integer ids.

    Call returns:
        `[batch, embedding_dim]`, or `[batch, embedding_dim + 1]` with a bias.

    Examples:
        >>> import numpy as np
        >>> tower = two_tower.IdEmbeddingTower(10, embedding_dim=4, bias="learned")
        >>> tuple(tower(np.array([1, 2])).shape)
        (2, 5)
    """

    def __init__(
        self,
        vocabulary_size: int,
        embedding_dim: int = 32,
        l2: float = 0.0,
        bias: str | None = None,
        sparse: bool = False,
        table_rows: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = "IdEmbeddingTower"
        # Python values (NumPy scalars accepted), so that the config stays JSON.
        vocabulary_size = _arguments.integer("vocabulary_size", vocabulary_size, owner=owner)
        embedding_dim = _arguments.integer("embedding_dim", embedding_dim, owner=owner)
        l2 = _arguments.number("l2", l2, minimum=0, owner=owner)
        if bias not in BIASES:
            raise ValueError(f"`bias` must be one of {BIASES}. Received: bias={bias!r}")
        sparse = _arguments.boolean("sparse", sparse, owner=owner)
        if table_rows is not None:
            try:
                table_rows = _arguments.integer(
                    "table_rows", table_rows, minimum=vocabulary_size, owner=owner
                )
            except ValueError:
                raise ValueError(
                    "`table_rows` must be None or an integer >= vocabulary_size "
                    f"(={vocabulary_size}). Received: table_rows={table_rows!r}"
                ) from None
        self.vocabulary_size = vocabulary_size
        self.embedding_dim = embedding_dim
        self.l2 = l2
        self.bias = bias
        self.sparse = sparse
        self.table_rows = table_rows
        regularizer = keras.regularizers.L2(l2) if l2 else None
        table = SparseEmbedding if sparse else keras.layers.Embedding
        self.embedding = table(
            vocabulary_size, embedding_dim, embeddings_regularizer=regularizer, name="embedding"
        )
        self.bias_embedding = (
            table(
                vocabulary_size,
                1,
                embeddings_initializer="zeros",
                embeddings_regularizer=regularizer,
                name="bias",
            )
            if bias == "learned"
            else None
        )

    pads_tables = True  # see `two_tower.distribution._sharding`

    def build(self, input_shape: Any) -> None:
        tables = {"embedding": self.embedding}
        if self.bias_embedding is not None:
            tables["bias"] = self.bias_embedding
        recorded = None if self.table_rows is None else dict.fromkeys(tables, self.table_rows)
        padded = _sharding.pad_tables(tables, recorded)
        if padded:
            self.table_rows = padded["embedding"]
        self.embedding.build(input_shape)
        if self.bias_embedding is not None:
            self.bias_embedding.build(input_shape)

    def call(self, ids: Tensor) -> Tensor:
        embedded = self.embedding(ids)
        if self.bias == "learned":
            assert self.bias_embedding is not None
            return ops.concatenate([embedded, self.bias_embedding(ids)], axis=-1)
        if self.bias == "constant":
            return ops.concatenate([embedded, ops.ones_like(embedded[..., :1])], axis=-1)
        return embedded

    def table_sizes(self) -> int:
        """The ids the tables take: `vocabulary_size`."""
        return self.vocabulary_size

    def grow(self, vocabulary_size: int) -> None:
        """Takes ids up to `vocabulary_size`: old rows kept, new rows initialised.

        The tables get the new rows (the embedding's initializer; the bias
        starts at zero); within `table_rows` the tables keep their variables
        and only the new rows are drawn again. Under a model-parallel
        distribution the rows are padded to the model axis again. A model's
        optimizer state must follow: grow through
        `TwoTowerRetrieval.grow_tables`, which does both.

        Args:
            vocabulary_size: the new number of ids, at least the current one.

        Raises:
            ValueError: a size below the current one, or not an integer.

        Examples:
            >>> import numpy as np
            >>> tower = two_tower.IdEmbeddingTower(10, embedding_dim=4)
            >>> old = keras.ops.convert_to_numpy(tower(np.array([3])))
            >>> tower.grow(15)
            >>> bool(np.all(keras.ops.convert_to_numpy(tower(np.array([3]))) == old))
            True
            >>> tower.vocabulary_size, tuple(tower(np.array([14])).shape)
            (15, (1, 4))
        """
        new = _table_growth.checked_growth(
            f"IdEmbeddingTower {self.name!r}", self.vocabulary_size, vocabulary_size
        )
        tables = [t for t in (self.embedding, self.bias_embedding) if t is not None]
        if self.built:
            rows = _table_growth.padded_rows(new, int(self.embedding.input_dim))
            for table in tables:
                _table_growth.grow_embedding(table, self.vocabulary_size, new, rows)
        else:
            rows = max(new, self.table_rows or 0)
            for table in tables:
                table.input_dim = new
        self.table_rows = rows if rows > new else None
        self.vocabulary_size = new
        backend_module().variables_replaced(self)

    def id_range(self) -> IdRange:
        """Ids in `[0, vocabulary_size)` (see `two_tower.towers.tower_ids`)."""
        return IdRange(self.vocabulary_size, "vocabulary_size")

    def check_feature_ranges(self, features: Any, where: str = "features") -> None:
        """Nothing beyond `id_range`: the model checks the ids against it."""
        del features, where

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*tuple(input_shape), self.embedding_dim + (self.bias is not None))

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "embedding_dim": self.embedding_dim,
                "l2": self.l2,
                "bias": self.bias,
                "sparse": self.sparse,
                "table_rows": self.table_rows,
            }
        )
        return config
