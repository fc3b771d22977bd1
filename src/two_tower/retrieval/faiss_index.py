"""Approximate top-k over an exported catalogue, with faiss (optional extra)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np

from two_tower import _arguments
from two_tower.retrieval import _candidate_ids, _catalogue_store, _faiss_lists, _filters, _id_book
from two_tower.retrieval._candidate_ids import CandidateIds, check_catalogue, checked_ids
from two_tower.retrieval._catalogue_lock import ReadWriteLock
from two_tower.retrieval._faiss_filtered import filtered_search
from two_tower.retrieval._faiss_folder import (
    FAISS_FILE,
    FORMAT,
    IDS_FILE,
    MANIFEST,
    OURS,
    read_folder,
)

# `save` calls `_fsync`, `_size_and_hash` and `_remove_stale_files` by their names
# in this module: tests/test_bad_input_serving.py kills a save at each of them.
from two_tower.retrieval._faiss_folder import size_and_hash as _size_and_hash
from two_tower.retrieval._faiss_search import check_inner_product, checked_queries, without_excluded
from two_tower.retrieval._faiss_training import calibrated_nprobe, trained_index
from two_tower.retrieval._id_book import IdBook
from two_tower.retrieval.brute_force_index import BruteForceIndex
from two_tower.retrieval.candidate_index import CandidateIndex
from two_tower.saving._files import fsync as _fsync
from two_tower.types import SimilarityFn

MIN_NPROBE = 16  # lists read at least, by default
DRIFT = 0.1  # changes past this share of the catalogue indexed: a warning to index again
SCAN_PER_RESULT = 64  # candidates read per requested result, by default


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "FaissIndex needs faiss: pip install faiss-cpu (the two_tower `ann` extra)."
        ) from error
    return faiss


@keras.saving.register_keras_serializable(package="two_tower")
class FaissIndex(keras.layers.Layer, CandidateIndex):
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
    only positions. The first exclusion or `positions_of` also sorts them (16
    more bytes per candidate, as `BruteForceIndex` holds from the start).

    **As a model's index.** It is a `two_tower.retrieval.CandidateIndex`,
    so `TwoTowerRetrieval(..., candidate_index=two_tower.FaissIndex())` serves
    `recommend` and `similar_items` approximately, exclusions included, and a
    `.keras` save holds the faiss index (and the calibrated `nprobe`) as assets.
    Scores are inner products: a model whose `compute_similarities` scores
    otherwise raises at search.

    **Filters and changes.** `search` takes `allow` and `where` as
    `BruteForceIndex.search` does (see `search` for how a filtered query reads
    its lists), and `add`, `remove` and `update` change the trained lists in
    place, atomically with respect to searches; once the changes pass 10 % of
    the catalogue indexed, a warning says to call `index` again.

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
        **kwargs: standard `keras.layers.Layer` arguments (`name`, ...).

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
        >>> ids, scores = ann.search(catalogue[:2], k=5)
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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
        # Not tracked by Keras: the faiss index is saved as assets.
        object.__setattr__(self, "_catalogue", None)
        # Searches read together; `add`, `remove` and `update` change it alone.
        object.__setattr__(self, "_catalogue_lock", ReadWriteLock())
        self.built = True

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
            A `FaissIndex` holding the same embeddings, ids and attributes.

        Raises:
            ValueError: `exact` is empty, or as `index`.
            ImportError: faiss is not installed.
        """
        with exact._catalogue_lock.reading():  # one version of a catalogue that may change
            return cls._exported(exact, calibration_queries, **kwargs)

    @classmethod
    def _exported(
        cls, exact: BruteForceIndex, calibration_queries: Any, **kwargs: Any
    ) -> FaissIndex:
        catalogue = exact._catalogue
        if catalogue is None:
            raise ValueError("The exact index is empty: call `index_candidates` first.")
        ann = cls(**kwargs)
        attributes = catalogue.attributes
        if catalogue.host is None:  # sharded over devices: gathered once
            ann.index(
                exact.embeddings(), exact.candidate_ids, calibration_queries,
                attributes=attributes,
            )  # fmt: skip
        else:
            # (A copy once the exact index changed: it changes its own in place.)
            ids = catalogue.ids if catalogue.buffers is None else catalogue.ids.copy()
            ann._build(catalogue.host, ids, calibration_queries, attributes)
        return ann

    @property
    def num_candidates(self) -> int:
        """How many candidates are indexed (0 before `index`)."""
        catalogue = self._catalogue
        return 0 if catalogue is None else catalogue.count

    @property
    def candidate_ids(self) -> np.ndarray | None:
        """The indexed candidate ids, one per position, as a NumPy array, or None.

        Once `add`, `remove` or `update` changed the catalogue, a copy.
        """
        with self._catalogue_lock.reading():
            catalogue = self._catalogue
            if catalogue is None:
                return None
            return catalogue.ids if catalogue.book is None else catalogue.ids.copy()

    @property
    def changed_since_index(self) -> int:
        """Candidates added, removed or updated since `index` (or `load`)."""
        catalogue = self._catalogue
        return 0 if catalogue is None else catalogue.changed

    def _snapshot(self) -> _FaissCatalogue:
        catalogue: _FaissCatalogue | None = self._catalogue
        if catalogue is None:
            raise ValueError("The index is empty. Call `index(candidate_embeddings)` first.")
        return catalogue

    def index(
        self,
        candidate_embeddings: Any,
        candidate_ids: Any = None,
        calibration_queries: Any = None,
        *,
        attributes: Mapping[str, Any] | None = None,
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
            attributes: per-candidate values that `search(where=...)` filters
                on, as `BruteForceIndex.index` takes them; saved with the index.

        Raises:
            ValueError: as `BruteForceIndex.index` (empty, non-2D, non-finite,
                duplicate or misaligned ids, blocks of different dims), `nlist`
                above the catalogue size, a dim that `pq_subquantizers` does not
                divide, fewer than 256 candidates for IVF-PQ, or a `train_size`
                below `nlist` (or below 256 with IVF-PQ), or `attributes` that
                are not one boolean, number or string per candidate.
            ImportError: faiss is not installed.
        """
        blocks, rows = _catalogue_store.blocks_of(candidate_embeddings)
        if rows is not None:  # one array
            embeddings, ids, _ = check_catalogue(candidate_embeddings, candidate_ids)
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
            ids, _, _ = checked_ids(
                paired_ids if paired_ids is not None else candidate_ids, store.num_rows
            )
        self._build(store, ids, calibration_queries, attributes)

    def _build(
        self,
        rows: Any,
        ids: np.ndarray,
        calibration_queries: Any,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Trains and fills the faiss index from `rows` (an array or a `ChunkStore`)."""
        faiss = _faiss()
        num, dim = rows.shape
        checked = _filters.checked_attributes(attributes, num)  # before training
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        rng = np.random.default_rng(seed)  # the training sample, then the calibration's
        index = trained_index(
            faiss, rows, self.nlist, self.pq_subquantizers, self.train_size, seed, rng
        )
        with self._catalogue_lock.writing():
            object.__setattr__(self, "_catalogue", _FaissCatalogue(index, ids, checked))
        self.calibrated_nprobe = self.calibrated_recall = None
        if self.target_recall is not None:
            if calibration_queries is None:
                picked = np.sort(rng.choice(num, size=min(num, 256), replace=False))
                calibration_queries = _catalogue_store.take_rows(rows, picked)
            queries = checked_queries(calibration_queries, dim)
            k = min(self.calibration_k, num)
            self.calibrated_nprobe, self.calibrated_recall = calibrated_nprobe(
                faiss, index, rows, queries, k, self.target_recall
            )

    def nprobe_for(self, k: int) -> int:
        """The lists a top-`k` search reads: `nprobe`, the calibrated value, or the size rule.

        Raises:
            ValueError: the index is empty, or `k` is not an integer in
                `[1, num_candidates]`.
        """
        catalogue = self._snapshot()
        return self._nprobe(catalogue, self._checked_k(k))

    def _allowed_to_read(self, catalogue: _FaissCatalogue, k: int) -> float:
        """Allowed candidates a filtered query reads: `SCAN_PER_RESULT × k` by default
        (without the floor of `MIN_NPROBE` lists, which a filter spreads over more
        lists), else what the given or calibrated `nprobe` reads unfiltered."""
        nprobe = self.nprobe if self.nprobe is not None else self.calibrated_nprobe
        if nprobe is None:
            return float(SCAN_PER_RESULT * k)
        return min(nprobe, int(catalogue.index.nlist)) * len(catalogue.ids) / catalogue.index.nlist

    def _nprobe(self, catalogue: _FaissCatalogue, k: int) -> int:
        nlist = int(catalogue.index.nlist)
        if self.nprobe is not None:
            return min(self.nprobe, nlist)
        if self.calibrated_nprobe is not None:
            return self.calibrated_nprobe
        per_list = len(catalogue.ids) / nlist
        return min(nlist, max(MIN_NPROBE, math.ceil(SCAN_PER_RESULT * k / per_list)))

    def search(
        self,
        query_embeddings: Any,
        k: int = 10,
        similarity_fn: SimilarityFn | None = None,
        *,
        exclude: Sequence[Any] | None = None,
        ignore_unknown_exclusions: bool = False,
        allow: Sequence[Any] | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k ids for each query, best first, optionally filtered.

        Args:
            query_embeddings: `[queries, dim]` array-like.
            k: results per query; `1 <= k <= num_candidates`.
            similarity_fn: None, or a scoring function that must give the inner
                product (e.g. an unchanged `TwoTowerRetrieval.compute_similarities`):
                faiss scores nothing else. It is checked on a small random probe.
            exclude: one sequence of candidate ids (or None) per query, left out
                of that query's results, as in `BruteForceIndex.search`. The
                search asks faiss for `k` more results per excluded id, and keeps
                the best `k` that are not excluded.
            ignore_unknown_exclusions: skip excluded (and allowed) ids that are
                not in the catalogue instead of raising.
            allow: one sequence of candidate ids (or None) per query, as in
                `BruteForceIndex.search`: that query returns only these.
            where: conditions on the attributes given to `index`, as in
                `BruteForceIndex.search`.

        **Filters.** A filtered query returns only candidates it may return,
        and reads about as many of them as an unfiltered search reads
        candidates (`64 × k`, or what `nprobe` or the calibrated value reads):
        its lists nearest first, skipping those with none allowed, until they
        hold that many allowed candidates (the first filtered search records
        each candidate's list: 8 more bytes per candidate). Where a filter
        leaves few candidates (`m` with `m² <= 64 × k × candidates`, e.g.
        80,000 of 10^6 at k = 100), their stored vectors are scored exactly
        instead (the first such search builds faiss' direct
        map: 8 more bytes per candidate). Queries with an `allow` list are
        searched one by one. Rows with fewer than k allowed candidates end
        with padding, as below.

        Returns:
            `(ids, scores)`, NumPy arrays of shape `[queries, k]`. When the probed
            lists hold fewer than `k` candidates, the missing slots have score
            `-inf` and id -1 (or "" for string ids): raise `nprobe`. The lists
            read are `nprobe_for(k)` (`k` plus the most ids one query excludes).

        Raises:
            ValueError: if the index is empty, `k` is not an integer (Python or
                NumPy) in `[1, num_candidates]`, the queries are not numeric,
                have the wrong dim or contain NaN or infinity, `similarity_fn`
                is not the inner product, `exclude` or `allow` is malformed or
                names unknown ids, `where` is malformed (see
                `BruteForceIndex.search`), or, without filters, `exclude` leaves
                a query fewer than `k` candidates.
        """
        with self._catalogue_lock.reading():
            return self._search(
                query_embeddings, k, similarity_fn, exclude, ignore_unknown_exclusions, allow,
                where,
            )  # fmt: skip

    def _search(
        self,
        query_embeddings: Any,
        k: int,
        similarity_fn: SimilarityFn | None,
        exclude: Sequence[Any] | None,
        ignore_unknown_exclusions: bool,
        allow: Sequence[Any] | None,
        where: Mapping[str, Any] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        catalogue = self._snapshot()
        k = self._checked_k(k)
        dim = int(catalogue.index.d)
        queries = checked_queries(query_embeddings, dim, "query_embeddings")
        if similarity_fn is not None:
            check_inner_product(similarity_fn, dim)
        num = len(catalogue.ids)
        mask = _filters.where_mask(catalogue.attributes, where, num)
        allowed = None
        if allow is not None:
            allowed = _filters.allowed_pairs(
                catalogue.lookup(), allow, len(queries), ignore_unknown_exclusions, mask
            )
        filtered = mask is not None or allowed is not None
        excluded, fetch = None, k
        if exclude is not None:
            excluded = _candidate_ids.exclusions(
                catalogue.lookup(),
                exclude,
                len(queries),
                0 if filtered else k,  # filtered rows are padded, not refused
                ignore_unknown_exclusions,
            )
        if filtered:
            scores, positions = filtered_search(
                _faiss(), catalogue.index, catalogue.locations(), queries, k,
                lambda fetch: self._allowed_to_read(catalogue, fetch),
                lambda fetch: self._nprobe(catalogue, fetch),
                mask, allowed, excluded,
            )  # fmt: skip
            return self._ids_of(catalogue, scores, positions)
        if excluded is not None and len(excluded[0]):
            most = int(np.bincount(excluded[0]).max())
            fetch = min(len(catalogue.ids), k + most)
        # A parameter object, not `index.nprobe`: searches may run concurrently.
        parameters = _faiss().SearchParametersIVF(nprobe=self._nprobe(catalogue, fetch))
        scores, positions = catalogue.index.search(queries, fetch, params=parameters)
        if excluded is not None and fetch > k:
            scores, positions = without_excluded(scores, positions, excluded, k, len(catalogue.ids))
        return self._ids_of(catalogue, scores, positions)

    @staticmethod
    def _ids_of(
        catalogue: _FaissCatalogue, scores: np.ndarray, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of result positions; -1 positions become padding, score -inf."""
        missing = positions < 0
        ids = catalogue.ids[np.where(missing, 0, positions)]
        if missing.any():
            ids = np.where(missing, _candidate_ids.padding_id(ids), ids)
            scores = np.where(missing, -np.inf, scores)
        return ids, scores

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Holds the catalogue still: the calls made inside see one version of it.

        `add`, `remove`, `update` and `index` wait until the block ends (each
        call already sees one version on its own; this spans several, e.g.
        `candidate_ids` and `embeddings()` read together).

        Examples:
            >>> import numpy as np
            >>> index = two_tower.FaissIndex(nlist=1)
            >>> index.index(np.eye(3, dtype="float32")[[0, 1, 2] * 20], np.arange(60))
            >>> with index.reading():
            ...     ids, count = index.candidate_ids, index.num_candidates
            >>> len(ids) == count
            True
        """
        lock: ReadWriteLock = self._catalogue_lock
        return lock.reading()

    def add(
        self,
        candidate_embeddings: Any,
        candidate_ids: Any,
        *,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Adds candidates to the trained lists, without training them again.

        As `BruteForceIndex.add` (the same checks, positions and atomicity
        with respect to searches), at O(rows added) plus one pass over the
        `nlist` list sizes: each row goes into the list of its nearest
        centroid. The lists and a calibrated `nprobe` stay those of `index`:
        once the candidates added, removed or updated since pass 10 % of the
        catalogue indexed then (`changed_since_index`), a warning says to call
        `index` again, which trains the lists on the catalogue of now.

        Raises:
            ValueError: as `BruteForceIndex.add`. Nothing is changed when it
                raises.
            ImportError: faiss is not installed.

        Examples:
            >>> import numpy as np
            >>> rng = np.random.default_rng(0)
            >>> ann = two_tower.FaissIndex(nlist=4)
            >>> ann.index(rng.normal(size=(400, 8)).astype("float32"), np.arange(400))
            >>> ann.add(np.ones((1, 8), "float32") * 9, [1000])
            >>> ann.search(np.ones((1, 8), "float32"), k=1)[0].tolist()
            [[1000]]
        """
        with self._catalogue_lock.writing():
            catalogue = self._snapshot()
            rows = _id_book.new_rows(int(catalogue.index.d), "float32", candidate_embeddings, "add")
            table = catalogue.lookup()
            ids = _id_book.new_ids(table, candidate_ids, len(rows))
            values = _id_book.new_attributes(catalogue.attributes, attributes, len(rows))
            book, where = catalogue.changing()
            count = catalogue.count
            where = _faiss_lists.add_rows(_faiss(), catalogue.index, where, count, rows)
            book.append(count, ids, values)
            catalogue.changed_to(count + len(rows), where, len(rows))
            self._warn_on_drift(catalogue)

    def remove(self, candidate_ids: Any, *, ignore_unknown: bool = False) -> None:
        """Removes candidates by id, as `BruteForceIndex.remove` (the last candidates
        take the removed ones' positions), at O(rows removed): each entry leaves
        its list in place. Removing every candidate empties the index.

        Raises:
            ValueError: as `BruteForceIndex.remove`. Nothing is changed when it
                raises.
        """
        with self._catalogue_lock.writing():
            catalogue = self._snapshot()
            positions = _id_book.change_positions(
                catalogue.lookup(), candidate_ids, ignore_unknown, "remove"
            )
            positions = positions[positions >= 0]
            if not len(positions):
                return
            count = catalogue.count
            if len(positions) == count:
                object.__setattr__(self, "_catalogue", None)
                return
            book, where = catalogue.changing()
            holes, movers = book.remove(positions, count)
            _faiss_lists.remove_rows(_faiss(), catalogue.index, where, positions, holes, movers)
            catalogue.changed_to(count - len(positions), where, len(positions))
            self._warn_on_drift(catalogue)

    def update(self, candidate_ids: Any, candidate_embeddings: Any) -> None:
        """New embeddings for indexed candidates, as `BruteForceIndex.update`, at
        O(rows updated): each is re-assigned to the list of its nearest centroid.

        Raises:
            ValueError: as `BruteForceIndex.update`. Nothing is changed when it
                raises.
        """
        with self._catalogue_lock.writing():
            catalogue = self._snapshot()
            positions = _id_book.change_positions(
                catalogue.lookup(), candidate_ids, False, "update"
            )
            rows = _id_book.new_rows(
                int(catalogue.index.d), "float32", candidate_embeddings, "update", len(positions)
            )
            _, where = catalogue.changing()
            _faiss_lists.update_rows(_faiss(), catalogue.index, where, positions, rows)
            catalogue.changed_to(catalogue.count, where, len(positions))
            self._warn_on_drift(catalogue)

    def _warn_on_drift(self, catalogue: _FaissCatalogue) -> None:
        """Once, when the changes since `index` pass `DRIFT` of what was indexed."""
        limit = DRIFT * catalogue.indexed
        if catalogue.changed > limit >= catalogue.changed - catalogue.last_change:
            warnings.warn(
                f"FaissIndex: {catalogue.changed:,} candidates changed since `index` "
                f"(more than {DRIFT:.0%} of the {catalogue.indexed:,} indexed then). Its "
                "lists were trained, and its nprobe calibrated, on that catalogue: call "
                "`index` again to keep its recall.",
                stacklevel=3,
            )

    def attributes(self) -> dict[str, np.ndarray]:
        """The indexed candidate attributes, `{name: [candidates] values}` (read-only)."""
        with self._catalogue_lock.reading():
            catalogue = self._catalogue
            if catalogue is None or catalogue.attributes is None:
                return {}
            if catalogue.book is None:
                return dict(catalogue.attributes)
            copies = {name: values.copy() for name, values in catalogue.attributes.items()}
        for values in copies.values():
            values.flags.writeable = False
        return copies

    def positions_of(self, ids: Any, *, ignore_unknown: bool = False) -> np.ndarray:
        """Catalogue positions of candidate ids, as `BruteForceIndex.positions_of`.

        Args:
            ids: 1D array-like of ids of the indexed kind (integers or strings).
            ignore_unknown: return -1 for ids not in the catalogue instead of
                raising.

        Returns:
            int64 positions, one per id.

        Raises:
            ValueError: if the index is empty, the ids are of another kind than
                the indexed ids, or (unless `ignore_unknown`) an id is unknown.
        """
        with self._catalogue_lock.reading():
            return _candidate_ids.positions_of(self._snapshot().lookup(), ids, ignore_unknown)

    def _checked_k(self, k: Any) -> int:
        return _arguments.integer("k", k, maximum=self.num_candidates, owner="FaissIndex")

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Writes the faiss index, the ids and the attributes into `folder`
        (created if needed), atomically.

        The index, the ids and the attributes (if any) go to new files named
        with a random token (`index-<token>.faiss`, `candidate_ids-<token>.npy`,
        `candidate_attributes-<token>.npz`), flushed to disk;
        then `faiss_index.json`, which names them with their sizes and SHA-256
        (and keeps the calibrated `nprobe` and its recall, which `load` restores),
        replaces the previous one in one rename. A save that fails or is killed
        leaves the previous index loadable; its files are removed by the next
        save into the folder, as are the files of the index it replaces.
        One process at a time may save into a folder.

        Raises:
            ValueError: the index is empty, or `folder` is an existing file.
            ImportError: faiss is not installed.
        """
        with self._catalogue_lock.reading():  # one version, whatever changes meanwhile
            self._save(folder)

    def _save(self, folder: str | os.PathLike[str]) -> None:
        catalogue = self._catalogue
        if catalogue is None:
            raise ValueError("Nothing to save: the index is empty.")
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"FaissIndex.save: {path} is a file; pass a folder (it is created if needed)."
            )
        path.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        names = {"index": f"index-{token}.faiss", "ids": f"candidate_ids-{token}.npy"}
        if catalogue.attributes:
            names["attributes"] = f"candidate_attributes-{token}.npz"
        written = []
        try:
            written.append(path / names["index"])
            _faiss().write_index(catalogue.index, str(written[-1]))
            written.append(path / names["ids"])
            with open(written[-1], "wb") as handle:
                np.save(handle, catalogue.ids, allow_pickle=False)
            if catalogue.attributes:
                written.append(path / names["attributes"])
                with open(written[-1], "wb") as handle:
                    _filters.write_attributes(handle, catalogue.attributes)
            files = {}
            for role, name in names.items():
                _fsync(str(path / name), os.O_RDONLY)
                files[role] = {"name": name, **_size_and_hash(path / name)}
            manifest = {
                "format": FORMAT,
                "version": 1,
                "num_candidates": len(catalogue.ids),
                "dim": int(catalogue.index.d),
                "files": files,
                "calibration": {"nprobe": self.calibrated_nprobe, "recall": self.calibrated_recall},
            }
            temporary = path / f".{MANIFEST}.tmp-{token}"
            written.append(temporary)
            temporary.write_text(json.dumps(manifest, indent=1))
            _fsync(str(temporary), os.O_RDONLY)
            os.replace(temporary, path / MANIFEST)  # the commit
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

        The calibrated `nprobe` and its recall come back with the index (an
        `nprobe` given in `kwargs` still takes precedence, as at search).

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
        ann._restore(path)
        return ann

    def _restore(self, path: Path) -> None:
        """The index, ids and calibration of a saved folder, checked (`read_folder`)."""
        index, ids, calibration, attributes = read_folder(path, _faiss())
        with self._catalogue_lock.writing():
            object.__setattr__(self, "_catalogue", _FaissCatalogue(index, ids, attributes))
        self.calibrated_nprobe = calibration["nprobe"]
        self.calibrated_recall = calibration["recall"]

    def save_assets(self, dir_path: str) -> None:
        """Keras saving: the folder `save` writes (its manifest keeps the calibration)."""
        if self._catalogue is None:
            return
        self.save(dir_path)

    def load_assets(self, dir_path: str) -> None:
        """Keras loading: the index `save_assets` wrote, if it wrote one."""
        path = Path(dir_path)
        if not (path / MANIFEST).exists():
            return  # saved empty
        self._restore(path)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "nlist": self.nlist,
                "nprobe": self.nprobe,
                "train_size": self.train_size,
                "seed": self.seed,
                "target_recall": self.target_recall,
                "calibration_k": self.calibration_k,
                "pq_subquantizers": self.pq_subquantizers,
            }
        )
        return config


class _BookTable(NamedTuple):
    """What `positions_of` reads once the catalogue changed in place."""

    ids: np.ndarray
    order: np.ndarray
    sorted_ids: np.ndarray
    buffers: IdBook


class _FaissCatalogue:
    """The faiss index, the ids of its positions and their attributes. `index` swaps
    in a new one; `add`, `remove` and `update` change it in place, under the
    index's write lock."""

    def __init__(
        self, index: Any, ids: np.ndarray, attributes: Mapping[str, np.ndarray] | None = None
    ) -> None:
        self.index = index
        self.count = len(ids)
        self.indexed = len(ids)  # at `index`, for the drift warning
        self.changed = 0  # candidates added, removed or updated since
        self.last_change = 0
        self._ids = ids
        self._attributes = attributes
        self._lookup: CandidateIds | _BookTable | None = None
        self._where: np.ndarray | None = None
        self.book: IdBook | None = None

    @property
    def ids(self) -> np.ndarray:
        return self._ids if self.book is None else self.book.ids[: self.count]

    @property
    def attributes(self) -> Mapping[str, np.ndarray] | None:
        return self._attributes if self.book is None else self.book.attribute_views(self.count)

    def lookup(self) -> CandidateIds | _BookTable:
        """The ids with their argsort and sorted copy, made at the first lookup."""
        if self._lookup is None:  # two threads may both sort: the same result
            order = np.argsort(self._ids, kind="stable")
            self._lookup = CandidateIds(self._ids, order, self._ids[order])
        return self._lookup

    def locations(self) -> np.ndarray:
        """Each position's place in the lists (`_faiss_lists.locations`), read at first use."""
        if self._where is None:  # two threads may both read: the same result
            self._where = _faiss_lists.locations(_faiss(), self.index, self.count, self.count)
        return self._where

    def changing(self) -> tuple[IdBook, np.ndarray]:
        """The id book and the locations, made at the first change (one copy of each)."""
        if self.book is None:
            attributes = None if self._attributes is None else dict(self._attributes)
            lookup = self.lookup()
            self.book = IdBook.of(self._ids, lookup.order, attributes)
            self._lookup = _BookTable(self.ids, self.book.order, lookup.sorted_ids, self.book)
        return self.book, self.locations()

    def changed_to(self, count: int, where: np.ndarray, rows: int) -> None:
        """After a change of `rows` candidates: `count` of them now, at `where`."""
        assert self.book is not None and isinstance(self._lookup, _BookTable)
        self.count, self._where = count, where
        self.changed += rows
        self.last_change = rows
        order, sorted_ids = self.book.lookup(count, self._lookup.sorted_ids)
        self._lookup = _BookTable(self.ids, order, sorted_ids, self.book)


def _remove_stale_files(path: Path) -> None:
    """Removes our files that the folder's manifest does not name (older or killed saves)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        current = {str(entry["name"]) for entry in manifest["files"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # another writer, or damage: remove nothing
    for name in os.listdir(path):
        stale = OURS.fullmatch(name) or name in (FAISS_FILE, IDS_FILE)
        if stale and name not in current:
            with contextlib.suppress(OSError):
                os.unlink(path / name)
