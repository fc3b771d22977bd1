"""Retrieval losses written with `keras.ops` only.

Each function takes already-computed scores and returns a scalar, so the model
(and anyone subclassing it) decides how scores are made. The reduction follows
Keras's `"sum_over_batch_size"`: the weighted per-example losses are summed and
divided by the batch size.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

from two_tower.backends import backend_module
from two_tower.types import Tensor


def _reduce(per_example: Tensor, sample_weight: Tensor | None) -> Tensor:
    if sample_weight is not None:
        sample_weight = ops.reshape(
            ops.cast(sample_weight, per_example.dtype), ops.shape(per_example)
        )
        per_example = per_example * sample_weight
    # The mean, and 0 for no rows (a tf.distribute replica's share of a last batch
    # smaller than the replicas can be empty; its mean would be NaN).
    rows = ops.cast(ops.shape(per_example)[0], per_example.dtype)
    return ops.sum(per_example) / ops.maximum(rows, 1.0)


def mean_squared_error(
    labels: Tensor, scores: Tensor, sample_weight: Tensor | None = None
) -> Tensor:
    """Mean squared error between labels and paired scores.

    The loss of the keras-rs basic retrieval tutorial, on ratings scaled to [0, 1].

    Args:
        labels: `[batch]` or `[batch, 1]` targets, e.g. ratings scaled to [0, 1].
        scores: `[batch]` scores of each (query, candidate) pair.
        sample_weight: optional `[batch]` weights.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: labels that are not `[batch]` or `[batch, 1]`.

    Examples:
        >>> import numpy as np
        >>> float(two_tower.losses.mean_squared_error(np.array([1.0, 0.0]),
        ...                                           np.array([0.5, 0.5])))
        0.25
    """
    label_shape, score_shape = tuple(labels.shape), tuple(scores.shape)
    if len(label_shape) > 1 and label_shape[1:] != (1,):
        raise ValueError(
            "MSE labels must have shape [batch] or [batch, 1], one per pair. "
            f"Received labels of shape {label_shape} for scores of shape {score_shape}"
        )
    scores = ops.reshape(scores, (-1,))
    labels = ops.reshape(ops.cast(labels, scores.dtype), (-1,))
    return _reduce(ops.square(labels - scores), sample_weight)


def _check_temperature(temperature: float) -> None:
    """Raises ValueError unless `temperature` is a finite number > 0."""
    # A string such as "1" would pass float(); a temperature is a number.
    valid = not isinstance(temperature, (bool, np.bool_, str, bytes))
    try:
        valid = valid and math.isfinite(float(temperature)) and float(temperature) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"`temperature` must be a number > 0. Received: temperature={temperature!r}"
        )


def _check_num_hard_negatives(num_hard_negatives: int | None) -> None:
    """Raises ValueError unless `num_hard_negatives` is None or a positive int."""
    if num_hard_negatives is not None and (
        isinstance(num_hard_negatives, (bool, np.bool_))
        or not isinstance(num_hard_negatives, (int, np.integer))
        or num_hard_negatives <= 0
    ):
        raise ValueError(
            "`num_hard_negatives` must be a positive integer or None. "
            f"Received: num_hard_negatives={num_hard_negatives!r}"
        )


def retrieval_softmax(
    similarities: Tensor,
    positive_positions: Tensor | None = None,
    *,
    temperature: float = 1.0,
    candidate_ids: Tensor | None = None,
    positive_ids: Tensor | None = None,
    log_candidate_probability: Tensor | None = None,
    num_hard_negatives: int | None = None,
    sample_weight: Tensor | None = None,
    candidate_mask: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy of each query's positive against the other columns.

    One function covers the softmax variants; they differ only in which
    candidates make the columns of `similarities`:

    - in-batch: the batch's own candidates (`[batch, batch]`, positive i at i);
    - mixed negatives: the batch's candidates followed by extra sampled ones;
    - full catalogue: every candidate, positives at their catalogue positions.

    Steps, in TFRS's order: logits are `similarities / temperature`; the logQ
    correction subtracts `log_candidate_probability` from every column; accidental
    hits (columns other than the positive holding the positive's id) and columns
    that `candidate_mask` marks False are set to the float32 minimum, so they get
    no probability mass (keras-rs 0.4 adds ~1e-40 instead, which masks nothing);
    with `num_hard_negatives`, only the positive and the highest-scoring
    negatives are kept.

    Args:
        similarities: `[batch, columns]` query × candidate scores.
        positive_positions: `[batch]` int column of each row's positive;
            defaults to `0..batch-1` (in-batch).
        temperature: logits divisor; must be > 0.
        candidate_ids: `[columns]` ids of the columns; enables accidental-hit
            removal.
        positive_ids: `[batch]` ids of the positives; defaults to
            `candidate_ids[positive_positions]`.
        log_candidate_probability: `[columns]` log sampling probability of each
            column's candidate (logQ correction).
        num_hard_negatives: keep only this many hardest negatives per row.
        sample_weight: optional `[batch]` weights.
        candidate_mask: optional `[columns]` booleans: False columns hold no
            candidate (the padding of per-position training) and are no
            negative for any row. A row's own positive column is kept; give
            such a row a zero `sample_weight`.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: a temperature that is not a finite number > 0; a
            `num_hard_negatives` that is not None or a positive integer;
            `similarities` that is not 2-D, or has fewer columns than rows
            when `positive_positions` is not given.

    Examples:
        >>> import numpy as np
        >>> sims = np.array([[2.0, 2.0, 0.0], [0.0, 1.0, 0.0]], "float32")
        >>> ids = np.array([7, 7, 9])  # column 1 duplicates row 0's positive
        >>> loss = two_tower.losses.retrieval_softmax(sims, candidate_ids=ids)
        >>> round(float(loss), 4)
        0.2201
    """
    _check_temperature(temperature)
    _check_num_hard_negatives(num_hard_negatives)
    shape = tuple(similarities.shape)
    if len(shape) != 2:
        raise ValueError(f"`similarities` must be [batch, columns]. Received shape: {shape}")
    logits = ops.cast(similarities, "float32")
    if float(temperature) != 1.0:  # (x / 1 is x: the default skips a [batch, columns] op)
        logits = logits / temperature
    # Dynamic sizes: under tf.function the batch dimension may be unknown.
    batch_size, num_columns = ops.shape(logits)[0], ops.shape(logits)[1]
    in_batch = positive_positions is None
    if in_batch:
        if shape[0] is not None and shape[1] is not None and shape[1] < shape[0]:
            raise ValueError(
                "In-batch positives need at least as many columns as rows. "
                f"Received similarities of shape {shape}"
            )
        positive_positions = ops.arange(batch_size, dtype="int32")
    positive_positions = ops.cast(ops.reshape(positive_positions, (-1, 1)), "int32")
    if log_candidate_probability is not None:
        log_q = ops.cast(ops.reshape(log_candidate_probability, (1, -1)), "float32")
        logits = logits - log_q
    # The masks are [batch, columns] ops of their own (each a parallel region on a
    # CPU backend): built only for the options that need them.
    masked = (
        candidate_ids is not None or num_hard_negatives is not None or candidate_mask is not None
    )
    if masked:
        is_positive = ops.arange(num_columns, dtype="int32")[None, :] == positive_positions
        lowest = ops.full_like(logits, np.finfo("float32").min)
    if candidate_ids is not None:
        candidate_ids = ops.reshape(candidate_ids, (-1,))
        if positive_ids is None:
            positive_ids = ops.take(candidate_ids, positive_positions[:, 0], axis=0)
        same_id = ops.reshape(positive_ids, (-1, 1)) == candidate_ids[None, :]
        logits = ops.where(ops.logical_and(same_id, ops.logical_not(is_positive)), lowest, logits)
    if candidate_mask is not None:
        absent = ops.logical_not(ops.reshape(ops.cast(candidate_mask, "bool"), (1, -1)))
        logits = ops.where(ops.logical_and(absent, ops.logical_not(is_positive)), lowest, logits)
    if in_batch:  # a view on the diagonal (a gather's backward scatters into [batch, columns])
        positive_logits = ops.expand_dims(ops.diagonal(logits), 1)
    else:
        positive_logits = ops.take_along_axis(logits, positive_positions, axis=1)
    if num_hard_negatives is not None:
        negatives = ops.where(is_positive, lowest, logits)
        # Padding keeps top_k valid when a row has fewer negatives than asked for;
        # padded entries hold the float minimum and add no probability mass.
        padding = ops.full((batch_size, num_hard_negatives), np.finfo("float32").min)
        hardest, _ = ops.top_k(
            ops.concatenate([negatives, ops.cast(padding, "float32")], axis=1),
            num_hard_negatives,
        )
        logits = ops.concatenate([positive_logits, hardest], axis=1)
    if backend_module().softmax_from_log_softmax:
        # The same loss from one fused kernel forward and backward (torch): with
        # `logsumexp - positive` each is several [batch, columns] passes.
        log_probabilities = ops.log_softmax(logits, axis=1)
        if num_hard_negatives is not None:  # the positive is column 0
            per_example = -log_probabilities[:, 0]
        elif in_batch:
            per_example = -ops.diagonal(log_probabilities)
        else:
            positives = ops.take_along_axis(log_probabilities, positive_positions, axis=1)
            per_example = -positives[:, 0]
    else:
        per_example = ops.logsumexp(logits, axis=1) - positive_logits[:, 0]
    return _reduce(per_example, sample_weight)


def in_batch_softmax(
    similarities: Tensor,
    temperature: float = 1.0,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy where row i's positive is column i.

    Every other candidate in the batch is a negative for row i, as in TFRS's
    `tasks.Retrieval`. `retrieval_softmax` adds accidental-hit removal, logQ
    correction and hard negatives.

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

    Examples:
        >>> import numpy as np
        >>> loss = two_tower.losses.in_batch_softmax(np.eye(3, dtype="float32"))
        >>> round(float(loss), 4)
        0.5514
    """
    _check_temperature(temperature)
    shape = tuple(similarities.shape)
    if len(shape) != 2 or (shape[0] is not None and shape[1] is not None and shape[0] != shape[1]):
        raise ValueError(
            f"`similarities` must be a square [batch, batch] matrix. Received shape: {shape}"
        )
    return retrieval_softmax(similarities, temperature=temperature, sample_weight=sample_weight)


__all__ = [
    "in_batch_softmax",
    "mean_squared_error",
    "retrieval_softmax",
]
