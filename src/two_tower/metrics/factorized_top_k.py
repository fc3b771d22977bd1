"""Full-catalogue top-k retrieval metrics, computed in candidate chunks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.retrieval.top_k import dot_similarities
from two_tower.types import SimilarityFn, Tensor


def check_id_range(values: np.ndarray, limit: int, what: str) -> None:
    """Raises ValueError naming `what` unless every value lies in [0, limit)."""
    if values.size and (values.min() < 0 or values.max() >= limit):
        raise ValueError(
            f"`{what}` must lie in [0, {limit}). Received values from {values.min()} "
            f"to {values.max()}"
        )


@keras.saving.register_keras_serializable(package="two_tower")
class FactorizedTopK(keras.metrics.Metric):
    """Hit rate (top-k accuracy), recall and NDCG at several k, over the full catalogue.

    For each (query, positive candidate) pair it finds the positive's rank: how
    many catalogue candidates score strictly higher than it, not counting
    excluded ones. The catalogue is scored `chunk_size` candidates at a time, so
    memory grows with the chunk, not with the catalogue. Ties count in the
    positive's favour, the same way on every backend; a NaN score counts
    against it (a NaN query or positive embedding is a miss at every k).

    Reported, for each k in `ks`:

    - `{name}_accuracy_at_{k}`: the share of pairs whose positive ranks in the
      top k (TFRS's `FactorizedTopK` top-k categorical accuracy; the hit rate).
    - `{name}_ndcg_at_{k}`: `1 / log2(rank + 2)` when it ranks in the top k, else
      0, averaged over pairs (one relevant item per pair).
    - `{name}_recall_at_{k}`, when `num_queries` is given: for each query, the
      share of its positives that rank in the top k, averaged over queries.

    With `exclude_query_ids` and `exclude_candidate_ids` (e.g. the training
    pairs), each query's excluded candidates are left out of its ranking: the
    realistic protocol of not recommending what a user has already seen. The
    exclusions are kept per query in compressed sparse rows (each query's
    excluded candidates, sorted and deduplicated): memory grows with the number
    of excluded pairs, never with `num_queries × catalogue_size`. Each batch
    gathers its queries' lists (`[batch, longest list]`) and marks them in each
    candidate chunk's `[batch, chunk]` scores.

    `TwoTowerRetrieval` feeds this metric when it is passed to
    `compile(metrics=[...])`. Called directly, `update_state` takes embeddings.

    Serialization: `get_config` stores `ks`, `num_queries`, `catalogue_size` and
    `chunk_size`, not the exclusion pairs (they are data, often large).

    Args:
        ks: the cut-offs, each a positive integer (one integer for a single k).
        num_queries: number of query ids (ids run from 0); enables recall and is
            required with exclusions.
        catalogue_size: number of candidate positions; required with exclusions.
        exclude_query_ids: `[pairs]` query ids of the pairs to exclude.
        exclude_candidate_ids: `[pairs]` candidate positions of the pairs to
            exclude.
        chunk_size: candidates scored at once.
        name: metric name, the prefix of every result key.
        **kwargs: standard `keras.metrics.Metric` arguments.

    Raises:
        ValueError: `ks`, `num_queries`, `catalogue_size` or `chunk_size` that
            are not positive integers; only one of the two exclusion arrays;
            exclusions without `num_queries` and `catalogue_size`, of different
            lengths, or with ids out of range.

    Examples:
        >>> import numpy as np
        >>> metric = two_tower.FactorizedTopK(ks=(1, 2))
        >>> catalogue = np.eye(3, dtype="float32")
        >>> queries = np.array([[1.0, 0.5, 0.0], [0.0, 0.2, 1.0]], "float32")
        >>> metric.update_state(queries, catalogue, np.array([1, 2]))
        >>> {k: float(v) for k, v in metric.result().items()}["top_k_accuracy_at_1"]
        0.5
    """

    def __init__(
        self,
        ks: Sequence[int] | int = (1, 5, 10, 50, 100),
        num_queries: int | None = None,
        catalogue_size: int | None = None,
        exclude_query_ids: Any = None,
        exclude_candidate_ids: Any = None,
        chunk_size: int = 65_536,
        name: str = "top_k",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
            ks = (int(ks),)  # one k
        if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
            raise ValueError(f"`ks` must be a sequence of positive integers. Received: ks={ks!r}")
        ks = tuple(int(k) if isinstance(k, np.integer) else k for k in ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
            raise ValueError(f"`ks` must be positive integers. Received: ks={ks!r}")
        for name, value in (("num_queries", num_queries), ("catalogue_size", catalogue_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0
            ):
                raise ValueError(
                    f"`{name}` must be a positive integer or None. Received: {name}={value!r}"
                )
        chunk_size = _arguments.integer("chunk_size", chunk_size, owner="FactorizedTopK")
        self.ks = ks
        self.num_queries = None if num_queries is None else int(num_queries)
        self.catalogue_size = None if catalogue_size is None else int(catalogue_size)
        self.chunk_size = chunk_size
        # Compressed sparse rows: query q's excluded candidates are
        # `_exclusion_candidates[_exclusion_offsets[q]:_exclusion_offsets[q + 1]]`.
        self._exclusion_offsets: Tensor | None = None
        self._exclusion_candidates: Tensor | None = None
        self._longest_exclusion = 0
        if (exclude_query_ids is None) != (exclude_candidate_ids is None):
            raise ValueError(
                "Pass both `exclude_query_ids` and `exclude_candidate_ids`, or neither."
            )
        if exclude_query_ids is not None:
            offsets, candidates = self._exclusion_lists(exclude_query_ids, exclude_candidate_ids)
            self._longest_exclusion = int(np.diff(offsets).max(initial=0))
            self._exclusion_offsets = ops.convert_to_tensor(offsets)
            self._exclusion_candidates = ops.convert_to_tensor(candidates)
        self.pairs = self.add_variable((), initializer="zeros", name="pairs")
        self.hits = self.add_variable((len(ks),), initializer="zeros", name="hits")
        self.ndcg = self.add_variable((len(ks),), initializer="zeros", name="ndcg")
        if num_queries is not None:
            self.query_hits = self.add_variable(
                (num_queries, len(ks)), initializer="zeros", name="query_hits"
            )
            self.query_pairs = self.add_variable(
                (num_queries,), initializer="zeros", name="query_pairs"
            )

    @property
    def excludes(self) -> bool:
        """Whether this metric leaves excluded pairs out of the ranking."""
        return self._exclusion_offsets is not None

    def _exclusion_lists(self, query_ids: Any, candidate_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """`(offsets [num_queries + 1], candidates [distinct pairs])`, both int32."""
        if self.num_queries is None or self.catalogue_size is None:
            raise ValueError(
                "Exclusions need `num_queries` and `catalogue_size`. Received "
                f"num_queries={self.num_queries!r}, catalogue_size={self.catalogue_size!r}"
            )
        query_ids = np.asarray(query_ids).reshape(-1)
        candidate_ids = np.asarray(candidate_ids).reshape(-1)
        if query_ids.shape != candidate_ids.shape:
            raise ValueError(
                "`exclude_query_ids` and `exclude_candidate_ids` must have the same "
                f"length. Received {query_ids.shape[0]} and {candidate_ids.shape[0]}"
            )
        check_id_range(query_ids, self.num_queries, "exclude_query_ids")
        check_id_range(candidate_ids, self.catalogue_size, "exclude_candidate_ids")
        # One int64 key per pair sorts by query, then candidate, and drops repeats.
        keys = np.unique(query_ids.astype("int64") * self.catalogue_size + candidate_ids)
        counts = np.bincount(keys // self.catalogue_size, minlength=self.num_queries)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype("int32")
        return offsets, (keys % self.catalogue_size).astype("int32")

    def _excluded_lists(self, query_ids: Tensor) -> Tensor:
        """`[batch, longest list]` excluded candidates of each query, -1 padded."""
        assert self._exclusion_offsets is not None and self._exclusion_candidates is not None
        starts = ops.take(self._exclusion_offsets, query_ids, axis=0)
        lengths = ops.take(self._exclusion_offsets, query_ids + 1, axis=0) - starts
        slots = ops.arange(self._longest_exclusion, dtype="int32")[None, :]
        present = slots < lengths[:, None]
        positions = ops.where(present, starts[:, None] + slots, 0)
        candidates = ops.take(self._exclusion_candidates, positions, axis=0)
        return ops.where(present, candidates, -1)

    @staticmethod
    def _chunk_mask(excluded: Tensor, start: int, stop: int) -> Tensor:
        """`[batch, stop - start]`: True where the query excludes that candidate.

        A segment sum over flat `row * width + column` positions, not
        `ops.scatter`: Keras' torch `scatter` loops over the indices in Python.
        """
        width = stop - start
        batch = ops.shape(excluded)[0]
        inside = ops.logical_and(excluded >= start, excluded < stop)
        rows = ops.arange(batch, dtype="int32")[:, None] * width
        positions = ops.reshape(rows + ops.where(inside, excluded - start, 0), (-1,))
        marks = ops.reshape(ops.cast(inside, "int32"), (-1,))
        counts = ops.segment_sum(marks, positions, num_segments=batch * width)
        return ops.reshape(counts, (batch, width)) > 0

    def update_state(
        self,
        query_embeddings: Tensor,
        catalogue_embeddings: Tensor,
        positive_positions: Tensor,
        query_ids: Tensor | None = None,
        similarity_fn: SimilarityFn | None = None,
        sample_weight: Tensor | None = None,
    ) -> None:
        """Adds one batch of pairs.

        Args:
            query_embeddings: `[batch, dim]`.
            catalogue_embeddings: `[catalogue, dim]`, every candidate.
            positive_positions: `[batch]` int row of each pair's positive in the
                catalogue.
            query_ids: `[batch]` int query ids, needed for recall and exclusions.
            similarity_fn: scores `[queries, candidates]`; the dot product by
                default.
            sample_weight: ignored; present for the Keras metric signature.

        Raises:
            ValueError: no `query_ids` when recall or exclusions need them.
        """
        if (self.excludes or self.num_queries is not None) and query_ids is None:
            raise ValueError(
                f"Metric '{self.name}' needs `query_ids` (for recall or exclusions). "
                "With TwoTowerRetrieval, the query input must be a tensor of int ids, "
                "or a dict with the ids under the model's `query_id_key`."
            )
        similarity_fn = similarity_fn or dot_similarities
        positive_positions = ops.reshape(ops.cast(positive_positions, "int32"), (-1,))
        positives = ops.take(catalogue_embeddings, positive_positions, axis=0)
        positive_scores = ops.diagonal(similarity_fn(query_embeddings, positives))[:, None]
        num_candidates = catalogue_embeddings.shape[0]
        if query_ids is not None:
            query_ids = ops.reshape(ops.cast(query_ids, "int32"), (-1,))
        rank = ops.zeros_like(positive_scores[:, 0], dtype="int32")
        excluded = None
        if self.excludes and self._longest_exclusion:
            assert query_ids is not None
            excluded = self._excluded_lists(query_ids)
        for start in range(0, num_candidates, self.chunk_size):
            stop = min(start + self.chunk_size, num_candidates)
            scores = similarity_fn(query_embeddings, catalogue_embeddings[start:stop])
            columns = ops.arange(start, stop, dtype="int32")[None, :]
            # `not <=` rather than `>`: a NaN score (either side) counts against the
            # positive, so NaN embeddings give misses, never perfect ranks.
            beats = ops.logical_and(
                ops.logical_not(scores <= positive_scores),
                columns != positive_positions[:, None],
            )
            if excluded is not None:
                mask = self._chunk_mask(excluded, start, stop)
                beats = ops.logical_and(beats, ops.logical_not(mask))
            rank = rank + ops.sum(ops.cast(beats, "int32"), axis=1)
        ks = ops.convert_to_tensor(np.asarray(self.ks, "int32"))[None, :]
        rank = rank[:, None]
        hit = ops.cast(rank < ks, "float32")  # [batch, len(ks)]
        gain = hit / ops.log2(ops.cast(rank, "float32") + 2.0)
        self.pairs.assign_add(ops.cast(ops.shape(hit)[0], "float32"))
        self.hits.assign_add(ops.sum(hit, axis=0))
        self.ndcg.assign_add(ops.sum(gain, axis=0))
        if self.num_queries is not None:
            assert query_ids is not None
            # Summed per query id (no [batch, num_queries] one-hot).
            self.query_hits.assign_add(
                ops.segment_sum(hit, query_ids, num_segments=self.num_queries)
            )
            self.query_pairs.assign_add(
                ops.segment_sum(ops.ones_like(hit[:, 0]), query_ids, num_segments=self.num_queries)
            )

    def result(self) -> dict[str, Tensor]:
        pairs = ops.maximum(self.pairs, 1.0)
        results = {}
        for i, k in enumerate(self.ks):
            results[f"{self.name}_accuracy_at_{k}"] = self.hits[i] / pairs
        if self.num_queries is not None:
            seen = self.query_pairs > 0
            per_query = self.query_hits / ops.maximum(self.query_pairs, 1.0)[:, None]
            recall = ops.sum(ops.where(seen[:, None], per_query, 0.0), axis=0) / ops.maximum(
                ops.sum(ops.cast(seen, "float32")), 1.0
            )
            for i, k in enumerate(self.ks):
                results[f"{self.name}_recall_at_{k}"] = recall[i]
        for i, k in enumerate(self.ks):
            results[f"{self.name}_ndcg_at_{k}"] = self.ndcg[i] / pairs
        return results

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "ks": list(self.ks),
                "num_queries": self.num_queries,
                "catalogue_size": self.catalogue_size,
                "chunk_size": self.chunk_size,
            }
        )
        return config
