"""Approximate top-k over an exported catalogue, with faiss (optional extra)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from keras import ops

from two_tower._catalogue_store import ChunkStore
from two_tower.brute_force_index import BruteForceIndex, _check_catalogue

_FAISS_FILE = "index.faiss"
_IDS_FILE = "candidate_ids.npy"
MIN_NPROBE = 16  # lists read at least, by default
SCAN_PER_RESULT = 64  # candidates read per requested result, by default


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
    `nprobe / nlist` of the catalogue. We use faiss (`IndexIVFFlat`, or
    `IndexIVFPQ` with `pq_subquantizers`, with `METRIC_INNER_PRODUCT`, the same
    dot-product score as the model) rather than writing our own: it is the
    standard, well-kept library for this. Measure what you lose with
    `two_tower.evaluation.recall_against_exact`.

    **Defaults that hold their recall.** A fixed `nprobe` is tuned for one size:
    16 of about 100 lists found 0.64 of the true top 100 over 10,000 clustered
    candidates and 1.00 over 10^6. By default each top-k search therefore reads
    the lists holding about `64 × k` candidates (at least 16 lists, at most
    all): `nprobe = min(nlist, max(16, ceil(64 × k × nlist / candidates)))`.
    On `benchmarks/retrieval.py`'s clustered data this keeps recall@100 at
    0.95 or more from 10^4 to 10^7 candidates. For your own data, pass
    `target_recall`: `index` then finds the smallest `nprobe` that reaches it
    on a sample of queries against the exact top k, and reports the recall it
    reached (`calibrated_recall`).

    **Memory per candidate**: `4 × dim + 8` bytes with IVF-Flat (the vectors and
    faiss' list ids), `pq_subquantizers + 8` with IVF-PQ (a code of one byte
    per subquantizer), plus the ids kept in NumPy (8 bytes for integers).
    `BruteForceIndex` holds `4 × dim` bytes and its ids (8 bytes for positions,
    24 for given ids). IVF-PQ serves catalogues whose vectors do not fit in
    memory (10^8 × dim 64 is 25.6 GB as float32, 2.4 GB as 16-byte codes),
    at a cost in recall that `calibrated_recall` or `recall_against_exact`
    shows.

    Ids stay in NumPy as in `BruteForceIndex` (int64 or strings); faiss sees
    only positions.

    Args:
        nlist: number of inverted lists; defaults to about `sqrt(candidates)`
            (at most `candidates / 39`, faiss' minimum training points per list).
        nprobe: lists searched per query, whatever `k`; None (the default) uses
            the calibrated value if `target_recall` is set, else the size rule
            above. Higher is slower and more exact.
        train_size: candidates sampled (seeded) to train the k-means; defaults
            to `64 × nlist` (at least 9,984 with IVF-PQ, 39 per codebook
            centroid), capped at the catalogue size.
        seed: seed of the training sample, faiss' k-means and the calibration
            sample.
        target_recall: if set, in (0, 1]: `index` calibrates `nprobe` to the
            smallest value whose recall@`calibration_k` against the exact top k
            reaches it (all lists if none does; see `calibrated_recall`).
        calibration_k: the k of that calibration (capped at the catalogue).
        pq_subquantizers: if set, an IVF-PQ index with this many 8-bit
            subquantizers (a divisor of the dim): `pq_subquantizers` bytes per
            vector instead of `4 × dim`.

    Raises:
        ValueError: `nlist`, `nprobe`, `train_size`, `calibration_k` or
            `pq_subquantizers` that is not a positive integer, or a
            `target_recall` outside (0, 1].

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> catalogue = rng.normal(size=(2000, 16)).astype("float32")
        >>> ann = two_tower.FaissIndex(target_recall=0.9, calibration_k=10)
        >>> ann.index(catalogue, np.arange(2000) + 10_000)
        >>> ann.calibrated_recall >= 0.9
        True
        >>> scores, ids = ann.search(catalogue[:2], k=5)
        >>> ids.shape
        (2, 5)
    """

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
        *,
        target_recall: float | None = None,
        calibration_k: int = 100,
        pq_subquantizers: int | None = None,
    ) -> None:
        for name, value in (
            ("nlist", nlist),
            ("nprobe", nprobe),
            ("train_size", train_size),
            ("calibration_k", calibration_k),
            ("pq_subquantizers", pq_subquantizers),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}")
        if target_recall is not None and (
            isinstance(target_recall, bool)
            or not isinstance(target_recall, (int, float))
            or not 0 < target_recall <= 1
        ):
            raise ValueError(f"`target_recall` must lie in (0, 1]. Received: {target_recall!r}")
        self.nlist = nlist
        self.nprobe = nprobe
        self.train_size = train_size
        self.seed = seed
        self.target_recall = target_recall
        self.calibration_k = calibration_k
        self.pq_subquantizers = pq_subquantizers
        self.calibrated_nprobe: int | None = None
        """The `nprobe` that `target_recall` chose (None without one)."""
        self.calibrated_recall: float | None = None
        """The recall@`calibration_k` it reached on the calibration queries."""
        self._index: Any = None
        self._candidate_ids: np.ndarray | None = None

    @classmethod
    def from_index(
        cls, exact: BruteForceIndex, calibration_queries: Any = None, **kwargs: Any
    ) -> FaissIndex:
        """Exports the embeddings and ids of a filled `BruteForceIndex`.

        The rows are read from the exact index chunk by chunk, so the export
        holds no third copy of the catalogue (only faiss' own).

        Args:
            exact: the index to export, e.g. `model.candidate_index`.
            calibration_queries: queries for `target_recall`, as in `index`.
            **kwargs: `FaissIndex` arguments.

        Returns:
            A `FaissIndex` holding the same embeddings and ids.

        Raises:
            ValueError: `exact` is empty, or as `index`.
            ImportError: faiss is not installed.
        """
        catalogue = exact._catalogue
        if catalogue is None:
            raise ValueError("The exact index is empty: call `index_candidates` first.")
        ann = cls(**kwargs)
        if catalogue.host is None:  # sharded over devices: gathered once
            ann.index(exact.embeddings(), exact.candidate_ids, calibration_queries)
        else:
            ann._build(catalogue.host, catalogue.ids, calibration_queries)
        return ann

    @property
    def num_candidates(self) -> int:
        """How many candidates are indexed (0 before `index`)."""
        return 0 if self._candidate_ids is None else len(self._candidate_ids)

    def index(
        self, candidate_embeddings: Any, candidate_ids: Any = None, calibration_queries: Any = None
    ) -> None:
        """Trains the lists on a sample of the catalogue and adds all of it.

        Args:
            candidate_embeddings: `[candidates, dim]` array-like of floats.
            candidate_ids: unique ids (integers or strings); default positions.
            calibration_queries: `[queries, dim]` queries for `target_recall`;
                defaults to 256 catalogue rows drawn with `seed` (pass real
                queries when they differ from the candidates, e.g. user
                embeddings).

        Raises:
            ValueError: as `BruteForceIndex.index` (empty, non-2D, non-finite,
                duplicate or misaligned ids), `nlist` above the catalogue size,
                a dim that `pq_subquantizers` does not divide, or fewer than
                256 candidates for IVF-PQ.
            ImportError: faiss is not installed.
        """
        embeddings, ids, _ = _check_catalogue(candidate_embeddings, candidate_ids)
        store = np.ascontiguousarray(embeddings, dtype="float32")
        self._build(store, ids.copy(), calibration_queries)

    def _build(self, rows: Any, ids: np.ndarray, calibration_queries: Any) -> None:
        """Trains and fills the faiss index from `rows` (an array or a `ChunkStore`)."""
        faiss = _faiss()
        num, dim = rows.shape
        nlist = self.nlist or max(1, min(round(math.sqrt(num)), num // 39))
        if nlist > num:
            raise ValueError(f"`nlist` (={nlist}) must not exceed the candidates (={num}).")
        pq = self.pq_subquantizers
        if pq is not None and dim % pq:
            raise ValueError(f"`pq_subquantizers` (={pq}) must divide the embedding dim (={dim}).")
        if pq is not None and num < 256:
            raise ValueError(f"IVF-PQ needs at least 256 candidates to train. Received {num}.")
        default_size = 64 * nlist if pq is None else max(64 * nlist, 256 * 39)
        train_size = min(num, self.train_size or default_size)
        rng = np.random.default_rng(self.seed)
        sample = _take_rows(rows, np.sort(rng.choice(num, size=train_size, replace=False)))
        quantizer = faiss.IndexFlatIP(dim)
        if pq is None:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.train(sample)
        for piece in _pieces(rows):
            index.add(np.ascontiguousarray(piece, dtype="float32"))
        self._index, self._candidate_ids = index, ids
        self.calibrated_nprobe = self.calibrated_recall = None
        if self.target_recall is not None:
            if calibration_queries is None:
                picked = np.sort(rng.choice(num, size=min(num, 256), replace=False))
                calibration_queries = _take_rows(rows, picked)
            self._calibrate(rows, _checked_queries(calibration_queries, dim))

    def _calibrate(self, rows: Any, queries: np.ndarray) -> None:
        """The smallest `nprobe` reaching `target_recall` (binary search over 1..nlist)."""
        assert self.target_recall is not None
        k = min(self.calibration_k, self.num_candidates)
        exact = _exact_positions(queries, rows, k)
        nlist = int(self._index.nlist)

        def recall(nprobe: int) -> float:
            parameters = _faiss().SearchParametersIVF(nprobe=nprobe)
            _, found = self._index.search(queries, k, params=parameters)
            hits = [len(np.intersect1d(f, e)) for f, e in zip(found, exact, strict=True)]
            return float(np.mean(hits) / k)

        low, high = 0, nlist  # recall(low) < target <= recall(high), or high = nlist
        reached = {nlist: recall(nlist)}
        while high - low > 1:
            middle = (low + high) // 2
            reached[middle] = recall(middle)
            if reached[middle] >= self.target_recall:
                high = middle
            else:
                low = middle
        self.calibrated_nprobe, self.calibrated_recall = high, reached[high]
        if reached[high] < self.target_recall:
            warnings.warn(
                f"FaissIndex: target_recall={self.target_recall} is out of reach; probing "
                f"all {nlist} lists gives recall@{k} {reached[high]:.3f} (IVF-PQ loses "
                "precision in its codes: raise `pq_subquantizers`, or use IVF-Flat).",
                stacklevel=3,
            )

    def nprobe_for(self, k: int) -> int:
        """The lists a top-`k` search reads: `nprobe`, the calibrated value, or the size rule."""
        if self._index is None:
            raise ValueError("The index is empty. Call `index(candidate_embeddings)` first.")
        nlist = int(self._index.nlist)
        if self.nprobe is not None:
            return min(self.nprobe, nlist)
        if self.calibrated_nprobe is not None:
            return self.calibrated_nprobe
        per_list = self.num_candidates / nlist
        return min(nlist, max(MIN_NPROBE, math.ceil(SCAN_PER_RESULT * k / per_list)))

    def search(self, query_embeddings: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k ids for each query, best first.

        Args:
            query_embeddings: `[queries, dim]` array-like.
            k: results per query; `1 <= k <= num_candidates`.

        Returns:
            `(scores, ids)`, NumPy arrays of shape `[queries, k]`. When the probed
            lists hold fewer than `k` candidates, the missing slots have score
            `-inf` and id -1 (or "" for string ids): raise `nprobe`. The lists
            read are `nprobe_for(k)`.

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
        # A parameter object, not `self._index.nprobe`: searches may run concurrently.
        parameters = _faiss().SearchParametersIVF(nprobe=self.nprobe_for(k))
        scores, positions = self._index.search(queries, k, params=parameters)
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
        ann._index, ann._candidate_ids = index, ids
        return ann

    def get_config(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "train_size": self.train_size,
            "seed": self.seed,
            "target_recall": self.target_recall,
            "calibration_k": self.calibration_k,
            "pq_subquantizers": self.pq_subquantizers,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FaissIndex:
        return cls(**config)


def _pieces(rows: Any) -> Any:
    """Row blocks of an array or a `ChunkStore`, without copying."""
    if isinstance(rows, ChunkStore):
        return rows.pieces()
    return (rows[i : i + 2**16] for i in range(0, len(rows), 2**16))


def _take_rows(rows: Any, positions: np.ndarray) -> np.ndarray:
    """`rows[positions]` (sorted positions) from an array or a `ChunkStore`."""
    if not isinstance(rows, ChunkStore):
        return np.ascontiguousarray(rows[positions], dtype="float32")
    chunk_of = positions // rows.width
    parts = [rows.chunks[c][positions[chunk_of == c] - c * rows.width] for c in np.unique(chunk_of)]
    return np.ascontiguousarray(np.concatenate(parts), dtype="float32")


def _checked_queries(queries: Any, dim: int) -> np.ndarray:
    if not isinstance(queries, np.ndarray):  # e.g. a torch tensor with grad
        queries = ops.convert_to_numpy(queries)
    array = np.ascontiguousarray(queries, dtype="float32")
    if array.ndim != 2 or array.shape[1] != dim or not len(array):
        raise ValueError(
            f"`calibration_queries` must be [queries, {dim}] with at least one query. "
            f"Received shape: {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("`calibration_queries` contain NaN or infinite values.")
    return array


def _exact_positions(queries: np.ndarray, rows: Any, k: int) -> np.ndarray:
    """Exact top-k positions per query, a block of rows at a time (for calibration)."""
    best_scores = np.full((len(queries), 0), -np.inf, "float32")
    best = np.zeros((len(queries), 0), "int64")
    start = 0
    for piece in _pieces(rows):
        scores = np.concatenate([best_scores, queries @ np.asarray(piece, "float32").T], axis=1)
        positions = np.concatenate(
            [
                best,
                np.broadcast_to(np.arange(start, start + len(piece)), (len(queries), len(piece))),
            ],
            axis=1,
        )
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, keep, axis=1)
            positions = np.take_along_axis(positions, keep, axis=1)
        best_scores, best = scores, positions
        start += len(piece)
    return best
