"""Exact top-k retrieval over an indexed candidate catalogue."""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower.types import SimilarityFn, Tensor

_EMBEDDINGS_FILE = "candidate_embeddings.npy"
_IDS_FILE = "candidate_ids.npy"


def dot_similarities(query_embeddings: Tensor, candidate_embeddings: Tensor) -> Tensor:
    return ops.matmul(query_embeddings, ops.transpose(candidate_embeddings))


def _normalise_ids(candidate_ids: Any) -> np.ndarray:
    """Ids as an integer or string NumPy array; mixed or other kinds raise."""
    ids = np.asarray(candidate_ids)
    if ids.dtype == object:
        values = ids.reshape(-1).tolist()
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            try:
                ids = np.asarray(values, dtype="int64").reshape(ids.shape)
            except OverflowError:
                raise ValueError(
                    "Integer `candidate_ids` must fit in int64. Received values up to "
                    f"{max(values)}"
                ) from None
        elif all(isinstance(v, str) for v in values):
            ids = ids.astype(str)
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise ValueError(
                f"`candidate_ids` must be all integers or all strings. Received a mix of {kinds}"
            )
    if ids.dtype.kind not in "iuU":
        raise ValueError(f"`candidate_ids` must be integers or strings. Received dtype {ids.dtype}")
    return ids


@keras.saving.register_keras_serializable(package="two_tower")
class BruteForceIndex(keras.layers.Layer):
    """Exact top-k search over candidate embeddings, scored in chunks.

    It scores the queries against `chunk_size` candidates at a time and merges
    each chunk's top k into a running top k, so memory grows with the chunk, not
    with the catalogue.

    We write our own instead of using `keras_rs.layers.BruteForceRetrieval`
    because, in keras-rs 0.4, that layer casts candidate ids to int32 (ids above
    2**31 come back corrupted), freezes the catalogue size at first use, stores a
    bound method in `get_config`, fails to reload inside a saved model on JAX,
    and materialises the whole `[queries, candidates]` score matrix.

    Candidate ids never enter the compiled graph: they are kept as a NumPy array
    and positions are mapped to ids on the host. So int64 ids of the full range
    (and, on any backend, string ids) come back intact, even on JAX without x64.

    The index (embeddings and ids) is saved as assets of a `.keras` file and
    restored by `keras.saving.load_model`. It can be re-indexed at any time with
    a catalogue of a different size.

    Ties: equal scores are ordered by `keras.ops.top_k`, which on JAX and
    TensorFlow puts the lower candidate position first; torch does not promise
    an order for ties.

    Args:
        chunk_size: number of candidates scored at once. Bounds peak memory at
            about `queries × chunk_size` scores.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        query_embeddings: `[queries, dim]` tensor.
        k: how many candidates to return per query.

    Returns:
        From `call`: a `(scores, positions)` tuple of `[queries, k]` tensors, best
        first; positions index the indexed catalogue. `search` maps positions to
        candidate ids.

    Example:
    >>> import numpy as np
    >>> index = two_tower.BruteForceIndex()
    >>> index.index(np.eye(3, dtype="float32"), np.array([10, 20, 30]))
    >>> scores, ids = index.search(np.array([[0.0, 1.0, 0.0]], "float32"), k=2)
    >>> ids[0, 0]
    np.int64(20)
    """

    def __init__(self, chunk_size: int = 65_536, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"`chunk_size` must be a positive integer. Received: {chunk_size!r}")
        self.chunk_size = chunk_size
        self._candidate_embeddings: Tensor | None = None
        self._candidate_ids: np.ndarray | None = None
        self.built = True

    @property
    def num_candidates(self) -> int:
        """How many candidates are indexed (0 before `index` is called)."""
        return 0 if self._candidate_ids is None else len(self._candidate_ids)

    @property
    def candidate_ids(self) -> np.ndarray | None:
        """The indexed candidate ids as a NumPy array, or None."""
        return self._candidate_ids

    @property
    def candidate_embeddings(self) -> Tensor | None:
        """The indexed `[candidates, dim]` embeddings as a backend tensor, or None."""
        return self._candidate_embeddings

    def index(self, candidate_embeddings: Any, candidate_ids: Any = None) -> None:
        """Replaces the catalogue.

        Args:
            candidate_embeddings: `[candidates, dim]` array-like of floats.
            candidate_ids: `[candidates]` ids of any NumPy dtype (int64 and
                strings included); defaults to positions `0..candidates-1`.

        Raises:
            ValueError: on an empty catalogue, a non-2D embedding matrix, non-finite
                embeddings, ids whose length differs from the embeddings, or
                duplicate ids.
        """
        embeddings = np.asarray(ops.convert_to_numpy(candidate_embeddings))
        if embeddings.ndim != 2:
            raise ValueError(
                "`candidate_embeddings` must be a 2D [candidates, dim] array. "
                f"Received shape: {embeddings.shape}"
            )
        if embeddings.shape[0] == 0:
            raise ValueError("Cannot index an empty catalogue: 0 candidate embeddings.")
        if not np.all(np.isfinite(embeddings)):
            raise ValueError("`candidate_embeddings` contains NaN or infinite values.")
        if candidate_ids is None:
            ids = np.arange(embeddings.shape[0], dtype="int64")
        else:
            ids = _normalise_ids(candidate_ids)
            if ids.ndim != 1 or len(ids) != embeddings.shape[0]:
                raise ValueError(
                    "`candidate_ids` must be 1D with one id per embedding row. "
                    f"Received ids of shape {ids.shape} for "
                    f"{embeddings.shape[0]} embeddings."
                )
            unique, counts = np.unique(ids, return_counts=True)
            if len(unique) != len(ids):
                duplicates = unique[counts > 1][:5].tolist()
                raise ValueError(
                    f"`candidate_ids` must be unique. Received duplicates: {duplicates}"
                )
        self._candidate_embeddings = ops.convert_to_tensor(
            embeddings.astype(self.compute_dtype, copy=False)
        )
        self._candidate_ids = ids.copy()

    def _check_ready(self, query_embeddings: Tensor, k: int) -> None:
        if self._candidate_embeddings is None:
            raise ValueError(
                "The index is empty. Call `index(candidate_embeddings, "
                "candidate_ids)` (or `TwoTowerRetrieval.index_candidates`) first."
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
        if k > self.num_candidates:
            raise ValueError(
                f"`k` (={k}) must not exceed the number of candidates (={self.num_candidates})."
            )
        query_shape = tuple(query_embeddings.shape)
        dim = self._candidate_embeddings.shape[-1]
        if len(query_shape) != 2 or query_shape[-1] != dim:
            raise ValueError(
                f"Query embeddings must have shape [queries, {dim}] to match the "
                f"indexed candidates. Received shape: {query_shape}"
            )

    def call(
        self,
        query_embeddings: Tensor,
        k: int = 10,
        similarity_fn: SimilarityFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        query_embeddings = ops.convert_to_tensor(query_embeddings, self.compute_dtype)
        self._check_ready(query_embeddings, k)
        similarity_fn = similarity_fn or dot_similarities
        candidates: Tensor = self._candidate_embeddings
        best_scores = best_positions = None
        for start in range(0, self.num_candidates, self.chunk_size):
            chunk = candidates[start : start + self.chunk_size]
            scores = similarity_fn(query_embeddings, chunk)
            scores, positions = ops.top_k(scores, min(k, chunk.shape[0]))
            positions = ops.cast(positions, "int32") + start
            if best_scores is None:
                best_scores, best_positions = scores, positions
                continue
            # Running candidates come first, so on JAX and TensorFlow, whose top_k
            # is stable, lower positions stay ahead of later chunks on equal scores.
            # torch.topk makes no such promise.
            merged_scores = ops.concatenate([best_scores, scores], axis=1)
            merged_positions = ops.concatenate([best_positions, positions], axis=1)
            best_scores, order = ops.top_k(merged_scores, min(k, merged_scores.shape[1]))
            best_positions = ops.take_along_axis(merged_positions, order, axis=1)
        return best_scores, best_positions

    def search(
        self,
        query_embeddings: Any,
        k: int = 10,
        similarity_fn: SimilarityFn | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k candidate ids for each query, best first.

        Args:
            query_embeddings: `[queries, dim]` array-like.
            k: number of results per query; `1 <= k <= num_candidates`.
            similarity_fn: `f(query_embeddings, candidate_embeddings) ->
                [queries, candidates]` scores; defaults to the dot product.

        Returns:
            `(scores, ids)`: NumPy arrays of shape `[queries, k]`; `ids` has the
            dtype of the indexed ids.

        Raises:
            ValueError: if the index is empty, `k` is out of range or the query
                dim does not match.
        """
        scores, positions = self(query_embeddings, k=k, similarity_fn=similarity_fn)
        positions = ops.convert_to_numpy(positions)
        assert self._candidate_ids is not None
        return ops.convert_to_numpy(scores), self._candidate_ids[positions]

    def save_assets(self, dir_path: str) -> None:
        if self._candidate_embeddings is None or self._candidate_ids is None:
            return
        np.save(
            os.path.join(dir_path, _EMBEDDINGS_FILE),
            ops.convert_to_numpy(self._candidate_embeddings),
            allow_pickle=False,
        )
        np.save(os.path.join(dir_path, _IDS_FILE), self._candidate_ids, allow_pickle=False)

    def load_assets(self, dir_path: str) -> None:
        embeddings_path = os.path.join(dir_path, _EMBEDDINGS_FILE)
        if not os.path.exists(embeddings_path):
            return
        self.index(
            np.load(embeddings_path, allow_pickle=False),
            np.load(os.path.join(dir_path, _IDS_FILE), allow_pickle=False),
        )

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"chunk_size": self.chunk_size})
        return config
