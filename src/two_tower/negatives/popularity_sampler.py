"""`PopularitySampler`: sampled negatives in proportion to given item weights."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.types import Tensor

_OWNER = "PopularitySampler"
TOTAL = 2**30
"""Every item's share is a whole number of `1 / TOTAL` (int32 cumulative sums)."""


@keras.saving.register_keras_serializable(package="two_tower")
class PopularitySampler(keras.layers.Layer):
    """Draws `"sampled_softmax"`'s negatives in proportion to item weights, with their logQ.

    Uniform negatives are mostly items nobody interacts with, which the model
    separates from the positives early; popular items are the harder negatives
    (word2vec draws in proportion to frequency^0.75). `TwoTowerRetrieval(loss=
    "sampled_softmax", negative_sampler=...)` draws its `num_sampled_negatives`
    ids from this sampler instead of uniformly, and with the logQ correction
    subtracts `log(num_sampled_negatives * p_i)` from each sampled column: the
    expected occurrences of item i among the samples.

    The probabilities are stored as whole numbers of `1 / 2^30` (an int32
    cumulative sum over the items: 4 bytes per item), and each draw is one
    `randint` and a binary search, O(log items), never O(items). The logQ uses
    the stored probabilities, exactly those sampled from. An item with any
    weight keeps at least `2^-30`; an item of weight 0 is never drawn.

    A layer for its variable (saved with the model) and config; it is not
    called, `sample` draws. Until `set_weights_from` is called (or after
    `from_config`, until weights are loaded) every item has the same
    probability: uniform sampling.

    Args:
        num_items: the catalogue's ids, `0..num_items-1` (the model's
            `catalogue_size`); at most 2^28.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, ...).

    Raises:
        ValueError: a `num_items` that is not an integer in [1, 2^28].

    Examples:
        >>> import numpy as np
        >>> sampler = two_tower.negatives.PopularitySampler.from_weights(
        ...     np.array([0.0, 1.0, 3.0]))
        >>> ids, log_q = sampler.sample(8, seed=keras.random.SeedGenerator(1))
        >>> sorted(set(keras.ops.convert_to_numpy(ids).tolist())) in ([1, 2], [2])
        True
        >>> np.round(np.exp(keras.ops.convert_to_numpy(sampler.log_probabilities(
        ...     np.array([1, 2])))), 4).tolist()
        [0.25, 0.75]
    """

    def __init__(self, num_items: int, **kwargs: Any) -> None:
        # float32 under any mixed-precision policy: counts and log probabilities
        # must not be rounded to bfloat16.
        kwargs.setdefault("dtype", "float32")
        # Nor cast its variables when read (on TensorFlow that would turn the
        # variable written in place into a tensor).
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.num_items = _arguments.integer("num_items", num_items, maximum=2**28, owner=_OWNER)
        self.build()

    @classmethod
    def from_weights(cls, weights: Any, **kwargs: Any) -> PopularitySampler:
        """A sampler over `len(weights)` items, drawing item i with probability
        `weights[i] / sum(weights)` (see `set_weights_from`)."""
        sampler = cls(num_items=len(np.asarray(weights).reshape(-1)), **kwargs)
        sampler.set_weights_from(weights)
        return sampler

    def build(self, input_shape: Any = None) -> None:
        self.cumulative = self.add_weight(
            shape=(self.num_items,),
            initializer=keras.initializers.Constant(0),
            dtype="int32",
            name="cumulative",
            trainable=False,
        )
        self.cumulative.assign(_cumulative(np.ones(self.num_items)))
        self.built = True

    def set_weights_from(self, weights: Any) -> None:
        """Sets the sampling probabilities to `weights / sum(weights)`.

        Args:
            weights: `[num_items]` finite weights >= 0 with a positive sum, e.g.
                each item's count in the training log (`np.bincount`), or that
                to the power 0.75.

        Raises:
            ValueError: weights of another length, negative, not finite, or
                all zero. Nothing is changed then.
        """
        array = np.asarray(weights, dtype="float64").reshape(-1)
        if array.shape[0] != self.num_items:
            raise ValueError(
                f"{_OWNER}: `weights` must hold one weight per item ({self.num_items}). "
                f"Received {array.shape[0]} weights"
            )
        if not np.isfinite(array).all() or (array < 0).any() or array.sum() <= 0:
            raise ValueError(
                f"{_OWNER}: `weights` must be finite numbers >= 0 with a positive sum. "
                f"Received min {array.min()!r}, max {array.max()!r}, sum {array.sum()!r}"
            )
        self.cumulative.assign(_cumulative(array))

    def log_probabilities(self, ids: Tensor) -> Tensor:
        """`[n]` float32 log probability of drawing each of `ids` (int, `[n]`)."""
        ids = ops.cast(ops.reshape(ids, (-1,)), "int32")
        backend = backend_module()
        upper = backend.read_rows(self.cumulative, ids)
        lower = backend.read_rows(self.cumulative, ops.maximum(ids - 1, 0))
        counts = upper - ops.where(ids > 0, lower, ops.zeros_like(lower))
        return ops.log(ops.cast(counts, "float32")) - float(np.log(TOTAL))

    def sample(self, num_samples: int, seed: keras.random.SeedGenerator) -> tuple[Tensor, Tensor]:
        """`[num_samples]` int32 ids drawn with replacement, and their log probabilities."""
        draws = keras.random.randint((int(num_samples),), 0, TOTAL, dtype="int32", seed=seed)
        ids = ops.cast(ops.searchsorted(self.cumulative.value, draws, side="right"), "int32")
        return ids, self.log_probabilities(ids)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"num_items": self.num_items})
        return config


def _cumulative(weights: np.ndarray) -> np.ndarray:
    """Int32 cumulative sums of `weights` as whole shares of `TOTAL`, ending at `TOTAL`.

    Each positive weight gets at least 1; the rounding left over goes to the
    heaviest item (at least `TOTAL / items` >= 4 shares, so it stays positive).
    """
    shares = np.floor(weights / weights.sum() * TOTAL).astype("int64")
    shares[(weights > 0) & (shares == 0)] = 1
    shares[int(np.argmax(weights))] += TOTAL - int(shares.sum())
    if shares.min() < 0:  # (more items below 2^-30 than the heaviest's share)
        raise ValueError(
            f"{_OWNER}: too many weights below 2^-30 of the total to keep each drawable. "
            "Received weights whose heaviest share is too small to make up for them"
        )
    return np.cumsum(shares).astype("int32")
