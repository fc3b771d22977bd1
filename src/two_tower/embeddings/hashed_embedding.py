"""An embedding of raw integer ids through a fixed hash: no vocabulary, any id."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from two_tower import _arguments
from two_tower.embeddings import _hashing
from two_tower.towers.tower_ids import IdRange
from two_tower.types import Tensor


@keras.saving.register_keras_serializable(package="two_tower")
class HashedEmbedding(keras.layers.Layer):
    """Embeds raw integer ids of any value by hashing them into a table of buckets.

    For id spaces with no vocabulary (URLs or session ids turned into integers,
    user ids that appear faster than the model is retrained): every int64 id,
    negative and huge ones included, maps to `num_buckets` rows through a fixed
    hash, so an id never seen in training still gets a (shared) row and nothing
    has to be rebuilt when new ids arrive. Ids that land in the same bucket share
    its row; `num_hashes > 1` sums the rows of several independent hashes of the
    id from the same table, so that two ids rarely share all of them.

    The hash is the same bit for bit on JAX, TensorFlow and torch, so a model
    saved on one backend gives the same embeddings on another: the id's low 32
    bits (`id mod 2**32`), XORed with a salt derived from `seed`, then
    MurmurHash3's 32-bit finalizer, and its low 31 bits modulo `num_buckets`
    (`two_tower.embeddings._hashing` states it step by step). Only the low 32
    bits are hashed because JAX without 64-bit mode, Keras' default, holds an
    int64 id as exactly these bits: ids that differ by a multiple of `2**32`
    share every bucket. Fold ids that carry information in their high bits to
    32 bits first (e.g. `ids ^ (ids >> 32)` in NumPy).

    Ids must be integers (int8 to int64, uint8, uint16). Strings are not hashed,
    floats and booleans are refused, on every backend: turn strings into
    integers first (e.g. a 64-bit hash of each). As a `TwoTowerRetrieval`
    tower it declares the whole int64 range (see
    `two_tower.towers.tower_ids`), so the model does not check ids against a
    vocabulary.

    Args:
        num_buckets: rows of the table, at most `2**31 - 1`.
        embedding_dim: width of each row and of the output.
        num_hashes: independent hashes summed per id (1: plain hashing).
        seed: the hash's seed, in `[0, 2**32)`; a different seed gives different
            buckets. Saved with the layer, so a reloaded layer hashes the same.
        l2: L2 penalty on the table: on the whole table each step, or with
            `sparse` on the rows each batch looks up.
        sparse: make the table a `two_tower.SparseEmbedding`, so that
            `TwoTowerRetrieval.fit` updates only the rows a batch looks up.
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: an option out of range or of the wrong type (NumPy integers
            are accepted); when called, ids that are not integers.

    Call arguments:
        - `ids`: integer ids of any shape.

    Call returns:
        `[*ids.shape, embedding_dim]`: the sum of the `num_hashes` rows of each id.

    Examples:
        >>> import numpy as np
        >>> from two_tower.embeddings.hashed_embedding import HashedEmbedding
        >>> layer = HashedEmbedding(num_buckets=1000, embedding_dim=4, num_hashes=2)
        >>> ids = np.array([-2**63, -1, 0, 7, 2**62])
        >>> tuple(layer(ids).shape)
        (5, 4)
        >>> layer.bucket_ids(ids).tolist()
        [[697, 812], [551, 175], [697, 812], [11, 392], [697, 812]]
    """

    def __init__(
        self,
        num_buckets: int,
        embedding_dim: int = 32,
        num_hashes: int = 1,
        seed: int = 0,
        l2: float = 0.0,
        sparse: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = "HashedEmbedding"
        # Python values (NumPy scalars accepted), so that the config stays JSON.
        self.num_buckets = _arguments.integer(
            "num_buckets", num_buckets, maximum=_hashing.MAX_BUCKETS, owner=owner
        )
        self.embedding_dim = _arguments.integer("embedding_dim", embedding_dim, owner=owner)
        self.num_hashes = _arguments.integer("num_hashes", num_hashes, maximum=64, owner=owner)
        self.seed = _arguments.integer(
            "seed", seed, minimum=0, maximum=_hashing.MAX_SEED, owner=owner
        )
        self.l2 = _arguments.number("l2", l2, minimum=0, owner=owner)
        self.sparse = _arguments.boolean("sparse", sparse, owner=owner)
        self._salts = _hashing.salts(self.seed, self.num_hashes)
        self.embedding = _hashing.table(
            self.sparse, self.num_buckets, self.embedding_dim, self.l2, "embedding"
        )

    def build(self, input_shape: Any) -> None:
        self.embedding.build((None,))

    def __call__(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        _hashing.check_call_input(ids, "HashedEmbedding", self.name)
        return super().__call__(ids, *args, **kwargs)

    def bucket_ids(self, ids: Any) -> Any:
        """The `[*ids.shape, num_hashes]` int32 buckets of `ids`, as a NumPy array."""
        _hashing.check_call_input(ids, "HashedEmbedding", self.name)
        ids = ops.convert_to_tensor(ids)
        _hashing.check_dtype(ids.dtype, "HashedEmbedding", self.name)
        return ops.convert_to_numpy(_hashing.bucket_ids(ids, self.num_buckets, self._salts))

    def call(self, ids: Tensor) -> Tensor:
        _hashing.check_dtype(ids.dtype, "HashedEmbedding", self.name)
        buckets = _hashing.bucket_ids(ids, self.num_buckets, self._salts)
        rows = self.embedding(buckets)  # [*ids.shape, num_hashes, embedding_dim]
        return ops.cast(ops.sum(rows, axis=-2), self.compute_dtype)

    def id_range(self) -> IdRange:
        """Every int64 id (see `two_tower.towers.tower_ids`): a hash takes any id."""
        return IdRange(2**63, f"HashedEmbedding {self.name!r} (any int64 id)", low=-(2**63))

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
                "num_hashes": self.num_hashes,
                "seed": self.seed,
                "l2": self.l2,
                "sparse": self.sparse,
            }
        )
        return config
