"""Approximate top-k over an exported catalogue, with faiss (optional extra)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.datasets._files import sha256
from two_tower.retrieval import _catalogue_store
from two_tower.retrieval._catalogue_store import ChunkStore
from two_tower.retrieval.brute_force_index import BruteForceIndex, _check_catalogue, _checked_ids
from two_tower.saving import _fsync

# Written by `save` before this version (no manifest): still loaded, unchecked.
_FAISS_FILE = "index.faiss"
_IDS_FILE = "candidate_ids.npy"
# The manifest names the current files (`index-<token>.faiss`,
# `candidate_ids-<token>.npy`) with their sizes and SHA-256; replacing it is the
# one rename that commits a save.
_MANIFEST = "faiss_index.json"
_FORMAT = "two_tower.FaissIndex"
_OURS = re.compile(
    r"(index-[0-9a-f]+\.faiss|candidate_ids-[0-9a-f]+\.npy|\.faiss_index\.json\.tmp-[0-9a-f]+)"
)
_PQ_CENTROIDS = 256  # 8-bit codes: each subquantizer trains 256 centroids
_SEED_RANGE = 2**31  # faiss' k-means seed is a C int
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
            sample: a non-negative integer (faiss' k-means takes it modulo
            2**31), or None for a fresh seed at each `index`.
        target_recall: if set, in (0, 1]: `index` calibrates `nprobe` to the
            smallest value whose recall@`calibration_k` against the exact top k
            reaches it (all lists if none does; see `calibrated_recall`).
        calibration_k: the k of that calibration (capped at the catalogue).
        pq_subquantizers: if set, an IVF-PQ index with this many 8-bit
            subquantizers (a divisor of the dim): `pq_subquantizers` bytes per
            vector instead of `4 × dim`.

    Integer and float arguments may be Python or NumPy scalars (`np.int64(16)`,
    `np.float32(0.9)`); they are kept as Python numbers.

    Raises:
        ValueError: `nlist`, `nprobe`, `train_size`, `calibration_k` or
            `pq_subquantizers` that is not a positive integer, a `seed` that
            is not None or a non-negative integer, or a `target_recall` that is
            not a number in (0, 1].

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
        seed: int | None = 0,
        *,
        target_recall: float | None = None,
        calibration_k: int = 100,
        pq_subquantizers: int | None = None,
    ) -> None:
        owner = "FaissIndex"

        def optional(name: str, value: Any) -> int | None:
            return None if value is None else _arguments.integer(name, value, owner=owner)

        # Python values (NumPy scalars accepted), so that `get_config` is JSON.
        self.nlist = optional("nlist", nlist)
        self.nprobe = optional("nprobe", nprobe)
        self.train_size = optional("train_size", train_size)
        self.seed = _arguments.seed("seed", seed, owner=owner)
        self.target_recall = (
            None
            if target_recall is None
            else _arguments.number(
                "target_recall", target_recall, minimum=0, maximum=1, open_minimum=True,
                owner=owner,
            )
        )  # fmt: skip
        self.calibration_k = _arguments.integer("calibration_k", calibration_k, owner=owner)
        self.pq_subquantizers = optional("pq_subquantizers", pq_subquantizers)
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
            candidate_embeddings: `[candidates, dim]` array-like of floats, or row
                blocks as `BruteForceIndex.index` takes them (an iterable or a
                list of `[rows, dim]` blocks, or of `(embeddings, ids)` pairs),
                copied once into float32 chunks.
            candidate_ids: unique ids (integers or strings); default positions
                (or the ids of the pairs).
            calibration_queries: `[queries, dim]` queries for `target_recall`;
                defaults to 256 catalogue rows drawn with `seed` (pass real
                queries when they differ from the candidates, e.g. user
                embeddings).

        Raises:
            ValueError: as `BruteForceIndex.index` (empty, non-2D, non-finite,
                duplicate or misaligned ids, blocks of different dims), `nlist`
                above the catalogue size, a dim that `pq_subquantizers` does not
                divide, fewer than 256 candidates for IVF-PQ, or a `train_size`
                below `nlist` (or below 256 with IVF-PQ).
            ImportError: faiss is not installed.
        """
        blocks, rows = _catalogue_store.blocks_of(candidate_embeddings)
        if rows is not None:  # one array
            embeddings, ids, _ = _check_catalogue(candidate_embeddings, candidate_ids)
            store: Any = np.ascontiguousarray(embeddings, dtype="float32")
        else:
            store, paired_ids = _catalogue_store.assemble(
                blocks, _catalogue_store.BLOCK_ROWS, 1, "float32"
            )
            if paired_ids is not None and candidate_ids is not None:
                raise ValueError(
                    "The catalogue blocks are (embeddings, ids) pairs, so `candidate_ids` "
                    "must be None."
                )
            ids, _, _ = _checked_ids(
                paired_ids if paired_ids is not None else candidate_ids, store.num_rows
            )
        self._build(store, ids, calibration_queries)

    def _build(self, rows: Any, ids: np.ndarray, calibration_queries: Any) -> None:
        """Trains and fills the faiss index from `rows` (an array or a `ChunkStore`)."""
        faiss = _faiss()
        num, dim = rows.shape
        nlist = self.nlist or max(1, min(round(math.sqrt(num)), num // 39))
        if nlist > num:
            raise ValueError(
                f"`nlist` (={nlist}) must not exceed the candidates (={num}): k-means "
                "needs a training row per list. Pass a smaller `nlist`, or None."
            )
        pq = self.pq_subquantizers
        if pq is not None and dim % pq:
            raise ValueError(f"`pq_subquantizers` (={pq}) must divide the embedding dim (={dim}).")
        if pq is not None and num < _PQ_CENTROIDS:
            raise ValueError(
                f"IVF-PQ needs at least {_PQ_CENTROIDS} candidates to train its codebooks "
                f"({_PQ_CENTROIDS} centroids per subquantizer). Received {num}: use IVF-Flat "
                "(`pq_subquantizers=None`) for a catalogue this small."
            )
        default_size = 64 * nlist if pq is None else max(64 * nlist, _PQ_CENTROIDS * 39)
        train_size = min(num, self.train_size or default_size)
        needed = nlist if pq is None else max(nlist, _PQ_CENTROIDS)
        if train_size < needed:
            what = (
                f"`nlist` (={nlist})"
                if pq is None or nlist >= _PQ_CENTROIDS
                else (f"the {_PQ_CENTROIDS} centroids of each IVF-PQ codebook")
            )
            raise ValueError(
                f"`train_size` (={self.train_size}) must be at least {needed}: k-means needs a "
                f"training row for each of {what}. Pass a larger `train_size`, or None "
                f"(the default, {default_size} rows capped at the catalogue)."
            )
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        rng = np.random.default_rng(seed)
        sample = _take_rows(rows, np.sort(rng.choice(num, size=train_size, replace=False)))
        quantizer = faiss.IndexFlatIP(dim)
        if pq is None:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed % _SEED_RANGE
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
        """The lists a top-`k` search reads: `nprobe`, the calibrated value, or the size rule.

        Raises:
            ValueError: the index is empty, or `k` is not an integer in
                `[1, num_candidates]`.
        """
        if self._index is None:
            raise ValueError("The index is empty. Call `index(candidate_embeddings)` first.")
        k = self._checked_k(k)
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
            ValueError: if the index is empty, `k` is not an integer (Python or
                NumPy) in `[1, num_candidates]`, or the queries are not numeric,
                have the wrong dim or contain NaN or infinity.
        """
        if self._index is None or self._candidate_ids is None:
            raise ValueError("The index is empty. Call `index(candidate_embeddings)` first.")
        k = self._checked_k(k)
        queries = _checked_queries(query_embeddings, int(self._index.d), "query_embeddings")
        # A parameter object, not `self._index.nprobe`: searches may run concurrently.
        parameters = _faiss().SearchParametersIVF(nprobe=self.nprobe_for(k))
        scores, positions = self._index.search(queries, k, params=parameters)
        missing = positions < 0
        ids = self._candidate_ids[np.where(missing, 0, positions)]
        if missing.any():
            ids = np.where(missing, "" if ids.dtype.kind == "U" else -1, ids)
            scores = np.where(missing, -np.inf, scores)
        return scores, ids

    def _checked_k(self, k: Any) -> int:
        return _arguments.integer("k", k, maximum=self.num_candidates, owner="FaissIndex")

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Writes the faiss index and the ids into `folder` (created if needed), atomically.

        The index and the ids go to new files named with a random token
        (`index-<token>.faiss`, `candidate_ids-<token>.npy`), flushed to disk;
        then `faiss_index.json`, which names them with their sizes and SHA-256,
        replaces the previous one in one rename. A save that fails or is killed
        leaves the previous index loadable; its files are removed by the next
        save into the folder, as are the files of the index it replaces.
        One process at a time may save into a folder.

        Raises:
            ValueError: the index is empty, or `folder` is an existing file.
            ImportError: faiss is not installed.
        """
        if self._index is None or self._candidate_ids is None:
            raise ValueError("Nothing to save: the index is empty.")
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"FaissIndex.save: {path} is a file; pass a folder (it is created if needed)."
            )
        path.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        names = {"index": f"index-{token}.faiss", "ids": f"candidate_ids-{token}.npy"}
        written = []
        try:
            written.append(path / names["index"])
            _faiss().write_index(self._index, str(written[-1]))
            written.append(path / names["ids"])
            with open(written[-1], "wb") as handle:
                np.save(handle, self._candidate_ids, allow_pickle=False)
            files = {}
            for role, name in names.items():
                _fsync(str(path / name), os.O_RDONLY)
                files[role] = {"name": name, **_size_and_hash(path / name)}
            manifest = {
                "format": _FORMAT,
                "version": 1,
                "num_candidates": self.num_candidates,
                "dim": int(self._index.d),
                "files": files,
            }
            temporary = path / f".{_MANIFEST}.tmp-{token}"
            written.append(temporary)
            temporary.write_text(json.dumps(manifest, indent=1))
            _fsync(str(temporary), os.O_RDONLY)
            os.replace(temporary, path / _MANIFEST)  # the commit
        except BaseException:
            for leftover in written:
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise
        if os.name == "posix":  # records the rename; folders cannot be opened on Windows
            with contextlib.suppress(OSError):
                _fsync(str(path), os.O_RDONLY)
        _remove_stale_files(path)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], **kwargs: Any) -> FaissIndex:
        """Reads an index written by `save`; `kwargs` are `FaissIndex` arguments.

        The files named by `faiss_index.json` must have the sizes and SHA-256
        recorded at save, and the ids must be integers or strings, unique, one
        per vector: a damaged or edited file raises, named, before faiss reads
        it. The hashes read both files once more (their cost beside the load:
        "Integrity checks" on the benchmarks page). A folder saved
        before the manifest existed (`index.faiss` and `candidate_ids.npy`
        only) still loads, with the ids checked but without the size and hash
        checks.

        Raises:
            FileNotFoundError: `folder` is not a folder, or lacks the manifest's
                files (or, without a manifest, `index.faiss` or the ids file).
            ValueError: a file is truncated, damaged or edited (named), or the
                files disagree on the number of candidates.
            ImportError: faiss is not installed.
        """
        path = Path(folder)
        if not path.is_dir():
            raise FileNotFoundError(
                f"Cannot load a FaissIndex from {path}: "
                + ("it is a file, not a folder." if path.exists() else "no such folder.")
            )
        ann = cls(**kwargs)
        advice = "Save the index again, or restore the folder from a copy."
        if (path / _MANIFEST).exists():
            faiss_file, ids_file, manifest = _checked_manifest(path, advice)
        else:
            faiss_file, ids_file, manifest = path / _FAISS_FILE, path / _IDS_FILE, None
            for file in (faiss_file, ids_file):
                if not file.exists():
                    raise FileNotFoundError(
                        f"{file} is missing: not a saved FaissIndex (it has no {_MANIFEST} either)."
                    )
        try:
            index = _faiss().read_index(str(faiss_file))
        except RuntimeError as error:
            raise ValueError(
                f"Cannot load a FaissIndex from {path}: {faiss_file.name} is truncated or "
                f"corrupt (faiss: {_faiss_reason(error)}). {advice}"
            ) from error
        try:
            ids = np.load(ids_file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(
                f"Cannot load a FaissIndex from {path}: {ids_file.name} is not a readable "
                f"array of ids ({error}). {advice}"
            ) from error
        if ids.ndim != 1 or index.ntotal != len(ids):
            raise ValueError(
                f"Cannot load a FaissIndex from {path}: the faiss index holds "
                f"{index.ntotal} vectors but {ids_file.name} holds ids of shape {ids.shape} "
                f"(one per vector expected). {advice}"
            )
        try:
            ids, _, _ = _checked_ids(ids, len(ids))
        except ValueError as error:
            raise ValueError(
                f"Cannot load a FaissIndex from {path}: {ids_file.name}: {error}. {advice}"
            ) from error
        if manifest is not None and (
            manifest.get("num_candidates") != len(ids) or manifest.get("dim") != index.d
        ):
            raise ValueError(
                f"Cannot load a FaissIndex from {path}: {_MANIFEST} records "
                f"{manifest.get('num_candidates')} candidates of dim {manifest.get('dim')}, "
                f"the files hold {len(ids)} of dim {index.d}. {advice}"
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


def _checked_queries(queries: Any, dim: int, name: str = "calibration_queries") -> np.ndarray:
    """`queries` as a float32 `[queries, dim]` array of finite numbers, or raises.

    `calibration_queries` needs at least one row; `query_embeddings` may have none.
    """
    if not isinstance(queries, np.ndarray):  # e.g. a torch tensor with grad
        queries = ops.convert_to_numpy(queries)
    array = np.asarray(queries)
    if array.dtype.kind not in "iuf":
        raise ValueError(
            f"`{name}` must be a numeric [queries, {dim}] array. Received dtype {array.dtype}"
        )
    if (
        array.ndim != 2
        or array.shape[1] != dim
        or (name == "calibration_queries" and not len(array))
    ):
        least = " with at least one query" if name == "calibration_queries" else ""
        raise ValueError(
            f"`{name}` must have shape [queries, {dim}]{least}, the dim of the indexed "
            f"candidates. Received shape: {array.shape}"
        )
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, refused below
        array = np.ascontiguousarray(array, dtype="float32")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contain NaN or infinite values (or overflow float32).")
    return array


def _faiss_reason(error: Exception) -> str:
    """The reason in a faiss error, without its C++ function and source location."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    found = re.search(r" at \S+:\d+: (.*)", text)
    return found.group(1) if found else text


def _size_and_hash(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def _checked_manifest(path: Path, advice: str) -> tuple[Path, Path, dict[str, Any]]:
    """The faiss and ids files that `faiss_index.json` names, checked against it."""
    where = f"Cannot load a FaissIndex from {path}"
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        files = manifest["files"]
        if manifest["format"] != _FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest['format']!r}, files {type(files).__name__}")
        entries = {role: files[role] for role in ("index", "ids")}
        names = {role: Path(str(entry["name"])).name for role, entry in entries.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{where}: {_MANIFEST} is damaged or not a FaissIndex manifest ({error!r}). {advice}"
        ) from error
    for role, name in names.items():
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"{where}: {name}, named in {_MANIFEST}, is missing. {advice}")
        found = _size_and_hash(file)
        expected = entries[role]
        if found["size"] != expected.get("size"):
            raise ValueError(
                f"{where}: {name} is truncated or damaged: {found['size']} bytes, "
                f"{expected.get('size')} recorded at save. {advice}"
            )
        if found["sha256"] != expected.get("sha256"):
            raise ValueError(
                f"{where}: {name} is damaged or was edited: its SHA-256 differs from the one "
                f"recorded at save. {advice}"
            )
    return path / names["index"], path / names["ids"], manifest


def _remove_stale_files(path: Path) -> None:
    """Removes our files that the folder's manifest does not name (older or killed saves)."""
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        current = {str(entry["name"]) for entry in manifest["files"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # another writer, or damage: remove nothing
    for name in os.listdir(path):
        stale = _OURS.fullmatch(name) or name in (_FAISS_FILE, _IDS_FILE)
        if stale and name not in current:
            with contextlib.suppress(OSError):
                os.unlink(path / name)


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
