"""`CandidateIndex`: what `TwoTowerRetrieval` needs from the index it serves from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from two_tower.types import SimilarityFn


@runtime_checkable
class CandidateIndex(Protocol):
    """A top-k index over embedded candidates, as the model uses it.

    `TwoTowerRetrieval.index_candidates` fills it block by block (`index`),
    `recommend` and `similar_items` query it (`search`, with the model's
    `compute_similarities` and the caller's exclusions), `similar_items` looks
    items up (`positions_of`), and every serving call first checks that it is
    filled (`num_candidates`). `two_tower.BruteForceIndex` (exact) and
    `two_tower.FaissIndex` (approximate) both provide it, and both declare it as
    a base class, so that mypy checks their signatures against it. (Keras ships
    no type information, so mypy sees a `keras.layers.Layer` subclass as
    having every attribute: only the tests notice a missing member.)

    To be saved inside a `.keras` file as the model's `candidate_index`, an
    index must also be a registered `keras.layers.Layer` that writes its
    catalogue in `save_assets` and reads it back in `load_assets`.

    Not part of it: `BruteForceIndex.embeddings()`, which an IVF-PQ index cannot
    give back exactly, and the search's compiled internals.

    Example:
        >>> from two_tower.retrieval import CandidateIndex
        >>> isinstance(two_tower.BruteForceIndex(), CandidateIndex)
        True
    """

    @property
    def num_candidates(self) -> int:
        """How many candidates are indexed (0 before `index`)."""
        ...

    @property
    def candidate_ids(self) -> np.ndarray | None:
        """The indexed candidate ids, one per position, or None before `index`."""
        ...

    def index(self, candidate_embeddings: Any, candidate_ids: Any = None) -> None:
        """Replaces the catalogue.

        Args:
            candidate_embeddings: `[candidates, dim]` array-like, or an iterable
                of `[rows, dim]` blocks (or of `(embeddings, ids)` pairs) in
                catalogue order: the model passes its candidate tower's output
                batch by batch.
            candidate_ids: unique integer or string ids, one per row; defaults
                to positions (or to the ids of the pairs).
        """
        ...

    def search(
        self,
        query_embeddings: Any,
        k: int = 10,
        similarity_fn: SimilarityFn | None = None,
        *,
        exclude: Sequence[Any] | None = None,
        ignore_unknown_exclusions: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top `k` candidates of each query, best first.

        Args:
            query_embeddings: `[queries, dim]` array-like.
            k: results per query, `1 <= k <= num_candidates`.
            similarity_fn: `f(query_embeddings, candidate_embeddings)` scores;
                None for the dot product.
            exclude: one sequence of candidate ids (or None) per query to leave
                out of its results.
            ignore_unknown_exclusions: skip excluded ids that are not indexed
                instead of raising.

        Returns:
            `(ids, scores)`, NumPy arrays of shape `[queries, k]`, the order of
            `TwoTowerRetrieval.recommend(..., return_scores=True)`.
        """
        ...

    def positions_of(self, ids: Any, *, ignore_unknown: bool = False) -> np.ndarray:
        """int64 catalogue positions of `ids`; -1 for unknown ids if `ignore_unknown`."""
        ...


if TYPE_CHECKING:
    # mypy checks each index against the protocol here (and, through their
    # declared base, each method's signature).
    from two_tower.retrieval.brute_force_index import BruteForceIndex
    from two_tower.retrieval.faiss_index import FaissIndex

    _EXACT: CandidateIndex = BruteForceIndex()
    _APPROXIMATE: CandidateIndex = FaissIndex()
