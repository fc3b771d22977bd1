"""`FrequencyEstimator`: each candidate's expected occurrences per batch, estimated online."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.types import Tensor

_OWNER = "FrequencyEstimator"


@keras.saving.register_keras_serializable(package="two_tower")
class FrequencyEstimator(keras.layers.Layer):
    """How often each candidate id appears in a training batch, estimated as training runs.

    The logQ correction of an in-batch softmax subtracts from each column the log
    of its candidate's expected occurrences among the batch's candidates. On a log
    of 10^8 interactions whose popularity drifts, one pass to count them is neither
    possible ahead of training nor right for long. Yi et al. (RecSys 2019,
    "Sampling-bias-corrected neural modeling for large corpus item recommendations")
    estimate it inside the train step with hashed arrays; this layer does the same
    with an exponential moving average of each bucket's count per batch:

        count[h] <- (1 - a_t) * count[h] + a_t * (occurrences of h in batch t)

    with `a_t = max(decay, 1 / t)` at step t: for the first `1 / decay` steps
    (the warm-up) it is the exact mean count per step so far, then a moving
    average over about the last `1 / decay` steps. Read outside training, an id
    not seen lately (or ever) gets at least `decay`, as if seen once in that
    window, so that its logQ stays finite. Buckets not in a batch are
    not touched: each keeps the step it was last updated at and is decayed by
    the product of the `1 - a_s` it missed when next seen, so a step costs
    O(batch log batch) and never O(buckets).

    - **Accuracy.** On a stationary stream the relative error of an item seen
      `m` times per batch on average is about `sqrt(decay / (2 m))` (1.8 % for
      m = 1.5 at the default decay).
    - **Drift.** After a change of popularity, `1 - (1 - decay) ** k` of the
      change is reached after k steps: 90 % after `ln(10) / decay` (2,300 steps
      at the default), 95 % after `3 / decay` (3,000 steps).
    - **Hashing.** Id `i` goes to bucket `i % num_buckets`: exact (no two ids
      share a bucket) when the ids run below `num_buckets`, as a vocabulary's
      indices do. Ids that share a bucket share one estimate, their sum.
    - **Several devices.** The arrays are replicated. Under `tf.distribute` each
      replica updates them with every replica's ids (gathered), so they hold
      what one device would; a `keras.distribution` step sees the global batch.

    Estimates are expected occurrences per batch, not shares of the log: the
    units of `num_sampled_negatives / catalogue_size`, the uniform samples'
    expected occurrences, so that the batch's columns and sampled ones are
    corrected alike (`TwoTowerRetrieval(frequency_estimator=...)`).

    Args:
        num_buckets: size of the hashed arrays (8 bytes each).
        decay: the moving average's weight of a new batch, in (0, 1).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, ...).

    Raises:
        ValueError: a `num_buckets` that is not a positive integer, or a
            `decay` outside (0, 1).

    Examples:
        >>> import numpy as np
        >>> estimator = two_tower.negatives.FrequencyEstimator(num_buckets=8)
        >>> for _ in range(4):
        ...     counts = estimator(np.array([1, 1, 2, 5]), training=True)
        >>> np.round(keras.ops.convert_to_numpy(counts), 3).tolist()
        [2.0, 2.0, 1.0, 1.0]
    """

    def __init__(self, num_buckets: int = 2**20, decay: float = 1e-3, **kwargs: Any) -> None:
        # float32 under any mixed-precision policy: counts and log probabilities
        # must not be rounded to bfloat16.
        kwargs.setdefault("dtype", "float32")
        # Nor cast its variables when read (on TensorFlow that would turn the
        # variable written in place into a tensor).
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.num_buckets = _arguments.integer("num_buckets", num_buckets, owner=_OWNER)
        self.decay = _arguments.number(
            "decay", decay, minimum=0.0, maximum=1.0, open_minimum=True, owner=_OWNER
        )
        if self.decay >= 1.0:
            raise ValueError(
                f"{_OWNER}: `decay` must be a finite number in (0, 1). Received: decay={decay!r}"
            )
        # Steps of the warm-up, when the weight of a new batch is 1 / step (>= decay).
        self._warmup = max(1, math.floor(1.0 / self.decay))
        self.build()

    def build(self, input_shape: Any = None) -> None:
        # One more bucket than asked for: masked ids (padding) are written there.
        size = (self.num_buckets + 1,)
        replicated = {"trainable": False, "aggregation": "only_first_replica"}
        self.counts = self.add_weight(
            shape=size, initializer="zeros", dtype="float32", name="counts", **replicated
        )
        self.last_step = self.add_weight(
            shape=size, initializer="zeros", dtype="int32", name="last_step", **replicated
        )
        self.step = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", name="step", **replicated
        )
        self.built = True

    def _decay_between(self, before: Tensor, now: Tensor) -> Tensor:
        """The product of `1 - a_s` over steps `before + 1 .. now` (0 when `before` is 0).

        In the warm-up `a_s = 1 / s`, whose product telescopes to `before / now`;
        after it each step multiplies by `1 - decay`. Written from integer step
        differences, never from two large logarithms, so float32 stays exact.
        """
        warmup = self._warmup
        ratio = ops.cast(ops.minimum(before, warmup), "float32") / ops.cast(
            ops.maximum(ops.minimum(now, warmup), 1), "float32"
        )
        steps_after = ops.cast(ops.maximum(now, warmup) - ops.maximum(before, warmup), "float32")
        return ratio * ops.exp(steps_after * math.log1p(-self.decay))

    def _buckets(self, ids: Tensor, valid: Tensor | None) -> Tensor:
        ids = ops.reshape(ids, (-1,))
        dtype = keras.backend.standardize_dtype(ids.dtype)
        if "int" not in dtype:
            raise ValueError(f"{_OWNER}: ids must be integers. Received ids of dtype {dtype}")
        buckets = ops.cast(ops.mod(ids, self.num_buckets), "int32")
        if valid is not None:  # padding goes to the extra bucket, read by nobody
            buckets = ops.where(ops.reshape(valid, (-1,)), buckets, self.num_buckets)
        return buckets

    def call(self, ids: Tensor, valid: Tensor | None = None, training: bool = False) -> Tensor:
        """The expected occurrences per batch of each id.

        Args:
            ids: integer ids, any shape (flattened).
            valid: optional booleans of the same shape; False ids (padding) are not
                counted, and their estimate is meaningless.
            training: count this batch first (every replica's ids under
                `tf.distribute`), advancing the step; otherwise read the
                estimates as they stand now.

        Returns:
            `[ids]` float32 estimates, after this batch's update when training.
        """
        buckets = self._buckets(ids, valid)
        backend = backend_module()
        if not training:
            now = self.step.value
            counts = backend.read_rows(self.counts, buckets)
            counts = counts * self._decay_between(backend.read_rows(self.last_step, buckets), now)
            # An id not seen lately (or ever) counts as seen once in the moving
            # average's window: its log stays finite. (A counted id always has
            # at least this much.)
            return ops.maximum(counts, self.decay)
        everyone = ops.sort(backend.all_replicas(buckets))
        occurrences = ops.searchsorted(everyone, everyone, side="right") - ops.searchsorted(
            everyone, everyone, side="left"
        )
        now = self.step.value + 1
        weight = ops.where(now <= self._warmup, 1.0 / ops.cast(now, "float32"), self.decay)
        before = backend.read_rows(self.last_step, everyone)
        updated = backend.read_rows(self.counts, everyone) * self._decay_between(
            before, now
        ) + weight * ops.cast(occurrences, "float32")
        # Repeated buckets write equal values.
        backend.write_rows(self.counts, everyone, updated)
        backend.write_rows(self.last_step, everyone, ops.zeros_like(everyone) + now)
        self.step.assign(now)
        return ops.take(updated, ops.searchsorted(everyone, buckets, side="left"), axis=0)

    def compute_output_spec(self, ids: Any, valid: Any = None, training: bool = False) -> Any:
        size = math.prod(ids.shape) if None not in ids.shape else None
        return keras.KerasTensor((size,), dtype="float32")

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"num_buckets": self.num_buckets, "decay": self.decay})
        return config
