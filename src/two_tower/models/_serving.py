"""What `TwoTowerRetrieval` does to serve: embed in compiled batches, index, search.

The model's public methods (`index_candidates`, `recommend`, `similar_items`)
delegate here. Every function is safe to call from many threads at once on one
model: towers run through `two_tower.backends`' `compile_inference`, which reads
the variables without writing them (Keras' own `predict` swaps them in and out on
JAX, so two threads break each other), and the index searches one snapshot of
its catalogue per call.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower._compiled_cache import CompiledCache
from two_tower.backends import backend_module
from two_tower.models import _input_checks
from two_tower.retrieval._candidate_ids import exclusion_lists
from two_tower.retrieval._catalogue_store import is_batches  # shared with the index's store
from two_tower.retrieval.candidate_index import CandidateIndex
from two_tower.retrieval.top_k import next_power_of_two
from two_tower.types import Tensor

_BUILD_LOCK = threading.Lock()  # see `build_eagerly`
_MAX_COMPILED = 8


def function_cache() -> CompiledCache[Callable[[Any], Tensor]]:
    """The cache of compiled tower functions a model keeps (see `_compiled`)."""
    return CompiledCache(max_size=_MAX_COMPILED)


@dataclass(frozen=True)
class TowerFunction:
    """A tower function to run over rows in compiled batches: what the functions
    below need of a model, which builds it (they take this, not the model).

    Attributes:
        key: names `function` in `cache` (one compilation per key).
        function: maps a batch of features to `[batch, dim]` embeddings.
        owner: the layer whose variables `function` reads.
        tower: the tower `function` runs, built eagerly on one row first if it
            is not built yet (variables cannot be created inside a compiled call).
        side: the side whose ids the rows hold, checked before anything runs.
        cache: the model's compiled functions (`function_cache`).
    """

    key: Any
    function: Callable[[Any], Tensor]
    owner: keras.layers.Layer
    tower: keras.layers.Layer
    side: _input_checks.TowerSide
    cache: CompiledCache[Callable[[Any], Tensor]]


def _compiled(job: TowerFunction) -> Callable[[Any], Tensor]:
    """`job.function` compiled for the backend, cached under `job.key`."""
    return job.cache.get(
        job.key,
        lambda: backend_module().compile_inference(job.function, lambda: job.owner.variables),
    )


_SINGULAR = {"queries": "query", "candidates": "candidate", "items": "item"}


def _as_arrays(features: Any, what: str) -> tuple[Any, int]:
    """Features as NumPy arrays with one common row count, which is returned."""
    if features is None or np.ndim(features) == 0 and not isinstance(features, Mapping):
        hint = "" if features is None else f"; for one, wrap it: np.array([{features!r}])"
        raise ValueError(
            f"`{what}` must be an array (or a dict of arrays) with one row per "
            f"{_SINGULAR.get(what, 'row')}. Received {features!r}{hint}."
        )
    if isinstance(features, (list, tuple)):
        features = np.asarray(features)  # a list of ids, not a structure
    features = keras.tree.map_structure(np.asarray, features)
    leaves = keras.tree.flatten(features)
    lengths = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if not leaves or len(lengths) != 1 or None in lengths:
        raise ValueError(
            f"`{what}` must be an array, or a dict of arrays, with one row per "
            f"{_SINGULAR.get(what, 'row')}. Received row counts {sorted(map(str, lengths))}"
        )
    return features, leaves[0].shape[0]


def embed_rows(job: TowerFunction, features: Any, batch_size: int, what: str) -> np.ndarray:
    """`embedded_blocks(...)` as one NumPy array."""
    return np.concatenate(list(embedded_blocks(job, features, batch_size, what)), axis=0)


def embedded_blocks(
    job: TowerFunction, features: Any, batch_size: int, what: str
) -> Iterator[np.ndarray]:
    """Runs `job.function` over `features` in compiled batches; NumPy blocks out.

    A generator: the checks run and the rows are embedded as it is consumed,
    one batch at a time, so `index_candidates` never holds the embeddings twice.

    Args:
        job: the function, its tower, its side and the cache it compiles into.
        features: an array-like or a dict of them, one row per item; or a
            dataset or generator of such batches (e.g. a `tf.data.Dataset`).
        batch_size: rows per call. Smaller last batches are padded to a power of
            two, so that a handful of compilations serve every request size.
        what: the argument's name, e.g. "queries".
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"`batch_size` must be a positive integer. Received: {batch_size!r}")
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer. Received: {batch_size!r}")
    batch_size = int(batch_size)  # a NumPy integer too
    if is_batches(features):
        # A dataset or generator of batches (as `predict` takes): embed batch by batch.
        empty = True
        for batch in features:
            if isinstance(batch, tuple) and len(batch) == 1:
                batch = batch[0]  # Keras' (x,) form
            empty = False
            yield from embedded_blocks(job, batch, batch_size, what)
        if empty:
            raise ValueError(f"`{what}` yielded no batches: expected at least one row.")
        return
    features, num_rows = _as_arrays(features, what)
    if num_rows == 0:
        detail = {
            "candidates": "cannot index an empty catalogue",
            "queries": "expected at least one query",
            "items": "expected at least one item",
        }.get(what, "expected at least one row")
        raise ValueError(f"`{what}` has 0 rows: {detail}.")
    features = _input_checks.check_ids(job.side, features, f"`{what}`")
    build_eagerly(job.tower, job.function, features)
    compiled = _compiled(job)
    for start in range(0, num_rows, batch_size):
        batch = keras.tree.map_structure(lambda a, s=start: a[s : s + batch_size], features)
        rows = min(batch_size, num_rows - start)
        padded = min(next_power_of_two(rows), batch_size)
        if padded > rows:
            extra = padded - rows
            batch = keras.tree.map_structure(
                lambda a, n=extra: np.concatenate([a, np.repeat(a[:1], n, axis=0)]), batch
            )
        yield np.asarray(ops.convert_to_numpy(compiled(batch)))[:rows]


def build_eagerly(
    tower: keras.layers.Layer, function: Callable[[Any], Tensor], features: Any
) -> None:
    """Builds an unbuilt `tower` by running `function` eagerly on the first row.

    Variables cannot be created inside a compiled call (and on TensorFlow, a
    trace that fails after creating them leaves them broken), so the first call
    runs eagerly, once, even when several threads arrive at the same time.

    Args:
        tower: the tower to build.
        function: runs the tower on features (e.g. `model.embed_queries`).
        features: NumPy arrays, or a dict of them, with at least one row.
    """
    if tower.built:
        return
    with _BUILD_LOCK:
        if not tower.built:
            function(keras.tree.map_structure(lambda a: np.asarray(a)[:1], features))


def check_flags(**flags: Any) -> None:
    """Each flag is a real bool: a string such as "no" would be truthy."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")


def require_index(index: CandidateIndex) -> None:
    if index.num_candidates == 0:
        raise ValueError(
            "No candidates are indexed. Call `index_candidates(candidates, candidate_ids)` first."
        )


def similar_items(
    index: CandidateIndex,
    job: TowerFunction,
    similarity_fn: Callable[[Tensor, Tensor], Tensor] | None,
    items: Any,
    k: int,
    item_ids: Any,
    exclude_self: bool,
    exclude: Any,
    ignore_unknown_exclusions: bool,
    batch_size: int,
    filters: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, scores)` of `TwoTowerRetrieval.similar_items` (see there): `items`
    embedded by `job`, searched in `index` with `similarity_fn`."""
    require_index(index)
    if isinstance(items, (list, tuple)):
        items = np.asarray(items)
    # Integer-valued float ids become int64 here, so they also name the items' ids.
    items = _input_checks.check_ids(job.side, items, "`items`")
    embeddings = embed_rows(job, items, batch_size, "items")
    num_items = len(embeddings)
    entries = (
        [None] * num_items
        if exclude is None
        else exclusion_lists(exclude, num_items, "item", "items")
    )
    rows: list[list[Any]] = [[] if entry is None else list(entry) for entry in entries]
    if exclude_self:
        if item_ids is None:
            ids = np.asarray(items) if not isinstance(items, Mapping) else None
            if ids is None or ids.ndim != 1:
                raise ValueError(
                    "`exclude_self` needs each item's id: pass `item_ids` when "
                    "`items` is not a 1D array of ids (or set exclude_self=False)."
                )
        else:
            ids = np.asarray(item_ids).reshape(-1)
            if len(ids) != num_items:
                raise ValueError(
                    f"`item_ids` must have one id per item: {num_items} items, "
                    f"received {len(ids)} ids."
                )
    # An index that changes in place (it has `reading()`) is held still from the
    # lookup of the items' own ids to the search: none is removed in between.
    holding = getattr(index, "reading", contextlib.nullcontext)
    with holding():
        if exclude_self:
            assert ids is not None
            known = index.positions_of(ids, ignore_unknown=True) >= 0
            for row, item_id, is_known in zip(rows, ids.tolist(), known, strict=True):
                if is_known:
                    row.append(item_id)
        return index.search(
            embeddings,
            k=k,
            similarity_fn=similarity_fn,
            exclude=rows,
            # Only indexed ids of the items themselves were added: unknown ids are the caller's.
            ignore_unknown_exclusions=ignore_unknown_exclusions,
            **(filters or {}),
        )


def filter_options(index: CandidateIndex, method: str, **options: Any) -> dict[str, Any]:
    """The filter arguments that are set, for `index.<method>`; refused if it lacks them.

    `BruteForceIndex` and `FaissIndex` filter (`index(attributes=...)`,
    `search(allow=..., where=...)`); an index without those parameters is told apart here, with an
    error that names it, rather than by a `TypeError` from deep inside.
    """
    given = {name: value for name, value in options.items() if value is not None}
    if not given:
        return {}
    parameters = inspect.signature(getattr(index, method)).parameters
    missing = [name for name in given if name not in parameters]
    if missing:
        raise ValueError(
            f"{type(index).__name__}.{method} does not take {missing}: filtered search "
            "(`allow`, `where` and indexed `attributes`) needs an index that filters, such "
            "as two_tower.BruteForceIndex or two_tower.FaissIndex, as the model's "
            "`candidate_index`."
        )
    return given


def input_spec(inputs: Any) -> Any:
    """Shape and dtype of each input, batch dim dropped, as JSON-friendly strings."""

    def leaf(tensor: Any) -> str:
        dims = ",".join("None" if d is None else str(int(d)) for d in tensor.shape[1:])
        return f"{keras.backend.standardize_dtype(tensor.dtype)}|{dims}"

    return keras.tree.map_structure(leaf, inputs)


def symbolic_inputs(spec: Any) -> Any:
    """Symbolic inputs of an `input_spec`, to build the towers on load."""

    def leaf(text: str) -> Any:
        dtype, dims = text.split("|")
        shape = tuple(None if d == "None" else int(d) for d in dims.split(",") if d)
        return keras.KerasTensor((None, *shape), dtype=dtype)

    return keras.tree.map_structure(leaf, spec)
