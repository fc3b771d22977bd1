"""Approximate top-k over an exported catalogue, with faiss (optional extra)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from keras import ops

from two_tower.brute_force_index import BruteForceIndex, _check_catalogue

_FAISS_FILE = "index.faiss"
_IDS_FILE = "candidate_ids.npy"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "FaissIndex needs faiss: pip install faiss-cpu (the two_tower `ann` extra)."
        ) from error
    return faiss


class FaissIndex:
    """Approximate inner-product top-k with a faiss inverted-file (IVF) index.

    The exact `BruteForceIndex` reads every candidate for every query. Past a
    few hundred thousand candidates, an approximate index is much faster: IVF
    clusters the catalogue into `nlist` lists with k-means and searches only the
    `nprobe` lists whose centroids score highest, so it reads about
    `nprobe / nlist` of the catalogue. We use faiss (`IndexIVFFlat` with
    `METRIC_INNER_PRODUCT`, the same dot-product score as the model) rather
    than writing our own: it is the standard, well-kept library for this.
    Measure what you lose with `two_tower.evaluation.recall_against_exact`.

    Ids stay in NumPy as in `BruteForceIndex` (int64 or strings); faiss sees
    only positions.

    Args:
        nlist: number of inverted lists; defaults to about `sqrt(candidates)`
            (at most `candidates / 39`, faiss' minimum training points per list).
        nprobe: lists searched per query. Higher is slower and more exact.
        train_size: candidates sampled (seeded) to train the k-means; defaults
            to `64 × nlist`, capped at the catalogue size.
        seed: seed of the training sample and of faiss' k-means.

    Raises:
        ValueError: `nlist`, `nprobe` or `train_size` that is not a positive
            integer.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> catalogue = rng.normal(size=(2000, 16)).astype("float32")
        >>> ann = two_tower.FaissIndex(nprobe=8)
        >>> ann.index(catalogue, np.arange(2000) + 10_000)
        >>> scores, ids = ann.search(catalogue[:2], k=5)
        >>> ids.shape
        (2, 5)
    """

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int = 16,
        train_size: int | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("train_size", train_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}")
        self.nlist = nlist
        self.nprobe = nprobe
        self.train_size = train_size
        self.seed = seed
        self._index: Any = None
        self._candidate_ids: np.ndarray | None = None

    @classmethod
    def from_index(cls, exact: BruteForceIndex, **kwargs: Any) -> FaissIndex:
        """Exports the embeddings and ids of a filled `BruteForceIndex`.

        Args:
            exact: the index to export, e.g. `model.candidate_index`.
            **kwargs: `FaissIndex` arguments.

        Returns:
            A `FaissIndex` holding the same embeddings and ids.

        Raises:
            ValueError: `exact` is empty, or as `index`.
            ImportError: faiss is not installed.
        """
        if exact.candidate_embeddings is None:
            raise ValueError("The exact index is empty: call `index_candidates` first.")
        ann = cls(**kwargs)
        ann.index(exact.candidate_embeddings, exact.candidate_ids)
        return ann

    @property
    def num_candidates(self) -> int:
        """How many candidates are indexed (0 before `index`)."""
        return 0 if self._candidate_ids is None else len(self._candidate_ids)

    def index(self, candidate_embeddings: Any, candidate_ids: Any = None) -> None:
        """Trains the lists on a sample of the catalogue and adds all of it.

        Args:
            candidate_embeddings: `[candidates, dim]` array-like of floats.
            candidate_ids: unique ids (integers or strings); default positions.

        Raises:
            ValueError: as `BruteForceIndex.index` (empty, non-2D, non-finite,
                duplicate or misaligned ids), or `nlist` above the catalogue size.
            ImportError: faiss is not installed.
        """
        faiss = _faiss()
        embeddings, ids, _ = _check_catalogue(candidate_embeddings, candidate_ids)
        embeddings = np.ascontiguousarray(embeddings, dtype="float32")
        num, dim = embeddings.shape
        nlist = self.nlist or max(1, min(round(math.sqrt(num)), num // 39))
        if nlist > num:
            raise ValueError(f"`nlist` (={nlist}) must not exceed the candidates (={num}).")
        train_size = min(num, self.train_size or 64 * nlist)
        rng = np.random.default_rng(self.seed)
        sample = embeddings[np.sort(rng.choice(num, size=train_size, replace=False))]
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.train(sample)
        index.add(embeddings)
        index.nprobe = min(self.nprobe, nlist)
        self._index = index
        self._candidate_ids = ids.copy()

    def search(self, query_embeddings: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k ids for each query, best first.

        Args:
            query_embeddings: `[queries, dim]` array-like.
            k: results per query; `1 <= k <= num_candidates`.

        Returns:
            `(scores, ids)`, NumPy arrays of shape `[queries, k]`. When the probed
            lists hold fewer than `k` candidates, the missing slots have score
            `-inf` and id -1 (or "" for string ids): raise `nprobe`.

        Raises:
            ValueError: if the index is empty, `k` is out of range, or the queries
                have the wrong dim or contain NaN or infinity.
        """
        if self._index is None or self._candidate_ids is None:
            raise ValueError("The index is empty. Call `index(candidate_embeddings)` first.")
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or not (0 < k <= self.num_candidates)
        ):
            raise ValueError(
                f"`k` must be an integer in [1, {self.num_candidates}]. Received: k={k!r}"
            )
        if not isinstance(query_embeddings, np.ndarray):  # e.g. a torch tensor with grad
            query_embeddings = ops.convert_to_numpy(query_embeddings)
        queries = np.ascontiguousarray(query_embeddings, dtype="float32")
        if queries.ndim != 2 or queries.shape[1] != self._index.d:
            raise ValueError(
                f"Query embeddings must have shape [queries, {self._index.d}]. "
                f"Received shape: {queries.shape}"
            )
        if not np.all(np.isfinite(queries)):
            raise ValueError("Query embeddings contain NaN or infinite values.")
        scores, positions = self._index.search(queries, k)
        missing = positions < 0
        ids = self._candidate_ids[np.where(missing, 0, positions)]
        if missing.any():
            ids = np.where(missing, "" if ids.dtype.kind == "U" else -1, ids)
            scores = np.where(missing, -np.inf, scores)
        return scores, ids

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Writes the faiss index and the ids into `folder` (created if needed).

        Raises:
            ValueError: the index is empty.
        """
        if self._index is None or self._candidate_ids is None:
            raise ValueError("Nothing to save: the index is empty.")
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self._index, str(path / _FAISS_FILE))
        np.save(path / _IDS_FILE, self._candidate_ids, allow_pickle=False)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], **kwargs: Any) -> FaissIndex:
        """Reads an index written by `save`; `kwargs` are `FaissIndex` arguments.

        Raises:
            FileNotFoundError: `folder` lacks the faiss index or the ids file.
            ValueError: the two files disagree on the number of candidates.
            ImportError: faiss is not installed.
        """
        path = Path(folder)
        for name in (_FAISS_FILE, _IDS_FILE):
            if not (path / name).exists():
                raise FileNotFoundError(f"{path / name} is missing: not a saved FaissIndex.")
        ann = cls(**kwargs)
        index = _faiss().read_index(str(path / _FAISS_FILE))
        ids = np.load(path / _IDS_FILE, allow_pickle=False)
        if index.ntotal != len(ids):
            raise ValueError(
                f"{path}: the faiss index holds {index.ntotal} vectors but "
                f"{_IDS_FILE} has {len(ids)} ids."
            )
        index.nprobe = ann.nprobe
        ann._index, ann._candidate_ids = index, ids
        return ann

    def get_config(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "train_size": self.train_size,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FaissIndex:
        return cls(**config)
