"""Quotient-remainder embeddings: two small tables that give each index its own row."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.embeddings import _hashing
from two_tower.towers.tower_ids import IdRange
from two_tower.types import Tensor

COMBINERS = ("multiply", "add", "concat")


@keras.saving.register_keras_serializable(package="two_tower")
class QuotientRemainderEmbedding(keras.layers.Layer):
    """Embeds ids with the quotient-remainder trick of Shi et al. (2020).

    "Compositional embeddings using complementary partitions for memory-efficient
    recommendation systems" (KDD 2020): index `i` in `[0, num_buckets)` is
    split into `i // m` and `i % m` (`m` is `num_collisions`), each looked up
    in its own table, of `ceil(num_buckets / m)` and `m` rows, and the two rows
    are combined. No two indices share both rows, so every index keeps a
    distinct embedding while the tables hold about `2 * sqrt(num_buckets)` rows
    at the default `m`, instead of `num_buckets`.

    With `hashed=True` (the default) the layer takes raw integer ids of any
    value, as `HashedEmbedding` does, and the index is the id's bucket under
    the same hash (one hash function, seeded by `seed`): the hashed space can
    then be far larger than the memory, so that hash collisions become rare.
    With `hashed=False` the ids are the indices themselves, in
    `[0, num_buckets)`: a compressed table for an id space with a vocabulary.

    Ids must be integers (int8 to int64, uint8, uint16); strings, floats and
    booleans are refused, on every backend. With `hashed=True` only the low
    32 bits of an id are hashed (see `HashedEmbedding`).

    Args:
        num_buckets: the indices, at most `2**31 - 1`: the hashed space, or
            with `hashed=False` the id range.
        embedding_dim: width of the output.
        num_collisions: `m`, the rows of the remainder table: indices that
            share a quotient row. None: `ceil(sqrt(num_buckets))`, the fewest rows.
        combiner: `"multiply"` (element-wise, the paper's best), `"add"` or
            `"concat"` (each table `embedding_dim // 2` wide, so
            `embedding_dim` must be even). With `"multiply"` the remainder
            table starts near one (uniform in `[0.9, 1.1]`), so that a product
            starts near a quotient row and trains like one.
        hashed: hash raw ids into `[0, num_buckets)` first (True), or take ids
            in `[0, num_buckets)` as they are (False).
        seed: the hash's seed, in `[0, 2**32)` (with `hashed=True`).
        l2: L2 penalty on the tables: on the whole tables each step, or with
            `sparse` on the rows each batch looks up.
        sparse: make the tables `two_tower.SparseEmbedding`s, so that
            `TwoTowerRetrieval.fit` updates only the rows a batch looks up.
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: an option out of range or of the wrong type (NumPy integers
            are accepted), an odd `embedding_dim` with `"concat"`; when called,
            ids that are not integers, or, with `hashed=False`, NumPy ids outside
            `[0, num_buckets)` (in a compiled step, as for `keras.layers.Embedding`,
            `TwoTowerRetrieval` checks them on the host first).

    Call arguments:
        - `ids`: integer ids of any shape.

    Call returns:
        `[*ids.shape, embedding_dim]`.

    Examples:
        >>> import numpy as np
        >>> from two_tower.embeddings.quotient_remainder_embedding import (
        ...     QuotientRemainderEmbedding)
        >>> layer = QuotientRemainderEmbedding(
        ...     num_buckets=10_000, embedding_dim=8, num_collisions=100, hashed=False)
        >>> (layer.quotient_rows, layer.remainder_rows)
        (100, 100)
        >>> tuple(layer(np.array([0, 4321, 9999])).shape)
        (3, 8)
    """

    def __init__(
        self,
        num_buckets: int,
        embedding_dim: int = 32,
        num_collisions: int | None = None,
        combiner: str = "multiply",
        hashed: bool = True,
        seed: int = 0,
        l2: float = 0.0,
        sparse: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = "QuotientRemainderEmbedding"
        # Python values (NumPy scalars accepted), so that the config stays JSON.
        self.num_buckets = _arguments.integer(
            "num_buckets", num_buckets, maximum=_hashing.MAX_BUCKETS, owner=owner
        )
        self.embedding_dim = _arguments.integer("embedding_dim", embedding_dim, owner=owner)
        self.num_collisions = (
            None
            if num_collisions is None
            else _arguments.integer(
                "num_collisions", num_collisions, maximum=self.num_buckets, owner=owner
            )
        )
        self.combiner = _arguments.choice("combiner", combiner, COMBINERS, owner=owner)
        if self.combiner == "concat" and self.embedding_dim % 2:
            raise ValueError(
                f"{owner}: combiner='concat' splits `embedding_dim` between the two "
                f"tables, so it must be even. Received: embedding_dim={self.embedding_dim}"
            )
        self.hashed = _arguments.boolean("hashed", hashed, owner=owner)
        self.seed = _arguments.integer(
            "seed", seed, minimum=0, maximum=_hashing.MAX_SEED, owner=owner
        )
        self.l2 = _arguments.number("l2", l2, minimum=0, owner=owner)
        self.sparse = _arguments.boolean("sparse", sparse, owner=owner)
        self.remainder_rows = self.num_collisions or math.isqrt(self.num_buckets - 1) + 1
        self.quotient_rows = -(-self.num_buckets // self.remainder_rows)
        width = self.embedding_dim // 2 if self.combiner == "concat" else self.embedding_dim
        self._salts = _hashing.salts(self.seed, 1)
        self.quotient_embedding = _hashing.table(
            self.sparse, self.quotient_rows, width, self.l2, "quotient"
        )
        near_one = keras.initializers.RandomUniform(0.9, 1.1)
        self.remainder_embedding = _hashing.table(
            self.sparse,
            self.remainder_rows,
            width,
            self.l2,
            "remainder",
            near_one if self.combiner == "multiply" else "uniform",
        )

    def build(self, input_shape: Any) -> None:
        self.quotient_embedding.build((None,))
        self.remainder_embedding.build((None,))

    def __call__(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        _hashing.check_call_input(ids, "QuotientRemainderEmbedding", self.name)
        if not self.hashed and isinstance(ids, (np.ndarray, list, tuple)):
            array = np.asarray(ids)
            if array.size and (array.min() < 0 or array.max() >= self.num_buckets):
                raise ValueError(
                    f"QuotientRemainderEmbedding {self.name!r} (hashed=False) takes ids in "
                    f"[0, {self.num_buckets}). Received ids from {array.min()} to "
                    f"{array.max()}. Use hashed=True for ids without a range."
                )
        return super().__call__(ids, *args, **kwargs)

    def indices(self, ids: Any) -> Any:
        """The `[*ids.shape]` int32 indices in `[0, num_buckets)` of `ids`, as NumPy."""
        _hashing.check_call_input(ids, "QuotientRemainderEmbedding", self.name)
        return ops.convert_to_numpy(self._indices(ops.convert_to_tensor(ids)))

    def _indices(self, ids: Tensor) -> Tensor:
        _hashing.check_dtype(ids.dtype, "QuotientRemainderEmbedding", self.name)
        if not self.hashed:
            return _hashing.low_words(ids)  # in [0, num_buckets), checked by the caller
        return _hashing.bucket_ids(ids, self.num_buckets, self._salts)[..., 0]

    def call(self, ids: Tensor) -> Tensor:
        indices = self._indices(ids)
        quotient = self.quotient_embedding(ops.floor_divide(indices, self.remainder_rows))
        remainder = self.remainder_embedding(ops.mod(indices, self.remainder_rows))
        if self.combiner == "multiply":
            combined = ops.multiply(quotient, remainder)
        elif self.combiner == "add":
            combined = ops.add(quotient, remainder)
        else:
            combined = ops.concatenate([quotient, remainder], axis=-1)
        return ops.cast(combined, self.compute_dtype)

    def id_range(self) -> IdRange:
        """Every int64 id when hashed, else `[0, num_buckets)` (see `towers.tower_ids`)."""
        if self.hashed:
            return IdRange(
                2**63, f"QuotientRemainderEmbedding {self.name!r} (any int64 id)", low=-(2**63)
            )
        return IdRange(self.num_buckets, "QuotientRemainderEmbedding num_buckets")

    def check_feature_ranges(self, features: Any, where: str = "features") -> None:
        """Nothing beyond `id_range`: the model checks the ids against it."""
        del features, where

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*tuple(input_shape), self.embedding_dim)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "num_buckets": self.num_buckets,
                "embedding_dim": self.embedding_dim,
                "num_collisions": self.num_collisions,
                "combiner": self.combiner,
                "hashed": self.hashed,
                "seed": self.seed,
                "l2": self.l2,
                "sparse": self.sparse,
            }
        )
        return config
