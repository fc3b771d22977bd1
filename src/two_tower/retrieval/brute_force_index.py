"""Exact top-k retrieval over an indexed candidate catalogue."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.distribution import _sharding
from two_tower.distribution._sharding import ShardedCatalogue
from two_tower.retrieval import _catalogue_store
from two_tower.retrieval._catalogue_store import ChunkStore
from two_tower.types import SimilarityFn, Tensor

_EMBEDDINGS_FILE = "candidate_embeddings.npy"
_IDS_FILE = "candidate_ids.npy"


_MAX_CHUNK = 2**24  # positions inside a chunk are exact in float32 keys
BLOCK = 32  # block width of `_blocked_top_k`


def _dot_similarities(query_embeddings: Tensor, candidate_embeddings: Tensor) -> Tensor:
    return ops.matmul(query_embeddings, ops.transpose(candidate_embeddings))


def _stable_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of each row, best first, equal scores in column order.

    `keras.ops.top_k` puts the lower index first on JAX and TensorFlow (both
    document it), but `torch.topk` promises nothing about ties: neither which
    tied columns make the cut nor their order. On torch we therefore pick the
    cut explicitly: every column above the k-th value, then the leftmost tied
    columns until there are k, and order them with a stable sort.

    XLA's `top_k` (JAX) orders `-0.0` below `0.0`; everywhere else they are
    equal. When a zero reaches the top k, the rows are redone with `-0.0`
    folded into `0.0` (`keras.ops.cond`, so only then). If no zero is among the
    top k values, the sign of zeros cannot change the result.

    Args:
        scores: `[rows, columns]` float tensor with no NaN.
        k: `1 <= k <= columns`.

    Returns:
        `(values, columns)`, both `[rows, k]`; columns are int32.
    """
    return _with_zeros_folded(_top_k, scores, k)


def _blocked_top_k(scores: Tensor, k: int, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """`_stable_top_k` for long rows: top k of the block maxima first.

    The columns are cut into blocks of `block`; the true top k lie in at most k
    blocks, all among the k blocks with the highest maxima (ties: lower block
    first, whose columns are all lower). So one pass for the maxima, a top k
    over `columns / block` of them, and a top k over the `k × block` gathered
    scores give the exact result, ties included, much faster than a top k over
    every column.

    Args:
        scores: `[rows, columns]`, `columns` a multiple of `block`; no NaN.
        k: `1 <= k <= columns`.
        block: block width.
    """
    return _with_zeros_folded(lambda x, kk: _blocked(x, kk, block), scores, k)


def _with_zeros_folded(
    top_k: Callable[[Tensor, int], tuple[Tensor, Tensor]], scores: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    values, columns = top_k(scores, k)
    if keras.backend.backend() == "torch":
        return values, columns  # torch compares -0.0 and 0.0 as equal

    def folded() -> tuple[Tensor, Tensor]:
        return top_k(ops.where(ops.equal(scores, 0.0), ops.zeros_like(scores), scores), k)

    return ops.cond(ops.any(ops.equal(values, 0.0)), folded, lambda: (values, columns))


def _top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Ties to the lower column; zeros compared as the backend does."""
    if keras.backend.backend() == "torch":
        return _explicit_top_k(scores, k)
    values, columns = ops.top_k(scores, k)
    return values, ops.cast(columns, "int32")


def _blocked(scores: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
    rows, width = ops.shape(scores)[0], int(scores.shape[1])
    num_blocks = width // block
    maxima = ops.max(ops.reshape(scores, (rows, num_blocks, block)), axis=2)
    _, best_blocks = _top_k(maxima, min(k, num_blocks))
    # In column order, so that ties in the final top k go to the lower column.
    best_blocks = ops.sort(best_blocks, axis=1)
    offsets = ops.arange(block, dtype="int32")
    columns = ops.expand_dims(best_blocks * block, 2) + ops.reshape(offsets, (1, 1, block))
    columns = ops.reshape(columns, (rows, -1))
    values, picked = _top_k(ops.take_along_axis(scores, columns, axis=1), k)
    return values, ops.take_along_axis(columns, picked, axis=1)


def _explicit_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`_stable_top_k` for torch, whose `topk` leaves ties unspecified."""
    values, _ = ops.top_k(scores, k)
    threshold = values[:, k - 1 : k]
    above = ops.greater(scores, threshold)
    tied = ops.equal(scores, threshold)
    needed = k - ops.sum(ops.cast(above, "int32"), axis=1, keepdims=True)
    tie_rank = ops.cumsum(ops.cast(tied, "int32"), axis=1)
    chosen = ops.logical_or(above, ops.logical_and(tied, ops.less_equal(tie_rank, needed)))
    # Exactly k columns are chosen; distinct keys make this top_k tie-free.
    keys = -ops.arange(ops.shape(scores)[1], dtype="float32")
    _, picked = ops.top_k(ops.where(chosen, keys, float("-inf")), k)
    picked_scores = ops.take_along_axis(scores, picked, axis=1)
    order = ops.argsort(-picked_scores, axis=1)  # Keras' torch argsort is stable
    return (
        ops.take_along_axis(picked_scores, order, axis=1),
        ops.cast(ops.take_along_axis(picked, order, axis=1), "int32"),
    )


def _normalise_ids(candidate_ids: Any) -> np.ndarray:
    """Ids as an integer or string NumPy array; mixed or other kinds raise."""
    if not isinstance(candidate_ids, np.ndarray) and hasattr(candidate_ids, "__next__"):
        raise ValueError(
            "`candidate_ids` must be an array-like of ids (a list or an array), not an "
            f"iterator. Received: {type(candidate_ids).__name__}. Pass list(ids), or give "
            "the catalogue as (embeddings, ids) pairs."
        )
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


def _check_catalogue(
    candidate_embeddings: Any, candidate_ids: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validates a catalogue; returns (embeddings, ids, argsort of the ids).

    Raises:
        ValueError: on an empty catalogue, a non-2D embedding matrix, non-finite
            embeddings, ids whose length differs from the embeddings, or
            duplicate ids.
    """
    # The same checks as a block of `BruteForceIndex.index` (no copy of an array).
    embeddings = _catalogue_store.checked_block(candidate_embeddings, 0, None)
    if embeddings.shape[0] == 0:
        raise ValueError("Cannot index an empty catalogue: 0 candidate embeddings.")
    ids, order, _ = _checked_ids(candidate_ids, embeddings.shape[0])
    return embeddings, ids, order


def _checked_ids(candidate_ids: Any, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(ids, argsort of the ids, sorted ids)`, the ids our own copy.

    Positions when None: then all three are one `arange` (8 bytes a candidate,
    not 24). Otherwise unique, one per row.
    """
    if candidate_ids is None:
        ids = np.arange(num_rows, dtype="int64")
        return ids, ids, ids
    ids = np.array(_normalise_ids(candidate_ids), copy=True)
    if ids.ndim != 1 or len(ids) != num_rows:
        raise ValueError(
            "`candidate_ids` must be 1D with one id per embedding row. "
            f"Received ids of shape {ids.shape} for {num_rows} embeddings."
        )
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(repeated):
        raise ValueError(
            "`candidate_ids` must be unique. Received duplicates: "
            f"{np.unique(repeated)[:5].tolist()}"
        )
    return ids, order, sorted_ids


class _Catalogue(NamedTuple):
    """One indexed catalogue, replaced as a whole so that readers see one version.

    On one device `host` holds the rows in zero-padded chunks (the one copy of
    the catalogue, see `two_tower.retrieval._catalogue_store`) and `chunks` the backend
    tensors of those chunks, sharing their memory on CPU. Under a
    `keras.distribution` distribution both are None: `sharded` holds the chunks,
    each spread by rows over every device of the mesh (see
    `_sharding.shard_catalogue`).
    """

    host: ChunkStore | None
    chunks: tuple[Tensor, ...] | None
    ids: np.ndarray
    order: np.ndarray  # argsort of `ids`
    sorted_ids: np.ndarray
    dim: int
    sharded: ShardedCatalogue | None = None


@keras.saving.register_keras_serializable(package="two_tower")
class BruteForceIndex(keras.layers.Layer):
    """Exact top-k search over candidate embeddings, scored in chunks.

    It scores `query_batch_size` queries against `chunk_size` candidates at a
    time and merges each chunk's top k into a running top k, so memory grows
    with `query_batch_size × chunk_size`, not with the catalogue or the number
    of queries.

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
    thread-safe), and each call works on one snapshot of the catalogue, so a
    concurrent `index` makes a call see either the old or the new catalogue,
    never a mix.

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
        chunk_size: candidates scored at once, at most 2**24. The default,
            2**18, searched as fast as 2**20 (16.4 s against 16.6 s for 1,024
            queries over 3M candidates on JAX) with a quarter of the scores.
        query_batch_size: queries scored at once against a full chunk; against
            a smaller catalogue, proportionally more. Memory for scores is
            about `query_batch_size × chunk_size × 4` bytes (128 MiB by
            default, whatever the catalogue size; XLA's CPU GEMM holds it
            twice, so 256 MiB measured).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: a `chunk_size` or `query_batch_size` that is not a positive
            integer (Python or NumPy), or a `chunk_size` above 2**24.

    Call arguments:
        - `query_embeddings`: `[queries, dim]` tensor.
        - `k`: how many candidates to return per query.

    Call returns:
        From `call`: a `(scores, positions)` tuple of `[queries, k]` tensors, best
        first; positions index the indexed catalogue. `search` maps positions to
        candidate ids and takes exclusions.

    Examples:
        >>> import numpy as np
        >>> index = two_tower.BruteForceIndex()
        >>> index.index(np.eye(3, dtype="float32"), np.array([10, 20, 30]))
        >>> scores, ids = index.search(np.array([[0.0, 1.0, 0.0]], "float32"), k=2)
        >>> ids.tolist()
        [[20, 10]]
        >>> index.search(np.array([[0.0, 1.0, 0.0]], "float32"), k=2, exclude=[[20]])[1].tolist()
        [[10, 30]]
    """

    def __init__(self, chunk_size: int = 2**18, query_batch_size: int = 128, **kwargs: Any) -> None:
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
        object.__setattr__(self, "_steps", {})
        object.__setattr__(self, "_steps_lock", threading.Lock())
        self.built = True

    @property
    def num_candidates(self) -> int:
        """How many candidates are indexed (0 before `index` is called)."""
        catalogue = self._catalogue
        return 0 if catalogue is None else len(catalogue.ids)

    @property
    def candidate_ids(self) -> np.ndarray | None:
        """The indexed candidate ids as a NumPy array, or None."""
        catalogue = self._catalogue
        return None if catalogue is None else catalogue.ids

    def embeddings(self) -> np.ndarray | None:
        """The indexed `[candidates, dim]` embeddings as one NumPy array, or None.

        A copy of the whole catalogue (gathered from its chunks, or from the
        devices of a sharded one). A method, not a property: Keras' saving and
        loading read every public attribute of a layer, and a property that
        copied the catalogue made a `.keras` save hold it 4 times (measured at
        4M rows).
        """
        catalogue = self._catalogue
        return None if catalogue is None else _host_embeddings(catalogue)

    def _snapshot(self) -> _Catalogue:
        catalogue: _Catalogue | None = self._catalogue
        if catalogue is None:
            raise ValueError(_EMPTY_INDEX)
        return catalogue

    def index(self, candidate_embeddings: Any, candidate_ids: Any = None) -> None:
        """Replaces the catalogue.

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

        Raises:
            ValueError: on an empty catalogue, a non-2D embedding matrix (or
                block), blocks of different dims, non-finite embeddings, ids
                whose length differs from the embeddings, ids given twice (in
                pairs and as `candidate_ids`), ids that are not all integers or
                all strings (within and across pairs), ids given as an iterator,
                one `(embeddings, ids)` pair instead of a list of pairs, or
                duplicate ids. The previous catalogue is kept when it raises.
        """
        blocks, rows = _catalogue_store.blocks_of(candidate_embeddings)
        if rows is not None and candidate_ids is not None:
            _checked_ids(candidate_ids, rows)  # before copying anything
        dtype = keras.backend.standardize_dtype(self.compute_dtype)
        store, paired_ids = _catalogue_store.assemble(blocks, self.chunk_size, BLOCK, dtype, rows)
        if paired_ids is not None and candidate_ids is not None:
            raise ValueError(
                "The catalogue blocks are (embeddings, ids) pairs, so `candidate_ids` must be None."
            )
        ids, order, sorted_ids = _checked_ids(
            paired_ids if paired_ids is not None else candidate_ids, store.num_rows
        )
        sharded = _sharding.shard_catalogue(store, self.chunk_size, BLOCK)
        catalogue = _Catalogue(
            host=None if sharded is not None else store,
            chunks=None if sharded is not None else tuple(map(_chunk_tensor, store.chunks)),
            ids=ids,
            order=order,
            # Sorted once here: `positions_of` runs once per query with exclusions.
            sorted_ids=sorted_ids,
            dim=store.dim,
            sharded=sharded,
        )
        object.__setattr__(self, "_catalogue", catalogue)  # one atomic swap

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
        return _positions_of(self._snapshot(), ids, ignore_unknown)

    def _check_ready(self, catalogue: _Catalogue, query_embeddings: Any, k: int) -> None:
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
        catalogue = self._snapshot()
        query_embeddings = ops.convert_to_tensor(query_embeddings, self.compute_dtype)
        self._check_ready(catalogue, query_embeddings, k)
        return self._top_k(catalogue, query_embeddings, k, similarity_fn or _dot_similarities, None)

    def _top_k(
        self,
        catalogue: _Catalogue,
        queries: Tensor,
        k: int,
        similarity_fn: SimilarityFn,
        excluded: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[Tensor, Tensor]:
        """Chunked running top k; `excluded` = (query rows, positions) to skip.

        Each chunk is scored and merged by one `_TopKStep` call, compiled by the
        backend (`jax.jit`, `tf.function`; eager on torch, see
        `two_tower.backends`), so the `[queries, chunk]` scores never leave the
        fused step. Shapes are padded to powers of two (queries) and to the chunk
        size (the last chunk), so a handful of compilations serve every call.
        """
        num_candidates = len(catalogue.ids)
        num_queries = int(queries.shape[0])
        shards, width = self._layout(catalogue)
        columns = shards * width  # scored per step, `width` on each device
        mesh = None if catalogue.sharded is None else catalogue.sharded.mesh
        rows = min(_next_power_of_two(num_queries), self._batch_rows(catalogue))
        if rows != num_queries:
            padding = ops.zeros((rows - num_queries, queries.shape[1]), queries.dtype)
            queries = ops.concatenate([queries, padding], axis=0)
        step = self._step(similarity_fn, k, columns, mesh)
        best_scores = ops.full((rows, k), float("-inf"), self.compute_dtype)
        best_positions = ops.full((rows, k), -1, "int32")
        for start, chunk in _chunks(catalogue, columns):
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
            indices = _excluded_indices(excluded, start, num_valid)
            if indices is not None:
                inputs["excluded"] = indices
            outputs = step(inputs)
            best_scores, best_positions = outputs["scores"], outputs["positions"]
        return best_scores[:num_queries], best_positions[:num_queries]

    def _layout(self, catalogue: _Catalogue) -> tuple[int, int]:
        """(devices, candidates per device per step); the tail scores -inf."""
        if catalogue.sharded is not None:
            return catalogue.sharded.shards, catalogue.sharded.width
        assert catalogue.host is not None
        return 1, catalogue.host.width

    def _batch_rows(self, catalogue: _Catalogue) -> int:
        """Queries per step: the score budget of a full chunk, spent on rows."""
        budget = self.query_batch_size * self.chunk_size
        return max(self.query_batch_size, budget // self._layout(catalogue)[1])

    def _step(self, similarity_fn: SimilarityFn, k: int, chunk_size: int, mesh: Any) -> _TopKStep:
        """A cached compiled step for this scoring function, k, chunk and mesh."""
        owner = getattr(similarity_fn, "__self__", None)
        function = getattr(similarity_fn, "__func__", similarity_fn)
        key = (id(owner), function, k, chunk_size, mesh, self.compute_dtype)
        steps: dict[Any, _TopKStep] = self._steps
        with self._steps_lock:  # concurrent searches share the cache
            step = steps.get(key)
            if step is None:
                if len(steps) >= 8:
                    steps.pop(next(iter(steps)))
                step = steps[key] = _TopKStep(similarity_fn, k, chunk_size, owner, mesh)
        return step

    def search(
        self,
        query_embeddings: Any,
        k: int = 10,
        similarity_fn: SimilarityFn | None = None,
        *,
        exclude: Sequence[Any] | None = None,
        ignore_unknown_exclusions: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k candidate ids for each query, best first.

        Args:
            query_embeddings: `[queries, dim]` array-like.
            k: number of results per query; `1 <= k <= num_candidates`.
            similarity_fn: `f(query_embeddings, candidate_embeddings) ->
                [queries, candidates]` scores; defaults to the dot product.
            exclude: one sequence of candidate ids (or None) per query, left out
                of that query's results, e.g. items already seen: `[[3, 5],
                None]`. A flat list of ids (`[3, 5]`) raises: wrap it per query.
                The results are the exact top k among the remaining candidates.
            ignore_unknown_exclusions: skip excluded ids that are not in the
                catalogue (e.g. retired items) instead of raising.

        Returns:
            `(scores, ids)`: NumPy arrays of shape `[queries, k]`; `ids` has the
            dtype of the indexed ids.

        Raises:
            ValueError: if the index is empty, `k` is out of range, the query dim
                does not match, queries contain NaN or infinity, `exclude` does
                not have one sequence (or None) per query, names unknown ids, or
                leaves a query fewer than `k` candidates.
        """
        with backend_module().serving_slot():
            return self._search(
                self._snapshot(), query_embeddings, k, similarity_fn, exclude,
                ignore_unknown_exclusions,
            )  # fmt: skip

    def _search(
        self,
        catalogue: _Catalogue,  # this call's catalogue, whatever `index` does meanwhile
        query_embeddings: Any,
        k: int,
        similarity_fn: SimilarityFn | None,
        exclude: Sequence[Any] | None,
        ignore_unknown_exclusions: bool,
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
        excluded = None
        if exclude is not None:
            excluded = _exclusions(catalogue, exclude, len(queries), k, ignore_unknown_exclusions)
        similarity_fn = similarity_fn or _dot_similarities
        all_scores, all_positions = [], []
        batch_rows = self._batch_rows(catalogue)
        for start in range(0, len(queries), batch_rows):
            stop = start + batch_rows
            batch_excluded = None
            if excluded is not None:
                rows, positions = excluded
                keep = (rows >= start) & (rows < stop)
                batch_excluded = (rows[keep] - start, positions[keep])
            scores, positions = self._top_k(
                catalogue,
                ops.convert_to_tensor(queries[start:stop], self.compute_dtype),
                k,
                similarity_fn,
                batch_excluded,
            )
            all_scores.append(ops.convert_to_numpy(scores))
            all_positions.append(ops.convert_to_numpy(positions))
        if not all_scores:
            return np.zeros((0, k), self.compute_dtype), np.zeros((0, k), catalogue.ids.dtype)
        return np.concatenate(all_scores), catalogue.ids[np.concatenate(all_positions)]

    def save_assets(self, dir_path: str) -> None:
        catalogue: _Catalogue | None = self._catalogue
        if catalogue is None:
            return
        path = os.path.join(dir_path, _EMBEDDINGS_FILE)
        if catalogue.host is not None:  # streamed, a chunk at a time
            _catalogue_store.write_npy(path, catalogue.host)
        else:
            np.save(path, _host_embeddings(catalogue), allow_pickle=False)
        np.save(os.path.join(dir_path, _IDS_FILE), catalogue.ids, allow_pickle=False)

    def load_assets(self, dir_path: str) -> None:
        embeddings_path = os.path.join(dir_path, _EMBEDDINGS_FILE)
        if not os.path.exists(embeddings_path):
            return
        self.index(
            _catalogue_store.npy_blocks(embeddings_path),  # never the whole file at once
            np.load(os.path.join(dir_path, _IDS_FILE), allow_pickle=False),
        )

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"chunk_size": self.chunk_size, "query_batch_size": self.query_batch_size})
        return config


_EMPTY_INDEX = (
    "The index is empty. Call `index(candidate_embeddings, candidate_ids)` (or "
    "`TwoTowerRetrieval.index_candidates`) first."
)


def _chunks(catalogue: _Catalogue, columns: int) -> Iterator[tuple[int, Tensor]]:
    """(first position, `columns` candidates) per step, the last padded with zeros."""
    num_candidates = len(catalogue.ids)
    # Already cut (and padded with zeros, or spread over the devices) by `index`.
    chunks = catalogue.chunks if catalogue.sharded is None else catalogue.sharded.chunks
    assert chunks is not None
    yield from zip(range(0, num_candidates, columns), chunks, strict=True)


def _chunk_tensor(chunk: np.ndarray) -> Tensor:
    """A backend tensor of one aligned chunk, sharing its memory where it can."""
    if chunk.dtype.name in ("float16", "float32", "float64"):
        return backend_module().host_tensor(chunk)
    return ops.convert_to_tensor(chunk)  # e.g. bfloat16, which DLPack may not carry


def _host_embeddings(catalogue: _Catalogue) -> np.ndarray:
    """The `[candidates, dim]` catalogue as one NumPy array."""
    if catalogue.host is not None:
        stored = catalogue.host[0 : catalogue.host.num_rows]
        # One chunk gives a view of the store, which the backend reads in place.
        return stored.copy() if len(catalogue.host.chunks) == 1 else stored
    assert catalogue.sharded is not None
    rows = [np.asarray(ops.convert_to_numpy(chunk)) for chunk in catalogue.sharded.chunks]
    return np.concatenate([chunk.reshape(-1, catalogue.dim) for chunk in rows])[
        : len(catalogue.ids)
    ]


def _per_device_top_k(scores: Tensor, k: int, mesh: Any) -> tuple[Tensor, Tensor]:
    """`_blocked_top_k` of each device's `columns / devices` scores, side by side.

    The columns of `scores` are one equal group per device of `mesh` (the
    chunk's rows are spread that way). Each device ranks its own group
    (`map_devices`) and only the `[rows, k]` results meet: `[rows, devices × k]`,
    group after group, each in (score, column) order, with columns of the
    whole chunk. Without a mesh this is plain `_blocked_top_k`.
    """
    if mesh is None:
        return _blocked_top_k(scores, k)
    shards = math.prod(mesh.shape)
    rows, width = ops.shape(scores)[0], int(scores.shape[1]) // shards
    grouped = ops.transpose(ops.reshape(scores, (rows, shards, width)), (1, 0, 2))
    grouped = ops.reshape(grouped, (shards * rows, width))
    values, columns = backend_module().map_devices(
        lambda own: _blocked_top_k(own, k), grouped, mesh
    )
    offsets = ops.reshape(ops.arange(shards, dtype="int32") * width, (shards, 1, 1))
    columns = ops.reshape(columns, (shards, rows, k)) + offsets

    def side_by_side(x: Tensor) -> Tensor:
        x = ops.transpose(ops.reshape(x, (shards, rows, k)), (1, 0, 2))
        return ops.reshape(x, (rows, shards * k))

    return side_by_side(values), side_by_side(columns)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _excluded_indices(
    excluded: tuple[np.ndarray, np.ndarray] | None, start: int, size: int
) -> np.ndarray | None:
    """`[P, 2]` (row, column) indices of one chunk's excluded scores, or None.

    P is padded to a power of two by repeating an index (setting -inf twice is
    harmless), so that the compiled step sees a handful of shapes.
    """
    if excluded is None:
        return None
    rows, positions = excluded
    inside = (positions >= start) & (positions < start + size)
    if not np.any(inside):
        return None
    indices = np.stack([rows[inside], positions[inside] - start], axis=1).astype("int32")
    padded = _next_power_of_two(len(indices))
    return np.concatenate([indices, np.repeat(indices[:1], padded - len(indices), axis=0)])


def _exclusion_lists(
    exclude: Any, num_rows: int, what: str = "query", plural: str = "queries"
) -> list[np.ndarray | None]:
    """`exclude` as one 1D id array (or None) per row; a flat list of ids raises.

    `exclude=[5, 7]` for two queries could mean "leave 5 and 7 out of both" or
    "5 from the first, 7 from the second", and once meant the second silently.
    So every entry must itself be a sequence of ids, or None: `[[5], [7]]`, or
    `[[5, 7], [5, 7]]`.

    Raises:
        ValueError: if `exclude` is not a sequence with one entry per row, or an
            entry is a single id instead of a sequence of ids.
    """
    if isinstance(exclude, (str, bytes, Mapping)) or not hasattr(exclude, "__len__"):
        raise ValueError(
            f"`exclude` must hold one sequence of ids (or None) per {what}. "
            f"Received: {type(exclude).__name__}"
        )
    if len(exclude) != num_rows:
        raise ValueError(
            f"`exclude` must have one entry per {what}: {num_rows} {plural}, "
            f"received {len(exclude)} entries."
        )
    entries: list[np.ndarray | None] = []
    for row, ids in enumerate(exclude):
        if ids is None:
            entries.append(None)
            continue
        if isinstance(ids, (set, frozenset)):
            ids = sorted(ids)  # a set of ids is a fine sequence; NumPy sees it as one object
        if isinstance(ids, (str, bytes)) or np.ndim(ids) == 0:
            raise ValueError(
                f"`exclude[{row}]` is a single id ({ids!r}), but each entry of `exclude` "
                f"must be a sequence of ids (or None) for that {what}: e.g. "
                f"exclude=[[{ids!r}], ...], one list per {what}."
            )
        entries.append(np.asarray(ids).reshape(-1))
    return entries


def _positions_of(
    catalogue: _Catalogue,
    ids: Any,
    ignore_unknown: bool,
    flag: str = "ignore_unknown",
    what: str = "ids",
) -> np.ndarray:
    """Catalogue positions of `ids`; -1 for unknown ids when `ignore_unknown`.

    `flag` and `what` name the caller's own argument and input in the error
    (`positions_of(ignore_unknown=...)`, `search(ignore_unknown_exclusions=...)`).
    """
    values = np.asarray(ids).reshape(-1)
    if values.dtype.kind == "b":
        raise ValueError(
            "Candidate ids must be integers or strings, not booleans (True would name id "
            f"1). Received {values[:5].tolist()}"
        )
    if values.dtype == object:
        values = _normalise_ids(values) if len(values) else values.astype("int64")
    indexed = catalogue.ids
    if len(values) and (values.dtype.kind == "U") != (indexed.dtype.kind == "U"):
        raise ValueError(
            f"Ids of dtype {values.dtype} cannot name candidates indexed with ids of "
            f"dtype {indexed.dtype}."
        )
    if len(values) == 0:
        return np.zeros(0, dtype="int64")
    sorted_ids = catalogue.sorted_ids
    slots = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    found = sorted_ids[slots] == values
    if not ignore_unknown and not np.all(found):
        unknown = np.unique(values[~found])[:5].tolist()
        raise ValueError(
            f"{int(np.sum(~found))} {what} are not in the indexed catalogue, e.g. "
            f"{unknown}. Pass {flag}=True to skip them."
        )
    return np.where(found, catalogue.order[slots], -1).astype("int64")


def _exclusions(
    catalogue: _Catalogue, exclude: Any, num_queries: int, k: int, ignore_unknown: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, positions) of the excluded candidates, deduplicated."""
    num_candidates = len(catalogue.ids)
    rows, positions = [], []
    for row, ids in enumerate(_exclusion_lists(exclude, num_queries)):
        if ids is None:
            continue
        found = _positions_of(
            catalogue, ids, ignore_unknown, "ignore_unknown_exclusions", "excluded id(s)"
        )
        found = np.unique(found[found >= 0])
        if num_candidates - len(found) < k:
            raise ValueError(
                f"Query {row} excludes {len(found)} of {num_candidates} "
                f"candidates, which leaves fewer than k={k}."
            )
        rows.append(np.full(len(found), row, dtype="int64"))
        positions.append(found)
    if not rows:
        return np.zeros(0, "int64"), np.zeros(0, "int64")
    return np.concatenate(rows), np.concatenate(positions)


class _TopKStep:
    """Scores one chunk and merges its top k into the running top k.

    Compiled once per scoring function, k and chunk width with the backend's
    compiler (`two_tower.backends`). `owner` is the layer whose method
    `similarity_fn` is, if any: its variables (e.g. a learned temperature) are
    read at every call rather than frozen into the step at trace time.
    """

    def __init__(
        self,
        similarity_fn: SimilarityFn,
        k: int,
        chunk_size: int,
        owner: Any = None,
        mesh: Any = None,
    ) -> None:
        self.k = k
        self.chunk_size = chunk_size  # candidates per call, over all devices
        self.mesh = mesh  # the DeviceMesh a sharded catalogue is spread over
        self.shards = 1 if mesh is None else math.prod(mesh.shape)
        self.similarity_fn = similarity_fn
        if isinstance(owner, keras.layers.Layer):
            variables: Callable[[], Sequence[keras.Variable]] = lambda: owner.variables  # noqa: E731
        else:
            variables = list
        self._compiled = backend_module().compile_inference(self.call, variables)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = self._compiled(inputs)
        return outputs

    def call(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        chunk = inputs["chunk"]  # [chunk_size, dim], or [*mesh shape, width, dim]
        if len(chunk.shape) > 2:  # sharded (JAX): static shapes
            chunk = ops.reshape(chunk, (self.chunk_size, chunk.shape[-1]))
        scores = self.similarity_fn(inputs["queries"], chunk)
        if "num_valid" in inputs:  # the last chunk, padded with zero rows
            # The chunk width is static (TensorFlow may relax traced shapes).
            columns = ops.arange(self.chunk_size, dtype="int32")
            valid = ops.expand_dims(ops.less(columns, inputs["num_valid"][0]), 0)
            scores = ops.where(valid, scores, float("-inf"))
        if "excluded" in inputs:
            indices = inputs["excluded"]
            minus_inf = ops.full_like(indices[:, 0], float("-inf"), dtype=scores.dtype)
            scores = ops.scatter_update(scores, indices, minus_inf)
        width = self.chunk_size // self.shards
        scores, columns = _per_device_top_k(scores, min(self.k, width), self.mesh)
        # Every running position is lower than this chunk's, each device's
        # positions lower than the next device's, and every part is in (score,
        # position) order, so among equal scores the lower merged column is the
        # lower position. Placeholders (-inf, -1) lose to any real candidate.
        merged_scores = ops.concatenate([inputs["best_scores"], scores], axis=1)
        merged_positions = ops.concatenate(
            [inputs["best_positions"], columns + inputs["start"][0]], axis=1
        )
        best_scores, order = _stable_top_k(merged_scores, self.k)
        best_positions = ops.take_along_axis(merged_positions, order, axis=1)
        return {"scores": best_scores, "positions": best_positions}
