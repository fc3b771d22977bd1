"""`NegativeCache`: recent batches' candidate embeddings, kept as extra negatives."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.types import Tensor

_OWNER = "NegativeCache"


@keras.saving.register_keras_serializable(package="two_tower")
class NegativeCache(keras.layers.Layer):
    """A ring of the last training batches' candidates, used as extra softmax negatives.

    Cross-batch negative sampling (Wang et al., SIGIR 2021): an in-batch softmax
    sees only its batch's candidates as negatives; the candidate embeddings of
    the previous batches cost nothing more to keep, and change slowly once
    training has warmed up. `TwoTowerRetrieval(negative_cache=...)` adds every
    valid row of the cache as a column of each training step's softmax, after
    the batch's own (and any sampled) candidates, then writes the batch into it.

    Each row holds a candidate embedding (no gradient flows into it), its id
    (so that accidental hits, a cached copy of a row's positive, are removed
    with `remove_accidental_hits`), its log expected occurrences per batch (the
    logQ correction it had when written) and the step that wrote it. A row is
    used while `1 <= step - written <= max_age`: `max_age` is the staleness
    bound, in training steps. A batch larger than `size` writes its first
    `size` rows. Evaluation steps neither read nor write it. In per-position
    training, padded positions take their slots too (written as unused), so
    the cache holds fewer candidates than `size`.

    **Several devices: one global cache.** Its variables are replicated. Under
    `tf.distribute` every replica writes every replica's candidates (gathered)
    and reads the whole cache, so the cache, and the extra columns, are those
    of one device training on the global batch; a `keras.distribution` step
    sees the global batch itself.

    Args:
        size: rows kept, e.g. 4 batches' worth.
        max_age: the oldest row used, in steps since it was written (1 is the
            previous batch); None uses every row of the ring.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, ...).

    Raises:
        ValueError: a `size` or `max_age` that is not a positive integer.

    Examples:
        >>> import numpy as np
        >>> cache = two_tower.negatives.NegativeCache(size=4)
        >>> first = cache(np.ones((2, 3), "float32"), np.array([7, 8]), training=True)
        >>> keras.ops.convert_to_numpy(first["valid"]).tolist()  # nothing cached yet
        [False, False, False, False]
        >>> second = cache(np.zeros((2, 3), "float32"), np.array([9, 4]), training=True)
        >>> keras.ops.convert_to_numpy(second["ids"]).tolist()
        [7, 8, -1, -1]
    """

    def __init__(self, size: int, max_age: int | None = None, **kwargs: Any) -> None:
        # float32 under any mixed-precision policy: counts and log probabilities
        # must not be rounded to bfloat16.
        kwargs.setdefault("dtype", "float32")
        # Nor cast its variables when read (on TensorFlow that would turn the
        # variable written in place into a tensor).
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.size = _arguments.integer("size", size, owner=_OWNER)
        self.max_age = (
            None if max_age is None else _arguments.integer("max_age", max_age, owner=_OWNER)
        )

    def build(self, embeddings_shape: Any, *args: Any, **kwargs: Any) -> None:
        dim = embeddings_shape[-1]
        if dim is None:
            raise ValueError(
                f"{_OWNER} needs the candidate embeddings' dim. Received shape {embeddings_shape}"
            )
        replicated = {"trainable": False, "aggregation": "only_first_replica"}
        self.embeddings = self.add_weight(
            shape=(self.size, int(dim)), initializer="zeros", dtype="float32",
            name="embeddings", **replicated,
        )  # fmt: skip
        self.ids = self.add_weight(
            shape=(self.size,), initializer=keras.initializers.Constant(-1), dtype="int32",
            name="ids", **replicated,
        )  # fmt: skip
        self.log_q = self.add_weight(
            shape=(self.size,), initializer="zeros", dtype="float32", name="log_q", **replicated
        )
        # The step that wrote each row; 0: never written.
        self.written = self.add_weight(
            shape=(self.size,), initializer="zeros", dtype="int32", name="written", **replicated
        )
        self.step = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", name="step", **replicated
        )
        self.position = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", name="position", **replicated
        )
        self.built = True

    def call(
        self,
        embeddings: Tensor,
        ids: Tensor | None = None,
        log_q: Tensor | None = None,
        valid: Tensor | None = None,
        training: bool = False,
    ) -> dict[str, Tensor]:
        """The cache as it stands, then (training) this batch written into it.

        Args:
            embeddings: `[batch, dim]` candidate embeddings.
            ids: `[batch]` candidate ids, or None (stored as -1).
            log_q: `[batch]` log expected occurrences per batch, or None (0).
            valid: `[batch]` booleans; False rows (padding) are written as unused.
            training: write the batch (a training step); otherwise only read.

        Returns:
            `{"embeddings": [size, dim], "ids": [size], "log_q": [size],
            "valid": [size]}`, as they were before this batch.
        """
        now = self.step.value + 1
        age = now - self.written.value
        usable = ops.logical_and(ops.greater(self.written.value, 0), ops.greater(age, 0))
        if self.max_age is not None:
            usable = ops.logical_and(usable, ops.less_equal(age, self.max_age))
        # Copies: on torch the writes below change the variables' tensors in place.
        previous = {
            "embeddings": ops.copy(self.embeddings.value),
            "ids": ops.copy(self.ids.value),
            "log_q": ops.copy(self.log_q.value),
            "valid": usable,
        }
        if training:
            self._write(embeddings, ids, log_q, valid, now)
        return previous

    def _write(
        self, embeddings: Tensor, ids: Tensor | None, log_q: Tensor | None, valid: Tensor | None,
        now: Tensor,
    ) -> None:  # fmt: skip
        backend = backend_module()
        rows = ops.shape(embeddings)[0]
        columns = {
            "embeddings": ops.cast(ops.stop_gradient(embeddings), "float32"),
            "ids": ops.full((rows,), -1, "int32") if ids is None else ops.cast(ids, "int32"),
            "log_q": ops.zeros((rows,), "float32")
            if log_q is None
            else ops.cast(ops.stop_gradient(log_q), "float32"),
            "written": ops.ones((rows,), "int32")
            if valid is None
            else ops.cast(ops.reshape(valid, (-1,)), "int32"),
        }
        # Every replica's rows (tf.distribute), the first `size` of them.
        columns = {
            # (The width given: a replica or process may hold 0 rows.)
            key: backend.all_replicas(
                ops.reshape(value, (rows, value.shape[-1] if len(value.shape) > 1 else 1))
            )[: self.size]
            for key, value in columns.items()
        }
        count = ops.shape(columns["ids"])[0]
        slots = ops.mod(self.position.value + ops.arange(count, dtype="int32"), self.size)
        backend.write_rows(self.embeddings, slots, columns["embeddings"])
        backend.write_rows(self.ids, slots, ops.reshape(columns["ids"], (-1,)))
        backend.write_rows(self.log_q, slots, ops.reshape(columns["log_q"], (-1,)))
        backend.write_rows(self.written, slots, ops.reshape(columns["written"], (-1,)) * now)
        self.position.assign(ops.mod(self.position.value + count, self.size))
        self.step.assign(now)

    def compute_output_spec(self, embeddings: Any, *args: Any, **kwargs: Any) -> Any:
        return {
            "embeddings": keras.KerasTensor((self.size, embeddings.shape[-1]), "float32"),
            "ids": keras.KerasTensor((self.size,), "int32"),
            "log_q": keras.KerasTensor((self.size,), "float32"),
            "valid": keras.KerasTensor((self.size,), "bool"),
        }

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"size": self.size, "max_age": self.max_age})
        return config
