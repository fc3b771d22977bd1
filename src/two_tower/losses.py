"""Retrieval losses written with `keras.ops` only.

Each function takes already-computed scores and returns a scalar, so the model
(and anyone subclassing it) decides how scores are made. The reduction follows
Keras's `"sum_over_batch_size"`: the weighted per-example losses are summed and
divided by the batch size.
"""

from __future__ import annotations

from keras import ops

from two_tower.types import Tensor


def _reduce(per_example: Tensor, sample_weight: Tensor | None) -> Tensor:
    if sample_weight is not None:
        sample_weight = ops.reshape(
            ops.cast(sample_weight, per_example.dtype), ops.shape(per_example)
        )
        per_example = per_example * sample_weight
    return ops.mean(per_example)


def mean_squared_error(
    labels: Tensor, scores: Tensor, sample_weight: Tensor | None = None
) -> Tensor:
    """Mean squared error between labels and paired scores (the seed's loss).

    Args:
        labels: `[batch]` or `[batch, 1]` targets, e.g. ratings scaled to [0, 1].
        scores: `[batch]` scores of each (query, candidate) pair.
        sample_weight: optional `[batch]` weights.

    Returns:
        A scalar tensor.

    Example:
    >>> import numpy as np
    >>> float(two_tower.losses.mean_squared_error(np.array([1.0, 0.0]),
    ...                                           np.array([0.5, 0.5])))
    0.25
    """
    scores = ops.reshape(scores, (-1,))
    labels = ops.reshape(ops.cast(labels, scores.dtype), (-1,))
    return _reduce(ops.square(labels - scores), sample_weight)


def in_batch_softmax(
    similarities: Tensor,
    temperature: float = 1.0,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy where row i's positive is column i.

    Every other candidate in the batch is a negative for row i, as in TFRS's
    `tasks.Retrieval`.

    Args:
        similarities: `[batch, batch]` query × candidate scores; the diagonal
            holds the positive pairs.
        temperature: logits are `similarities / temperature`; must be > 0.
        sample_weight: optional `[batch]` weights.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if `temperature` is not positive or `similarities` is not
            square.

    Example:
    >>> import numpy as np
    >>> loss = two_tower.losses.in_batch_softmax(np.eye(3, dtype="float32"))
    >>> round(float(loss), 4)
    0.5514
    """
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
    shape = tuple(similarities.shape)
    if len(shape) != 2 or (shape[0] is not None and shape[1] is not None and shape[0] != shape[1]):
        raise ValueError(
            f"`similarities` must be a square [batch, batch] matrix. Received shape: {shape}"
        )
    logits = ops.cast(similarities, "float32") / temperature
    per_example = ops.logsumexp(logits, axis=1) - ops.diagonal(logits)
    return _reduce(per_example, sample_weight)


__all__ = ["in_batch_softmax", "mean_squared_error"]
