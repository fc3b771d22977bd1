"""What `TwoTowerRetrieval` takes and returns: the input keys and the typed output dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from two_tower.types import SAMPLING_PROBABILITY, Tensor

QUERY = "query"
CANDIDATE = "candidate"
PAIR_KEYS = (QUERY, CANDIDATE)


def is_pair(inputs: Any) -> bool:
    """Whether `inputs` is `{"query": ..., "candidate": ...}` (plus the logQ entry)."""
    if not isinstance(inputs, Mapping):
        return False
    keys = set(inputs.keys())
    return {QUERY, CANDIDATE} <= keys <= {QUERY, CANDIDATE, SAMPLING_PROBABILITY}


class _Embeddings(TypedDict):
    query_embeddings: Tensor
    candidate_embeddings: Tensor


class RetrievalOutputs(_Embeddings, total=False):
    """What `TwoTowerRetrieval.call` returns for pair inputs, and the loss reads.

    A `dict` at run time (Keras' steps pass it through `keras.tree`), typed here so
    that what each entry means, and who needs it, is written down once.

    Always present:

    - `query_embeddings`, `candidate_embeddings`: `[batch, dim]` tower outputs.

    Present when the configuration needs them (`RetrievalTask.required_outputs`
    says which; the loss raises naming any that a custom `call` left out):

    - `candidate_ids`: `[batch]` int candidate ids, for `remove_accidental_hits`,
      the catalogue losses (each positive's column) and `FactorizedTopK`.
    - `catalogue_embeddings`: `[catalogue_size, dim]`, every candidate id
      embedded (`"full_softmax"`, and evaluation steps with `FactorizedTopK`).
    - `sampled_candidate_ids`, `sampled_candidate_embeddings`,
      `sampled_candidate_log_probability`: the sampled negatives of
      `"sampled_softmax"` (uniform, or from the model's `negative_sampler`) and
      the log probability of drawing each.
    - `candidate_sampling_probability`: `[batch]` expected occurrences of each
      candidate per batch, for the logQ correction: passed through from the
      input, or the model's `frequency_estimator`'s estimate.
    - `cached_negatives`: training steps with a `negative_cache`: the cache's
      `{"embeddings", "ids", "log_q", "valid"}` before this batch.
    - `metrics_catalogue_embeddings`: the catalogue embeddings again, present in
      evaluation steps only, where `FactorizedTopK` metrics update.
    - `pair_mask`: per-position training only (a query tower that returns
      `[rows, length, dim]`): `[rows * length]` booleans, False where the row is
      padded. The embeddings and ids are then flattened to `rows * length`
      pairs; the loss gives the padded ones no weight and makes them nobody's
      negative.
    """

    candidate_ids: Tensor
    catalogue_embeddings: Tensor
    sampled_candidate_ids: Tensor
    sampled_candidate_embeddings: Tensor
    sampled_candidate_log_probability: Tensor
    cached_negatives: dict[str, Tensor]
    candidate_sampling_probability: Tensor
    metrics_catalogue_embeddings: Tensor
    pair_mask: Tensor
