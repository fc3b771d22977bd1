"""The retrieval task: a loss, its negatives, and the options that go with them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import losses
from two_tower.backends import backend_module
from two_tower.models.retrieval_outputs import SAMPLING_PROBABILITY, RetrievalOutputs
from two_tower.negatives.popularity_sampler import PopularitySampler
from two_tower.types import SimilarityFn, Tensor

LOSSES = ("mse", "softmax", "sampled_softmax", "full_softmax")
CATALOGUE_LOSSES = ("sampled_softmax", "full_softmax")


class RetrievalTask:
    """A `TwoTowerRetrieval`'s loss options, checked together, and the loss they define.

    Built by the model from its own constructor arguments (see `TwoTowerRetrieval`
    for each one's meaning), so the model's config is unchanged; TensorFlow
    Recommenders' `tasks.Retrieval` plays the same part. It is plain Python, not a
    layer: the variables it uses (the candidate tower, the negative sampler's seed)
    stay the model's.

    Args:
        loss: `"mse"`, `"softmax"`, `"sampled_softmax"` or `"full_softmax"`.
        temperature: logits divisor of the softmax losses.
        remove_accidental_hits: mask in-batch duplicates of each row's positive.
        num_hard_negatives: keep this many highest-scoring negatives per row.
        catalogue_size: the number of candidate ids.
        num_sampled_negatives: uniform negatives per batch (`"sampled_softmax"`).
        cross_replica_negatives: under `tf.distribute`, negatives from every replica.
        candidate_id_key: the id feature of dict candidate features.
        candidate_id_limit: `(bound, where it comes from)` of the candidate
            tower's ids, or None when the tower does not declare one.
        estimates_frequency: the model has a `FrequencyEstimator` (logQ).
        caches_negatives: the model has a `NegativeCache`.
        sampler_items: the items of the model's `PopularitySampler`, or None.

    Raises:
        ValueError: an unknown loss, an option out of range, or an option the
            loss does not use.

    Example:
        >>> from two_tower.models.retrieval_task import RetrievalTask
        >>> task = RetrievalTask(loss="full_softmax", catalogue_size=10)
        >>> sorted(task.required_outputs(training=True, ranks_catalogue=False))
        ['candidate_embeddings', 'candidate_ids', 'catalogue_embeddings', 'query_embeddings']
    """

    def __init__(
        self,
        loss: str = "softmax",
        temperature: float = 1.0,
        remove_accidental_hits: bool = False,
        num_hard_negatives: int | None = None,
        catalogue_size: int | None = None,
        num_sampled_negatives: int | None = None,
        cross_replica_negatives: bool = True,
        candidate_id_key: str | None = None,
        candidate_id_limit: tuple[int, str] | None = None,
        estimates_frequency: bool = False,
        caches_negatives: bool = False,
        sampler_items: int | None = None,
    ) -> None:
        _check_negatives(loss, catalogue_size, estimates_frequency, caches_negatives, sampler_items)
        _check(
            loss=loss,
            temperature=temperature,
            remove_accidental_hits=remove_accidental_hits,
            num_hard_negatives=num_hard_negatives,
            catalogue_size=catalogue_size,
            num_sampled_negatives=num_sampled_negatives,
            cross_replica_negatives=cross_replica_negatives,
            candidate_id_limit=candidate_id_limit,
        )
        self.loss = loss
        self.temperature = float(temperature)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        # NumPy scalars are accepted; stored as Python numbers so the config is JSON.
        self.num_hard_negatives = _optional_int(num_hard_negatives)
        self.catalogue_size = _optional_int(catalogue_size)
        self.num_sampled_negatives = _optional_int(num_sampled_negatives)
        self.cross_replica_negatives = bool(cross_replica_negatives)
        self.candidate_id_key = candidate_id_key
        self.estimates_frequency = bool(estimates_frequency)
        self.caches_negatives = bool(caches_negatives)

    @property
    def uses_catalogue(self) -> bool:
        """Whether the loss embeds catalogue candidates (all of them, or samples)."""
        return self.loss in CATALOGUE_LOSSES

    def required_outputs(self, *, training: bool, ranks_catalogue: bool) -> frozenset[str]:
        """The `RetrievalOutputs` keys a step of this task needs from `call`.

        Args:
            training: a training step (else evaluation).
            ranks_catalogue: the model has `FactorizedTopK` metrics.
        """
        keys = {"query_embeddings", "candidate_embeddings"}
        evaluating_metrics = ranks_catalogue and not training
        if (
            self.remove_accidental_hits
            or self.uses_catalogue
            or evaluating_metrics
            or self.estimates_frequency
            or self.caches_negatives
        ):
            keys.add("candidate_ids")
        if self.loss == "full_softmax" or evaluating_metrics:
            keys.add("catalogue_embeddings")
        if self.loss == "sampled_softmax":
            keys |= {
                "sampled_candidate_ids",
                "sampled_candidate_embeddings",
                "sampled_candidate_log_probability",
            }
        if self.estimates_frequency:
            keys.add(SAMPLING_PROBABILITY)
        if self.caches_negatives and training:
            keys.add("cached_negatives")
        if evaluating_metrics:
            keys.add("metrics_catalogue_embeddings")
        return frozenset(keys)

    def check_outputs(
        self, outputs: Mapping[str, Any], *, training: bool, ranks_catalogue: bool
    ) -> None:
        """Raises, naming them, when `outputs` lack keys `required_outputs` lists.

        A `call` override that returns only the two embeddings would otherwise
        train without what its configuration asks for (accidental-hit removal,
        the catalogue's columns) or raise a bare `KeyError`.
        """
        needed = self.required_outputs(training=training, ranks_catalogue=ranks_catalogue)
        missing = sorted(needed - set(outputs))
        if missing:
            raise ValueError(
                f"`call` returned no {missing}, which loss={self.loss!r} "
                f"(remove_accidental_hits={self.remove_accidental_hits}"
                + (", FactorizedTopK metrics" if ranks_catalogue else "")
                + ") needs. A `call` override must return "
                "`self.retrieval_outputs(inputs, query_embeddings, candidate_embeddings, "
                f"training)`. Received outputs {sorted(outputs)}"
            )

    def candidate_ids_of(self, candidate_features: Any) -> Tensor:
        """The batch's `[batch]` candidate ids, from the input or its id feature."""
        if isinstance(candidate_features, Mapping):
            key = self.candidate_id_key
            if key is None or key not in candidate_features:
                raise ValueError(
                    "With dict candidate features, remove_accidental_hits, the catalogue "
                    "losses and FactorizedTopK metrics need `candidate_id_key` naming "
                    f"the id feature. Received candidate_id_key={key!r} "
                    f"and features {sorted(candidate_features)}"
                )
            candidate_features = candidate_features[key]
        dtype = keras.backend.standardize_dtype(candidate_features.dtype)
        if "int" not in dtype:
            raise ValueError(
                f"Candidate ids must be integers. Received candidate ids of dtype {dtype}"
            )
        return ops.reshape(candidate_features, (-1,))

    def sample_negatives(
        self,
        candidate_tower: keras.layers.Layer,
        catalogue: Any,
        seed: keras.random.SeedGenerator,
        training: bool,
        sampler: PopularitySampler | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`"sampled_softmax"`'s negatives, uniform or from `sampler`:
        `[num_sampled_negatives]` ids, their embeddings and each one's log
        probability of being drawn."""
        assert self.catalogue_size is not None and self.num_sampled_negatives is not None
        count = self.num_sampled_negatives
        if sampler is None:
            ids = keras.random.randint((count,), 0, self.catalogue_size, dtype="int32", seed=seed)
            log_probability = ops.full((count,), -float(np.log(self.catalogue_size)), "float32")
        else:
            ids, log_probability = sampler.sample(count, seed)
        rows = keras.tree.map_structure(lambda column: ops.take(column, ids, axis=0), catalogue)
        return ids, candidate_tower(rows, training=training), log_probability

    def compute_loss(
        self,
        labels: Tensor | None,
        outputs: RetrievalOutputs,
        sample_weight: Tensor | None,
        *,
        similarity_fn: SimilarityFn,
        score_fn: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        """The loss of one batch.

        Args:
            labels: `y` (for `"mse"`), or None.
            outputs: what the model's `call` returned for the batch.
            sample_weight: `[batch]` weights or None.
            similarity_fn: `[queries, dim] x [candidates, dim] -> [queries,
                candidates]` scores (the model's `compute_similarities`).
            score_fn: `[batch]` scores of aligned pairs (`compute_scores`).

        Raises:
            ValueError: labels missing for `"mse"` or given to a softmax loss.
        """
        if self.loss == "mse":
            if labels is None:
                raise ValueError(
                    "loss='mse' needs labels: pass `y` (e.g. ratings) to fit/evaluate."
                )
            scores = score_fn(outputs["query_embeddings"], outputs["candidate_embeddings"])
            return losses.mean_squared_error(labels, scores, sample_weight)
        if labels is not None:
            raise ValueError(
                f"loss={self.loss!r} takes no labels, but `y` was given. Every pair in x "
                "is a positive; use `sample_weight` to weight pairs."
            )
        mask = outputs.get("pair_mask")
        if mask is not None:
            sample_weight = _position_weights(mask, sample_weight)
        if self.loss == "full_softmax":
            # Columns are the whole catalogue; each positive sits at its id.
            return self._softmax(
                outputs, outputs["catalogue_embeddings"], similarity_fn, sample_weight,
                positive_positions=outputs["candidate_ids"],
            )  # fmt: skip
        return self._batch_softmax(outputs, similarity_fn, sample_weight)

    def _batch_softmax(
        self,
        outputs: RetrievalOutputs,
        similarity_fn: SimilarityFn,
        sample_weight: Tensor | None,
    ) -> Tensor:
        """`"softmax"` and `"sampled_softmax"`: the batch's candidates as negatives
        (every replica's, with `cross_replica_negatives`), then any cached rows of
        earlier batches, then any sampled negatives.

        With the logQ correction, each source of columns is corrected by its own
        expected occurrences of the item, so that each estimates the full
        softmax's normaliser alike: the batch and the cache are one sample from
        the training log (`b + c` rows: a candidate's estimate per global batch
        of `B` times `(b + c) / B`; `b = B` but with `tf.distribute` and
        `cross_replica_negatives=False`), the sampled negatives another
        (`num_sampled_negatives` times the probability of drawing it).
        """
        probability = outputs.get(SAMPLING_PROBABILITY)
        log_q = None if probability is None else ops.log(ops.cast(probability, "float32"))
        ids = outputs.get("candidate_ids") if self.remove_accidental_hits else None
        embeddings = ops.cast(outputs["candidate_embeddings"], "float32")
        # Per-position training: padded positions are no negative for anyone.
        mask = outputs.get("pair_mask")
        mask = None if mask is None else ops.cast(mask, "int32")
        positives = None
        backend = backend_module()
        if log_q is not None:  # the rows the estimate is per: every replica's
            counted = _valid_rows(backend.all_replicas(_row_flags(embeddings, mask)))
        if self.cross_replica_negatives:  # (unchanged off tf.distribute)
            embeddings, ids, log_q, mask, positives = backend.global_negatives(
                embeddings, ids, log_q, mask
            )
        columns = [embeddings]
        id_parts = None if ids is None else [ops.cast(ids, "int32")]
        rows = ops.shape(embeddings)[0]
        mask_parts = None if mask is None else [mask]
        cached = outputs.get("cached_negatives")
        log_q_parts = None
        if log_q is not None:
            # The batch's columns (and the cache's) are one sample of `sample`
            # rows from the log, the estimate is per `counted` rows: log q scales
            # by their ratio (1 with one device and no cache).
            sample = _valid_rows(_row_flags(embeddings, mask))
            if cached is not None:
                sample = sample + position_count(cached["valid"])
            shift = ops.log(sample / counted)
            log_q_parts = [log_q + shift]
            if cached is not None:
                log_q_parts.append(cached["log_q"] + shift)
        if cached is not None:
            valid = ops.cast(cached["valid"], "int32")
            columns.append(cached["embeddings"])
            if id_parts is not None:
                id_parts.append(cached["ids"])
            mask_parts = [ops.ones((rows,), "int32") if mask is None else mask, valid]
        if self.loss == "sampled_softmax":
            assert self.num_sampled_negatives
            count = self.num_sampled_negatives
            columns.append(ops.cast(outputs["sampled_candidate_embeddings"], "float32"))
            if id_parts is not None:
                id_parts.append(outputs["sampled_candidate_ids"])
            if log_q_parts is not None:
                log_q_parts.append(
                    float(np.log(count)) + outputs["sampled_candidate_log_probability"]
                )
            if mask_parts is not None:
                mask_parts.append(ops.ones((count,), "int32"))
        return self._softmax(
            outputs, _joined(columns), similarity_fn, sample_weight,
            positive_positions=positives, candidate_ids=_joined(id_parts),
            log_q=_joined(log_q_parts),
            candidate_mask=None if mask_parts is None else ops.greater(_joined(mask_parts), 0),
        )  # fmt: skip

    def _softmax(
        self,
        outputs: RetrievalOutputs,
        columns: Tensor,
        similarity_fn: SimilarityFn,
        sample_weight: Tensor | None,
        *,
        positive_positions: Tensor | None,
        candidate_ids: Tensor | None = None,
        log_q: Tensor | None = None,
        candidate_mask: Tensor | None = None,
    ) -> Tensor:
        # Scores and loss in float32, whatever the towers' compute dtype (mixed
        # precision): bfloat16 logits would round a temperature-scaled softmax.
        queries = ops.cast(outputs["query_embeddings"], "float32")
        return losses.retrieval_softmax(
            similarity_fn(queries, ops.cast(columns, "float32")),
            positive_positions,
            temperature=self.temperature,
            candidate_ids=candidate_ids,
            log_candidate_probability=log_q,
            num_hard_negatives=self.num_hard_negatives,
            sample_weight=sample_weight,
            candidate_mask=candidate_mask,
        )

    def get_config(self) -> dict[str, Any]:
        """The model's constructor arguments this task stands for."""
        return {
            "loss": self.loss,
            "temperature": self.temperature,
            "remove_accidental_hits": self.remove_accidental_hits,
            "num_hard_negatives": self.num_hard_negatives,
            "catalogue_size": self.catalogue_size,
            "num_sampled_negatives": self.num_sampled_negatives,
            "cross_replica_negatives": self.cross_replica_negatives,
        }


def _row_flags(embeddings: Tensor, mask: Tensor | None) -> Tensor:
    """`[rows]` int32: 1 for each row that holds a candidate (all of them without a mask)."""
    if mask is None:
        return ops.ones((ops.shape(embeddings)[0],), "int32")
    return ops.cast(mask, "int32")


def _valid_rows(flags: Tensor) -> Tensor:
    """How many flags are set, as float32, at least 1."""
    return ops.maximum(position_count(flags), 1.0)


def _joined(parts: list[Tensor] | None) -> Tensor | None:
    """The parts concatenated on axis 0 (one part as it is), or None."""
    if parts is None:
        return None
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)


def _check_negatives(
    loss: str,
    catalogue_size: int | None,
    estimates_frequency: bool,
    caches_negatives: bool,
    sampler_items: int | None,
) -> None:
    """Checks `frequency_estimator`, `negative_cache` and `negative_sampler` against the loss."""
    batch_losses = ("softmax", "sampled_softmax")
    for name, given in (
        ("frequency_estimator", estimates_frequency),
        ("negative_cache", caches_negatives),
    ):
        if given and loss not in batch_losses:
            raise ValueError(
                f"`{name}` applies to loss='softmax' and 'sampled_softmax', whose negatives "
                f"are other rows' candidates. Received loss={loss!r}"
            )
    if sampler_items is not None:
        if loss != "sampled_softmax":
            raise ValueError(
                "`negative_sampler` draws loss='sampled_softmax''s negatives. "
                f"Received loss={loss!r}"
            )
        if catalogue_size is not None and sampler_items != catalogue_size:
            raise ValueError(
                f"`negative_sampler` must draw from the catalogue's {catalogue_size} ids "
                f"(`catalogue_size`). Received a PopularitySampler over {sampler_items} items"
            )


def _position_weights(mask: Tensor, sample_weight: Tensor | None) -> Tensor:
    """Per-position training's `[rows * length]` weights: 0 where a row is padded.

    `sample_weight` is `[rows, length]` (a weight per position) or `[rows]` (one
    per row, for each of its positions).

    Scaled so that the loss is the mean over the batch's items (not over its
    padded positions too): the loss of the same pairs given one per row. Across
    `tf.distribute` replicas, `TwoTowerRetrieval.compute_loss` weighs each
    replica by its number of items (`position_count`), which keeps that exact.
    """
    weights = ops.cast(mask, "float32")
    scale = ops.cast(ops.size(weights), "float32") / ops.maximum(position_count(mask), 1.0)
    if sample_weight is not None:
        given = ops.cast(sample_weight, "float32")
        shape = tuple(given.shape)
        if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):  # one weight per row
            rows = ops.reshape(given, (-1, 1))
            given = rows * ops.ones_like(ops.reshape(weights, (ops.shape(rows)[0], -1)))
        weights = weights * ops.reshape(given, (-1,))
    return weights * scale


def position_count(mask: Tensor) -> Tensor:
    """The items (not padding) of a per-position batch (float32; 0 for an empty replica)."""
    return ops.sum(ops.cast(mask, "float32"))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value > 0)


def _check(
    *,
    loss: str,
    temperature: float,
    remove_accidental_hits: bool,
    num_hard_negatives: int | None,
    catalogue_size: int | None,
    num_sampled_negatives: int | None,
    cross_replica_negatives: bool,
    candidate_id_limit: tuple[int, str] | None,
) -> None:
    """Checks the task's arguments together (see `TwoTowerRetrieval`)."""
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES}. Received: loss={loss!r}")
    losses._check_temperature(temperature)
    losses._check_num_hard_negatives(num_hard_negatives)
    if loss in CATALOGUE_LOSSES and not _is_positive_int(catalogue_size):
        raise ValueError(
            f"loss={loss!r} needs `catalogue_size`, the number of candidate ids "
            f"(ids run from 0 to catalogue_size - 1). Received: {catalogue_size!r}"
        )
    if catalogue_size is not None and not _is_positive_int(catalogue_size):
        raise ValueError(
            "`catalogue_size` must be a positive integer (ids run from 0 to "
            f"catalogue_size - 1), or None. Received: {catalogue_size!r}"
        )
    limit = candidate_id_limit
    if catalogue_size is not None and limit is not None and catalogue_size > limit[0]:
        raise ValueError(
            f"`catalogue_size` (={catalogue_size}) must not exceed {limit[1]} "
            f"(={limit[0]}): the catalogue losses and metrics embed every id below it."
        )
    if loss == "sampled_softmax" and not _is_positive_int(num_sampled_negatives):
        raise ValueError(
            "loss='sampled_softmax' needs `num_sampled_negatives`, a positive "
            f"integer. Received: {num_sampled_negatives!r}"
        )
    if not isinstance(remove_accidental_hits, (bool, np.bool_)):
        raise ValueError(
            f"`remove_accidental_hits` must be True or False. Received: {remove_accidental_hits!r}"
        )
    if num_sampled_negatives is not None and loss != "sampled_softmax":
        raise ValueError(
            "`num_sampled_negatives` applies to loss='sampled_softmax' only. Received "
            f"loss={loss!r} and num_sampled_negatives={num_sampled_negatives!r}"
        )
    if loss == "mse" and (remove_accidental_hits or num_hard_negatives is not None):
        raise ValueError(
            "`remove_accidental_hits` and `num_hard_negatives` apply to the softmax "
            "losses only. Received loss='mse'."
        )
    if loss == "full_softmax" and remove_accidental_hits:
        raise ValueError(
            "`remove_accidental_hits` applies to loss='softmax' and 'sampled_softmax', "
            "whose negatives are other rows' candidates; loss='full_softmax' scores each "
            "positive once against the catalogue, so there is nothing to remove."
        )
    if not isinstance(cross_replica_negatives, (bool, np.bool_)):
        raise ValueError(
            "`cross_replica_negatives` must be True or False. Received: "
            f"{cross_replica_negatives!r}"
        )
