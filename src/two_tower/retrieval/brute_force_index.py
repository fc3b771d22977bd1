"""Exact top-k retrieval over an indexed candidate catalogue."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower._compiled_cache import CompiledCache
from two_tower.backends import backend_module
from two_tower.retrieval import (
    _candidate_ids,
    _catalogue_changes,
    _catalogue_store,
    _filters,
    _id_book,
    _indexed_catalogue,
    _tiled_top_k,
)
from two_tower.retrieval._catalogue_lock import ReadWriteLock
from two_tower.retrieval._indexed_catalogue import IndexedCatalogue
from two_tower.retrieval._top_k_step import TopKStep
from two_tower.retrieval.candidate_index import CandidateIndex
from two_tower.retrieval.top_k import BLOCK, dot_similarities, next_power_of_two
from two_tower.types import SimilarityFn, Tensor

_EMBEDDINGS_FILE = "candidate_embeddings.npy"
_IDS_FILE = "candidate_ids.npy"
_ATTRIBUTES_FILE = "candidate_attributes.npz"


_MAX_CHUNK = 2**24  # positions inside a chunk are exact in float32 keys
# A filter that leaves at most 1/8 of the catalogue to every query of a call is
# searched over a copy of those rows only (at most 1/8 of the catalogue's memory,
# for the call); a broader one masks the scores, which costs 1.1 to 2 times an
# unfiltered search (benchmarks/live_catalogue.py).
_COMPACT_FRACTION = 8
# The most bytes of scores a tile may hold (several calls of a small catalogue
# would otherwise spend the chunk's budget on rows, and its tiles leave the cache).
_TILE_BYTES = 2**23


@keras.saving.register_keras_serializable(package="two_tower")
class BruteForceIndex(keras.layers.Layer, CandidateIndex):
    """Exact top-k search over candidate embeddings, scored in chunks.

    It scores `query_batch_size` queries against `chunk_size` candidates at a
    time and merges each chunk's top k into a running top k, so memory grows
    with `query_batch_size × chunk_size`, not with the catalogue or the number
    of queries. A chunk is scored a tile of a few thousand candidates at a
    time, and each tile's scores are reduced to block maxima while they are
    still in the CPU's cache; only the blocks that can hold the top k are
    scored again (see `two_tower.retrieval._tiled_top_k`; `docs/benchmarks.md`,
    "Exact search against the machine's limit", compares it with a
    compute-bound matrix product).

    Results equal the full computation, ties included: equal scores come back
    lower candidate position first, on JAX, TensorFlow and torch alike, although
    their `top_k` ops order ties differently.

    We write our own instead of using `keras_rs.layers.BruteForceRetrieval`
    because, in keras-rs 0.4, that layer casts candidate ids to int32 (ids above
    2**31 come back corrupted), freezes the catalogue size at first use, stores a
    bound method in `get_config`, fails to reload inside a saved model on JAX,
    breaks ties differently on each backend, and materialises the whole
    `[queries, candidates]` score matrix (16.8 GB for 1024 queries over 1M
    candidates).

    **Threads.** `search` and `positions_of` may be called from many threads at
    once, with the same results as serial calls: the compiled step reads the
    variables without writing them (on JAX too, where Keras' own `predict` is not
    thread-safe), and each call sees one version of the catalogue: a concurrent
    `index`, `add`, `remove` or `update` makes it see the old or the new one,
    never a mix (changes wait for the searches under way; see `reading()` to
    span several calls).

    **A catalogue that changes.** `add`, `remove` and `update` change the
    catalogue in place at O(rows changed), with the results of indexing the
    changed catalogue again.

    **Distribution.** Indexed while a `keras.distribution` distribution is set
    (JAX), the catalogue is kept sharded by rows over every device of its mesh:
    each device holds and scores `1 / devices` of the candidates, takes its own
    top k, and the per-device results are merged into the exact top k, ties
    lower position first as on one device. No device holds the whole
    catalogue.

    Candidate ids never enter the compiled graph: they are kept as a NumPy array
    and positions are mapped to ids on the host. So int64 ids of the full range
    (and, on any backend, string ids) come back intact, even on JAX without x64.

    The index (embeddings and ids) is saved as assets of a `.keras` file and
    restored by `keras.saving.load_model`. It can be re-indexed at any time with
    a catalogue of a different size.

    Args:
        chunk_size: candidates per step, at most 2**24; the catalogue is
            stored in chunks of this many rows. Each step also scores again
            `k × 32` candidates per query, so larger chunks do that less often.
        query_batch_size: queries scored at once against a full chunk; against
            a smaller catalogue, proportionally more (at most 8 MiB of scores
            per tile). Memory for scores is about `query_batch_size ×
            chunk_size / 4` bytes (the block maxima, held twice: 64 MiB by
            default), plus `k × 128` bytes per query for the candidates scored
            again. A step cannot tile when k exceeds 1/128 of its chunk's width
            (the catalogue's size, for a catalogue smaller than a chunk), when
            the chunk holds fewer than 4 tiles (`search_tile` in
            `two_tower.backends`: 2,048 candidates on JAX and torch, 8,192 on
            TensorFlow), or when the catalogue is sharded over
            devices: it then scores its chunk whole, with 32 times fewer
            queries for the same memory.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: a `chunk_size` or `query_batch_size` that is not a positive
            integer (Python or NumPy), or a `chunk_size` above 2**24.

    Call arguments:
        - `query_embeddings`: `[queries, dim]` tensor.
        - `k`: how many candidates to return per query.

    Call returns:
        From `call` (the compiled kernel): a `(scores, positions)` tuple of
        `[queries, k]` tensors, best first; positions index the indexed
        catalogue. `search` maps positions to candidate ids, takes exclusions and
        returns `(ids, scores)`.

    Examples:
        >>> import numpy as np
        >>> index = two_tower.BruteForceIndex()
        >>> index.index(np.eye(3, dtype="float32"), np.array([10, 20, 30]))
        >>> ids, scores = index.search(np.array([[0.0, 1.0, 0.0]], "float32"), k=2)
        >>> ids.tolist()
        [[20, 10]]
        >>> index.search(np.array([[0.0, 1.0, 0.0]], "float32"), k=2, exclude=[[20]])[0].tolist()
        [[10, 30]]
    """

    def __init__(self, chunk_size: int = 2**20, query_batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Python ints (a NumPy integer would not serialise in `get_config`).
        self.chunk_size = _arguments.integer(
            "chunk_size", chunk_size, maximum=_MAX_CHUNK, owner="BruteForceIndex"
        )
        self.query_batch_size = _arguments.integer(
            "query_batch_size", query_batch_size, owner="BruteForceIndex"
        )
        # Not tracked by Keras: the catalogue is saved as assets, and compiled
        # steps (keyed by scoring function and k) read their owner's variables.
        object.__setattr__(self, "_catalogue", None)
        # (16: filters of different sizes compile steps of their own widths.)
        object.__setattr__(self, "_steps", CompiledCache[TopKStep](max_size=16))
        # Searches read the catalogue together; `add`, `remove` and `update`
        # change it in place, alone (see `_catalogue_lock`).
        object.__setattr__(self, "_catalogue_lock", ReadWriteLock())
        self.built = True

    @property
    def num_candidates(self) -> int:
        """How many candidates are indexed (0 before `index` is called)."""
        catalogue = self._catalogue
        return 0 if catalogue is None else len(catalogue.ids)

    @property
    def candidate_ids(self) -> np.ndarray | None:
        """The indexed candidate ids, one per position, as a NumPy array, or None.

        Once `add`, `remove` or `update` changed the catalogue, a copy (the
        index changes its own in place).
        """
        with self._catalogue_lock.reading():
            catalogue = self._catalogue
            if catalogue is None:
                return None
            return catalogue.ids.copy() if catalogue.buffers is not None else catalogue.ids

    def embeddings(self) -> np.ndarray | None:
        """The indexed `[candidates, dim]` embeddings as one NumPy array, or None.

        A copy of the whole catalogue (gathered from its chunks, or from the
        devices of a sharded one). A method, not a property: Keras' saving and
        loading read every public attribute of a layer, and a property that
        copied the catalogue made a `.keras` save hold it 4 times (measured at
        4M rows).
        """
        with self._catalogue_lock.reading():
            catalogue = self._catalogue
            if catalogue is None:
                return None
            embeddings = _indexed_catalogue.host_embeddings(catalogue)
            # (One chunk gives a view, which a later change would write into.)
            return embeddings.copy() if catalogue.buffers is not None else embeddings

    def _snapshot(self) -> IndexedCatalogue:
        catalogue: IndexedCatalogue | None = self._catalogue
        if catalogue is None:
            raise ValueError(_EMPTY_INDEX)
        return catalogue

    def index(
        self,
        candidate_embeddings: Any,
        candidate_ids: Any = None,
        *,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Replaces the catalogue (and its attributes).

        The index holds one copy of the catalogue (in chunks of `chunk_size`
        rows, which the backend shares on CPU), plus at most one block and one
        chunk while it is built: give the catalogue as an iterable of row blocks
        to never hold it whole elsewhere.

        Args:
            candidate_embeddings: `[candidates, dim]` array-like of floats, or an
                iterable (a generator, a `tf.data.Dataset`, a Python list, ...) of
                `[rows, dim]` blocks in catalogue order, or of `(embeddings, ids)`
                pairs. Blocks may differ in rows and dtype (they are cast to the
                index's dtype), not in dim; empty blocks are skipped.
            candidate_ids: `[candidates]` unique ids, integers (the whole int64
                range) or strings; defaults to positions `0..candidates-1`
                (or to the ids of the pairs).
            attributes: per-candidate values that `search(where=...)` filters
                on: `{name: [candidates] values}`, booleans, numbers or strings,
                e.g. `{"category": [...], "in_stock": [...], "price": [...]}`.
                Kept on the host (one copy), saved with the index.

        Raises:
            ValueError: on an empty catalogue, a non-2D embedding matrix (or
                block), blocks of different dims, non-finite embeddings, ids
                whose length differs from the embeddings, ids given twice (in
                pairs and as `candidate_ids`), ids that are not all integers or
                all strings (within and across pairs), ids given as an iterator,
                one `(embeddings, ids)` pair instead of a list of pairs,
                duplicate ids, or `attributes` that are not one boolean, number
                or string per candidate (or hold NaN). The previous catalogue is
                kept when it raises.
        """
        blocks, rows = _catalogue_store.blocks_of(candidate_embeddings)
        if rows is not None and candidate_ids is not None:
            _candidate_ids.checked_ids(candidate_ids, rows)  # before copying anything
        dtype = keras.backend.standardize_dtype(self.compute_dtype)
        store, paired_ids = _catalogue_store.assemble(blocks, self.chunk_size, BLOCK, dtype, rows)
        if paired_ids is not None and candidate_ids is not None:
            raise ValueError(
                "The catalogue blocks are (embeddings, ids) pairs, so `candidate_ids` must be None."
            )
        ids = _candidate_ids.checked_ids(
            paired_ids if paired_ids is not None else candidate_ids, store.num_rows
        )
        checked = _filters.checked_attributes(attributes, store.num_rows)
        catalogue = _indexed_catalogue.indexed_catalogue(store, ids, self.chunk_size, checked)
        with (
            self._catalogue_lock.writing()
        ):  # (waits for searches reading an old catalogue in place)
            object.__setattr__(self, "_catalogue", catalogue)  # one atomic swap

    def attributes(self) -> dict[str, np.ndarray]:
        """The indexed candidate attributes, `{name: [candidates] values}` (read-only)."""
        with self._catalogue_lock.reading():
            catalogue = self._catalogue
            if catalogue is None or catalogue.attributes is None:
                return {}
            if catalogue.buffers is None:
                return dict(catalogue.attributes)
            copies = {name: values.copy() for name, values in catalogue.attributes.items()}
        for values in copies.values():
            values.flags.writeable = False
        return copies

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Holds the catalogue still: the calls made inside see one version of it.

        `add`, `remove`, `update` and `index` wait until the block ends (each
        call already sees one version on its own; this spans several, e.g.
        `candidate_ids` and `embeddings()` read together).

        Examples:
            >>> import numpy as np
            >>> index = two_tower.BruteForceIndex()
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
        """Adds candidates after the last one, without indexing the catalogue again.

        Costs O(rows added): the rows go into the last chunk's free rows (then
        into new chunks), the ids into a buffer with spare room (the first
        change copies ids and attributes into one, once). Every search sees
        the catalogue before or after the change, never a mix: a change waits
        for the searches running, and searches that arrive meanwhile wait for
        it. The results then equal those of `index` called with the new
        catalogue in `candidate_ids` order (ids and scores, ties included).

        Under a `keras.distribution` distribution the sharded catalogue is
        built again (O(catalogue)).

        Args:
            candidate_embeddings: `[rows, dim]` array-like, the index's dim.
            candidate_ids: `[rows]` new unique ids of the indexed kind (integers
                or strings), none already indexed.
            attributes: one value per new row for each indexed attribute (all
                of them, of the same kind: booleans, numbers or strings);
                required if and only if the index has attributes.

        Raises:
            ValueError: the index is empty; the rows are not a finite `[rows,
                dim]` array of the index's dim; the ids are not one per row,
                not unique, of another kind, or already indexed (named); the
                attributes are missing, extra, or of another kind. Nothing is
                changed when it raises.

        Examples:
            >>> import numpy as np
            >>> index = two_tower.BruteForceIndex()
            >>> index.index(np.eye(3, dtype="float32"), np.array([10, 20, 30]))
            >>> index.add(np.array([[0.0, 2.0, 0.0]], "float32"), [40])
            >>> index.search(np.array([[0.0, 1.0, 0.0]], "float32"), k=2)[0].tolist()
            [[40, 20]]
        """
        with self._catalogue_lock.writing():
            catalogue = self._snapshot()
            if catalogue.host is None:  # sharded over devices: built again
                self._rebuild_sharded(catalogue, add=(candidate_embeddings, candidate_ids,
                                                      attributes))  # fmt: skip
                return
            dtype = keras.backend.standardize_dtype(self.compute_dtype)
            rows = _id_book.new_rows(catalogue.dim, dtype, candidate_embeddings, "add")
            ids = _id_book.new_ids(catalogue, candidate_ids, len(rows))
            values = _id_book.new_attributes(catalogue.attributes, attributes, len(rows))
            changed = _catalogue_changes.added(catalogue, rows, ids, values, self.chunk_size)
            object.__setattr__(self, "_catalogue", changed)

    def remove(self, candidate_ids: Any, *, ignore_unknown: bool = False) -> None:
        """Removes candidates by id, without indexing the catalogue again.

        Costs O(rows removed): each removed row's place is taken by one of
        the last rows, so positions change (see `candidate_ids`); results then
        equal those of `index` called with the new catalogue in that order.
        Atomic with respect to searches, as `add`. Removing every candidate
        empties the index.

        Args:
            candidate_ids: 1D ids to remove (each once).
            ignore_unknown: skip ids that are not indexed instead of raising.

        Raises:
            ValueError: the index is empty, an id is given twice, or (unless
                `ignore_unknown`) is not indexed. Nothing is changed when it
                raises.

        Examples:
            >>> import numpy as np
            >>> index = two_tower.BruteForceIndex()
            >>> index.index(np.eye(3, dtype="float32"), np.array([10, 20, 30]))
            >>> index.remove([10])
            >>> index.candidate_ids.tolist()
            [30, 20]
        """
        with self._catalogue_lock.writing():
            catalogue = self._snapshot()
            positions = _id_book.change_positions(
                catalogue, candidate_ids, ignore_unknown, "remove"
            )
            positions = positions[positions >= 0]
            if not len(positions):
                return
            if catalogue.host is None:
                self._rebuild_sharded(catalogue, remove=positions)
                return
            changed = _catalogue_changes.removed(catalogue, positions)
            object.__setattr__(self, "_catalogue", changed)

    def update(self, candidate_ids: Any, candidate_embeddings: Any) -> None:
        """Gives indexed candidates new embeddings, in place.

        Costs O(rows updated); positions and attributes stay. Atomic with
        respect to searches, as `add`.

        Args:
            candidate_ids: 1D indexed ids, each once.
            candidate_embeddings: `[ids, dim]`, their new embeddings.

        Raises:
            ValueError: the index is empty, an id is given twice or is not
                indexed, or the rows are not a finite `[ids, dim]` array of the
                index's dim. Nothing is changed when it raises.

        Examples:
            >>> import numpy as np
            >>> index = two_tower.BruteForceIndex()
            >>> index.index(np.eye(3, dtype="float32"), np.array([10, 20, 30]))
            >>> index.update([30], np.array([[0.0, 5.0, 0.0]], "float32"))
            >>> index.search(np.array([[0.0, 1.0, 0.0]], "float32"), k=1)[0].tolist()
            [[30]]
        """
        with self._catalogue_lock.writing():
            catalogue = self._snapshot()
            positions = _id_book.change_positions(catalogue, candidate_ids, False, "update")
            dtype = keras.backend.standardize_dtype(self.compute_dtype)
            rows = _id_book.new_rows(
                catalogue.dim, dtype, candidate_embeddings, "update", len(positions)
            )
            if catalogue.host is None:
                self._rebuild_sharded(catalogue, update=(positions, rows))
                return
            changed = _catalogue_changes.updated(catalogue, positions, rows)
            object.__setattr__(self, "_catalogue", changed)

    def _rebuild_sharded(
        self,
        catalogue: IndexedCatalogue,
        add: tuple[Any, Any, Any] | None = None,
        remove: np.ndarray | None = None,
        update: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """A change to a catalogue sharded over devices: the catalogue built again,
        in the order an unsharded change would leave it."""
        embeddings = _indexed_catalogue.host_embeddings(catalogue)
        ids = catalogue.ids.copy()
        attributes = None if catalogue.attributes is None else dict(catalogue.attributes)
        if update is not None:
            embeddings = embeddings.copy()
            embeddings[update[0]] = update[1]
        if remove is not None:
            if len(remove) == len(ids):
                object.__setattr__(self, "_catalogue", None)
                return
            holes, movers = _id_book.moves(remove, len(ids))
            order = np.arange(len(ids) - len(remove))
            order[holes] = movers
            embeddings, ids = embeddings[order], ids[order]
            if attributes is not None:
                attributes = {name: values[order] for name, values in attributes.items()}
        if add is not None:
            dtype = keras.backend.standardize_dtype(self.compute_dtype)
            rows = _id_book.new_rows(catalogue.dim, dtype, add[0], "add")
            new_ids = _id_book.new_ids(catalogue, add[1], len(rows))
            values = _id_book.new_attributes(catalogue.attributes, add[2], len(rows))
            embeddings = np.concatenate([embeddings, rows])
            ids = np.concatenate([ids, new_ids])
            if attributes is not None and values is not None:
                attributes = {
                    name: np.concatenate([attributes[name], values[name]]) for name in attributes
                }
        store, _ = _catalogue_store.assemble(
            [embeddings],
            self.chunk_size,
            BLOCK,
            keras.backend.standardize_dtype(self.compute_dtype),
        )
        checked = _filters.checked_attributes(attributes, len(ids))
        catalogue = _indexed_catalogue.indexed_catalogue(
            store, _candidate_ids.checked_ids(ids, len(ids)), self.chunk_size, checked
        )
        object.__setattr__(self, "_catalogue", catalogue)

    def positions_of(self, ids: Any, *, ignore_unknown: bool = False) -> np.ndarray:
        """Catalogue positions of candidate ids.

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
            return _candidate_ids.positions_of(self._snapshot(), ids, ignore_unknown)

    def _check_ready(self, catalogue: IndexedCatalogue, query_embeddings: Any, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
        if k > len(catalogue.ids):
            raise ValueError(
                f"`k` (={k}) must not exceed the number of candidates (={len(catalogue.ids)})."
            )
        query_shape = tuple(query_embeddings.shape)
        dim = catalogue.dim
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
        with self._catalogue_lock.reading():
            catalogue = self._snapshot()
            query_embeddings = ops.convert_to_tensor(query_embeddings, self.compute_dtype)
            self._check_ready(catalogue, query_embeddings, k)
            batch_rows, _ = self._batch_rows(catalogue, k)
            parts = [
                self._top_k(
                    catalogue, query_embeddings[start : start + batch_rows], k,
                    similarity_fn or dot_similarities, None,
                )
                for start in range(0, int(query_embeddings.shape[0]), batch_rows)
            ]  # fmt: skip
            # Read now: a later change moves rows, so positions are this version's.
            scores = np.concatenate([ops.convert_to_numpy(part[0]) for part in parts])
            positions = np.concatenate([ops.convert_to_numpy(part[1]) for part in parts])
            return ops.convert_to_tensor(scores), ops.convert_to_tensor(positions)

    def _top_k(
        self,
        catalogue: IndexedCatalogue,
        queries: Tensor,
        k: int,
        similarity_fn: SimilarityFn,
        excluded: tuple[np.ndarray, np.ndarray] | None,
        filters: _Filters | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Chunked running top k; `excluded` = (query rows, positions) to skip.

        `filters` restricts what each query may return (see `search`): a
        shared mask over positions, and per-query allowed (row, position) pairs
        for the `restricted` rows; everything else scores -inf.

        Each chunk is scored and merged by one `TopKStep` call, compiled by the
        backend (`jax.jit`, `tf.function`; eager on torch, see
        `two_tower.backends`), so the `[queries, chunk]` scores never leave the
        fused step. Shapes are padded to powers of two (queries) and to the chunk
        size (the last chunk), so a handful of compilations serve every call.
        """
        num_candidates = len(catalogue.ids)
        num_queries = int(queries.shape[0])
        shards, width = catalogue.layout()
        columns = shards * width  # scored per step, `width` on each device
        mesh = None if catalogue.sharded is None else catalogue.sharded.mesh
        batch_rows, tile = self._batch_rows(catalogue, k)
        rows = min(next_power_of_two(num_queries), batch_rows)
        if tile:
            rows = _tiled_top_k.padded_rows(rows)
        if rows != num_queries:
            padding = ops.zeros((rows - num_queries, queries.shape[1]), queries.dtype)
            queries = ops.concatenate([queries, padding], axis=0)
        step = self._step(similarity_fn, k, columns, mesh, tile)
        best_scores = ops.full((rows, k), float("-inf"), self.compute_dtype)
        best_positions = ops.full((rows, k), -1, "int32")
        for start, chunk in _indexed_catalogue.chunks_of(catalogue, columns):
            num_valid = min(columns, num_candidates - start)
            inputs = {
                "queries": queries,
                "chunk": chunk,
                "start": np.array([start], "int32"),
                "best_scores": best_scores,
                "best_positions": best_positions,
            }
            if num_valid < columns:
                inputs["num_valid"] = np.array([num_valid], "int32")
            if filters is not None:
                inputs.update(filters.chunk_inputs(start, columns, num_valid, rows, bool(tile)))
            if tile:  # exclusions and allow-lists as bits of (query, block) pairs
                allowed = None if filters is None else filters.allowed
                inputs.update(_tiled_top_k.merged_bits(
                    None if excluded is None else _tiled_top_k.block_bits(excluded, start, columns),
                    None if allowed is None else _tiled_top_k.block_bits(allowed, start, columns),
                ))  # fmt: skip
            else:
                indices = _candidate_ids.excluded_indices(excluded, start, num_valid)
                if indices is not None:
                    inputs["excluded"] = indices
            outputs = step(inputs)
            best_scores, best_positions = outputs["scores"], outputs["positions"]
        return best_scores[:num_queries], best_positions[:num_queries]

    def _batch_rows(self, catalogue: IndexedCatalogue, k: int) -> tuple[int, int]:
        """`(queries per step, tile)`: the score budget of a full chunk, spent on rows
        (a power of two), and the candidates per tile, or 0 for chunks scored whole.

        A tiled step keeps the block maxima of its scores (1/`BLOCK` of them);
        a chunk scored whole keeps every score, so it takes `BLOCK` times fewer
        rows for the same memory.
        """
        budget = self.query_batch_size * self.chunk_size
        rows = max(self.query_batch_size, budget // catalogue.layout()[1])
        rows = 1 << (rows.bit_length() - 1)
        shards, width = catalogue.layout()
        tile = backend_module().search_tile
        if tile and shards == 1 and _tiled_top_k.usable(width, k, rows, tile):
            # A tile's [rows, tile] scores stay within a cache-sized budget.
            return max(_tiled_top_k.GROUP, min(rows, _TILE_BYTES // (4 * tile))), tile
        return max(1, rows // BLOCK), 0

    def _step(
        self, similarity_fn: SimilarityFn, k: int, chunk_size: int, mesh: Any, tile: int
    ) -> TopKStep:
        """A cached compiled step for this scoring function, k, chunk, mesh and tile."""
        owner = getattr(similarity_fn, "__self__", None)
        function = getattr(similarity_fn, "__func__", similarity_fn)
        key = (id(owner), function, k, chunk_size, mesh, tile, self.compute_dtype)
        # Concurrent searches share the cache.
        return self._steps.get(
            key, lambda: TopKStep(similarity_fn, k, chunk_size, owner, mesh, tile)
        )

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
        """Top-k candidate ids for each query, best first, optionally filtered.

        Args:
            query_embeddings: `[queries, dim]` array-like.
            k: number of results per query; `1 <= k <= num_candidates`.
            similarity_fn: `f(query_embeddings, candidate_embeddings) ->
                [queries, candidates]` scores; defaults to the dot product.
            exclude: one sequence of candidate ids (or None) per query, left out
                of that query's results, e.g. items already seen: `[[3, 5],
                None]`. A flat list of ids (`[3, 5]`) raises: wrap it per query.
                The results are the exact top k among the remaining candidates.
            ignore_unknown_exclusions: skip excluded (and allowed) ids that are
                not in the catalogue (e.g. retired items) instead of raising.
            allow: one sequence of candidate ids (or None, for no restriction)
                per query: that query returns only these, e.g. the items a user
                may see: `[[3, 5, 8], None]`.
            where: conditions on the attributes given to `index`, all of which
                a candidate must meet, for every query: `name: value` (equal),
                `name: [v1, v2, ...]` (any of them), `name: {"min": a, "max":
                b}` (a numeric range, ends included, either optional); e.g.
                `{"category": [2, 7], "in_stock": True, "price": {"max": 20.0}}`.

        **Filters.** With `allow` or `where`, the results are the exact top k
        among the candidates a query may return (allowed, meeting `where`, not
        excluded), ties lower position first as always. Where fewer than k
        remain, the row ends with padding: score `-inf` and id -1 (or `""`
        for string ids). **Cost.** When the filters leave every query of the
        call at most 1/8 of the catalogue (a selective `where`, or every query
        with a short `allow` list), only those rows are copied and scored: the
        search costs about that share of an unfiltered one, plus the copy. A
        broader filter scores every candidate and gives the others -inf, chunk
        by chunk, with the memory of an unfiltered search and 1.1 to 2 times
        its time.

        Returns:
            `(ids, scores)`: NumPy arrays of shape `[queries, k]`; `ids` has the
            dtype of the indexed ids (the order of `TwoTowerRetrieval.recommend`).

        Raises:
            ValueError: if the index is empty, `k` is out of range, the query dim
                does not match, queries contain NaN or infinity, `exclude` or
                `allow` does not have one sequence (or None) per query or names
                unknown ids, `where` is malformed (see the conditions above), or,
                without filters, `exclude` leaves a query fewer than `k`
                candidates.

        Examples:
            >>> import numpy as np
            >>> index = two_tower.BruteForceIndex()
            >>> index.index(np.eye(4, dtype="float32"), np.array([10, 20, 30, 40]),
            ...             attributes={"category": np.array([1, 2, 1, 2])})
            >>> query = np.array([[0.1, 0.4, 0.3, 0.2]], "float32")
            >>> index.search(query, k=2, where={"category": 1})[0].tolist()
            [[30, 10]]
            >>> ids, scores = index.search(query, k=3, allow=[[20, 10]])
            >>> ids.tolist(), scores.tolist()[0][2]
            ([[20, 10, -1]], -inf)
        """
        with backend_module().serving_slot(), self._catalogue_lock.reading():
            scores, ids = self._search(
                self._snapshot(), query_embeddings, k, similarity_fn, exclude,
                ignore_unknown_exclusions, allow, where,
            )  # fmt: skip
        return ids, scores

    def _search(
        self,
        catalogue: IndexedCatalogue,  # this call's catalogue, whatever `index` does meanwhile
        query_embeddings: Any,
        k: int,
        similarity_fn: SimilarityFn | None,
        exclude: Sequence[Any] | None,
        ignore_unknown_exclusions: bool,
        allow: Sequence[Any] | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(ops.convert_to_numpy(query_embeddings))
        if queries.dtype.kind not in "iuf":
            raise ValueError(f"Query embeddings must be numeric. Received dtype {queries.dtype}")
        self._check_ready(catalogue, queries, k)
        if not np.all(np.isfinite(queries)):
            raise ValueError(
                "Query embeddings contain NaN or infinite values: a diverged model, or, on "
                "JAX, an id outside a table's range inside a tower, which JAX gathers as a "
                "row of NaN (see the backends guide)."
            )
        num_candidates = len(catalogue.ids)
        mask = _filters.where_mask(catalogue.attributes, where, num_candidates)
        allowed = None
        if allow is not None:
            allowed = _filters.allowed_pairs(
                catalogue, allow, len(queries), ignore_unknown_exclusions, mask
            )
        filtered = mask is not None or allowed is not None
        excluded = None
        if exclude is not None:
            excluded = _candidate_ids.exclusions(
                catalogue,
                exclude,
                len(queries),
                0 if filtered else k,  # filtered rows are padded, not refused
                ignore_unknown_exclusions,
            )
        similarity_fn = similarity_fn or dot_similarities
        searched, subset = catalogue, None
        if filtered and catalogue.host is not None:
            subset = _filters.candidate_subset(mask, allowed)
            if subset is not None and len(subset) * _COMPACT_FRACTION > num_candidates:
                subset = None
        if subset is not None:  # score only the rows some query may return
            if not len(subset):  # nothing to return: all padding
                shape = (len(queries), k)
                padding = _candidate_ids.padding_id(catalogue.ids)
                nothing = np.full(shape, padding, catalogue.ids.dtype)
                return np.full(shape, -np.inf, self.compute_dtype), nothing
            searched = self._subset(catalogue, subset)
            mask = None
            if allowed is not None:
                allowed = (*_filters.within(allowed[:2], subset), allowed[2])
            if excluded is not None:
                excluded = _filters.within(excluded, subset)
        all_scores, all_positions = [], []
        batch_rows, _ = self._batch_rows(searched, k)
        for start in range(0, len(queries), batch_rows):
            stop = start + batch_rows
            batch_excluded = None
            if excluded is not None:
                batch_excluded = _rows_between(excluded, start, stop)
            batch_filters = None
            if filtered:
                batch_filters = _Filters(
                    mask,
                    None if allowed is None else _rows_between(allowed[:2], start, stop),
                    None if allowed is None else allowed[2][start:stop],
                )
            scores, positions = self._top_k(
                searched,
                ops.convert_to_tensor(queries[start:stop], self.compute_dtype),
                k,
                similarity_fn,
                batch_excluded,
                batch_filters,
            )
            all_scores.append(ops.convert_to_numpy(scores))
            all_positions.append(ops.convert_to_numpy(positions))
        if not all_scores:
            return np.zeros((0, k), self.compute_dtype), np.zeros((0, k), catalogue.ids.dtype)
        scores, positions = np.concatenate(all_scores), np.concatenate(all_positions)
        if subset is not None:  # back to catalogue positions (padding is replaced below)
            positions = subset[np.maximum(positions, 0)]
        ids = catalogue.ids[positions]
        if filtered:  # what no candidate filled: -inf, and an id that says so
            ids[np.isneginf(scores)] = _candidate_ids.padding_id(ids)
        return scores, ids

    def _subset(self, catalogue: IndexedCatalogue, positions: np.ndarray) -> IndexedCatalogue:
        """A catalogue of the rows at sorted `positions` only, in their order.

        Ties still break lower position first: the rows keep their order. Its
        chunk width is a power of two (at least `BLOCK`, at most a full chunk),
        so that filters of many sizes share a few compiled steps.
        """
        store = catalogue.host
        assert store is not None
        full = -(-self.chunk_size // BLOCK) * BLOCK
        width = min(full, max(BLOCK, next_power_of_two(len(positions))))
        chunks = []
        for first in range(0, len(positions), width):
            part = positions[first : first + width]
            chunk = _catalogue_store.aligned_zeros(width, store.dim, store.dtype)
            source = part // store.width
            for number in np.unique(source):
                inside = source == number
                chunk[np.flatnonzero(inside)] = store.chunks[number][
                    part[inside] - number * store.width
                ]
            chunks.append(chunk)
        rows = _catalogue_store.ChunkStore(tuple(chunks), len(positions))
        ids = _candidate_ids.checked_ids(None, len(positions))
        return _indexed_catalogue.indexed_catalogue(rows, ids, self.chunk_size)

    def save_assets(self, dir_path: str) -> None:
        with self._catalogue_lock.reading():  # one version, whatever changes meanwhile
            self._write_assets(dir_path)

    def _write_assets(self, dir_path: str) -> None:
        catalogue: IndexedCatalogue | None = self._catalogue
        if catalogue is None:
            return
        path = os.path.join(dir_path, _EMBEDDINGS_FILE)
        if catalogue.host is not None:  # streamed, a chunk at a time
            _catalogue_store.write_npy(path, catalogue.host)
        else:
            np.save(path, _indexed_catalogue.host_embeddings(catalogue), allow_pickle=False)
        np.save(os.path.join(dir_path, _IDS_FILE), catalogue.ids, allow_pickle=False)
        if catalogue.attributes:
            _filters.write_attributes(
                os.path.join(dir_path, _ATTRIBUTES_FILE), catalogue.attributes
            )

    def load_assets(self, dir_path: str) -> None:
        embeddings_path = os.path.join(dir_path, _EMBEDDINGS_FILE)
        if not os.path.exists(embeddings_path):
            return
        attributes = None
        attributes_path = os.path.join(dir_path, _ATTRIBUTES_FILE)
        if os.path.exists(attributes_path):
            attributes = _filters.read_attributes(attributes_path)
        self.index(
            _catalogue_store.npy_blocks(embeddings_path),  # never the whole file at once
            np.load(os.path.join(dir_path, _IDS_FILE), allow_pickle=False),
            attributes=attributes,
        )

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"chunk_size": self.chunk_size, "query_batch_size": self.query_batch_size})
        return config


def _rows_between(
    pairs: tuple[np.ndarray, np.ndarray], start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (query row, position) pairs of queries `start..stop-1`, rows from 0."""
    rows, positions = pairs
    keep = (rows >= start) & (rows < stop)
    return rows[keep] - start, positions[keep]


class _Filters:
    """One query batch's filters, cut per chunk into the compiled step's inputs."""

    def __init__(
        self,
        mask: np.ndarray | None,
        allowed: tuple[np.ndarray, np.ndarray] | None,
        restricted: np.ndarray | None,
    ) -> None:
        self.mask = mask  # [candidates] bool, shared by every query
        self.allowed = allowed  # (rows, positions) of the restricted rows
        self.restricted = restricted  # [batch] bool: rows with an allow-list

    def chunk_inputs(
        self, start: int, columns: int, num_valid: int, rows: int, tiled: bool
    ) -> dict[str, Any]:
        """The step inputs of the chunk at `start`; a `tiled` step takes the allowed
        pairs as bits (`_tiled_top_k.merged_bits`), not here."""
        inputs: dict[str, Any] = {}
        if self.mask is not None:
            allowed = np.zeros(columns, dtype=bool)  # (the padded tail scores -inf anyway)
            allowed[:num_valid] = self.mask[start : start + num_valid]
            inputs["allowed"] = allowed
        if self.allowed is not None and self.restricted is not None:
            restricted = np.zeros(rows, dtype=bool)  # padded query rows: unrestricted
            restricted[: len(self.restricted)] = self.restricted
            inputs["restricted"] = restricted
            pairs = (
                None if tiled else _candidate_ids.excluded_indices(self.allowed, start, num_valid)
            )
            if pairs is not None:
                inputs["allowed_pairs"] = pairs
        return inputs


_EMPTY_INDEX = (
    "The index is empty. Call `index(candidate_embeddings, candidate_ids)` (or "
    "`TwoTowerRetrieval.index_candidates`) first."
)
