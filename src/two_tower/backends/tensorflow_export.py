"""TensorFlow graphs of an export: the SavedModel's serving signature, and its core for ONNX.

Runs only where Keras runs on TensorFlow: in the process `TwoTowerRetrieval.export`
starts (on JAX and torch) or in the caller's own process (on TensorFlow). The
query tower is traced as Keras runs it on TensorFlow, so the artefact is the same
whichever backend trained the model.

The search (`_search`) is exact and breaks ties as `BruteForceIndex` does, by
catalogue position: `tf.math.top_k` and ONNX's `TopK` both put the lower index
first among equal values, per chunk and when the chunks' bests are merged (in
chunk order). Both compare -0.0 and 0.0 as equal, as `recommend` does (XLA's
`top_k` would not; the SavedModel is not XLA-compiled). Exclusions are applied
after a top `k + exclusions`, which holds the exact top `k` of the remaining
candidates (each excluded id removes at most one of them), so no `[queries,
catalogue]` mask is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from two_tower.export._plan import (
    EXCLUDE_INPUT,
    IDS_OUTPUT,
    K_INPUT,
    SCORES_OUTPUT,
    ExportPlan,
    QueryInput,
)

ONNX_OPSET = 18  # the newest tf2onnx 1.17 writes
# What may go inline in a graph (a SavedModel's id lookups; an ONNX file's query-tower
# weights and id lookups): protobuf's 2 GB, less room for the rest of the graph.
INLINE_BYTES = 2**31 - 2**26


def _dtype(name: str) -> tf.DType:
    return tf.string if name == "string" else tf.as_dtype(name)


def _spec(query_input: QueryInput, raw: bool) -> tf.TensorSpec:
    dtype = query_input.raw_dtype if raw else query_input.dtype
    return tf.TensorSpec((None, *query_input.shape), _dtype(dtype), name=query_input.name)


def _ids_dtype(plan: ExportPlan) -> tf.DType:
    return tf.string if plan.string_ids else tf.int64


def _tower_inputs(plan: ExportPlan, values: list[Any]) -> Any:
    if plan.dict_features:
        return {i.key: value for i, value in zip(plan.inputs, values, strict=True)}
    return values[0]


def _search(
    embed: Callable[[Any], Any],
    similarities: Callable[[Any, Any], Any],
    max_k: int,
    features: Any,
    k: Any,
    excluded: Any,
    chunks: list[Any],
) -> tuple[Any, Any]:
    """Top-k positions (-1 where exclusions leave too few) and scores of each query.

    `embed` is the model's query path (`call`), `similarities` its
    `compute_similarities`. `k` is clamped to `[1, max_k]`; `excluded` holds
    catalogue positions, -1 for none, one row per query (a missing row fails the
    gather, in TensorFlow and in ONNX Runtime). Each chunk's top `k + exclusions`
    are merged, in chunk order.
    """
    queries = embed(features)
    excluded = tf.gather(excluded, tf.range(tf.shape(queries)[0]))
    num_candidates = sum(int(chunk.shape[0]) for chunk in chunks)
    k = tf.clip_by_value(tf.cast(tf.reshape(k, ()), tf.int32), 1, max_k)
    wanted = tf.minimum(k + tf.shape(excluded)[1], num_candidates)
    best_scores, best_positions, start = [], [], 0
    for chunk in chunks:
        rows = int(chunk.shape[0])
        scores = tf.cast(similarities(queries, chunk), tf.float32)
        top_scores, top_positions = tf.math.top_k(scores, k=tf.minimum(wanted, rows))
        best_scores.append(top_scores)
        best_positions.append(top_positions + start)
        start += rows
    scores = tf.concat(best_scores, axis=1)
    positions = tf.concat(best_positions, axis=1)
    if len(chunks) > 1:
        scores, order = tf.math.top_k(scores, k=wanted)
        positions = tf.gather(positions, order, batch_dims=1)
    # Excluded candidates move behind the others, which keep their order: the keys
    # are distinct, so the smallest k come out in order on every runtime.
    hit = tf.reduce_any(positions[:, :, None] == tf.cast(excluded, tf.int32)[:, None, :], axis=2)
    keys = tf.range(wanted)[None, :] + tf.cast(hit, tf.int32) * wanted
    _, order = tf.math.top_k(-keys, k=k)
    positions = tf.gather(positions, order, batch_dims=1)
    scores = tf.gather(scores, order, batch_dims=1)
    hit = tf.gather(hit, order, batch_dims=1)  # only where too few candidates remain
    positions = tf.where(hit, -1, positions)
    scores = tf.where(hit, tf.constant(-np.inf, tf.float32), scores)
    return positions, scores


def _searcher(model: keras.Model, plan: ExportPlan) -> Callable[..., tuple[Any, Any]]:
    """`_search` with the model's query path and scoring, as `recommend` runs them."""

    def embed(features: Any) -> Any:
        return model(features, training=False)

    def search(features: Any, k: Any, excluded: Any, chunks: list[Any]) -> tuple[Any, Any]:
        return _search(embed, model.compute_similarities, plan.max_k, features, k, excluded, chunks)

    return search


def _check_tables(plan: ExportPlan) -> None:
    """Refuses id lookups larger than a graph holds (they are constants in both formats)."""
    tables = plan.table_bytes()
    if tables > INLINE_BYTES:
        raise ValueError(
            f"The id lookups (the indexed ids and the query vocabularies) take about "
            f"{tables / 2**30:.2f} GiB, and the exported graphs hold them as constants, "
            "at most 2 GB: export fewer or shorter ids (e.g. int64 ids instead of long "
            "strings)."
        )


class _Catalogue(tf.Module):
    """The catalogue's embeddings (in chunks) and ids, as saved variables."""

    def __init__(self, plan: ExportPlan) -> None:
        super().__init__(name="catalogue")
        self.chunks = [
            tf.Variable(chunk, trainable=False, name=f"embeddings_{i}")
            for i, chunk in enumerate(plan.chunks)
        ]
        ids = plan.ids.astype(object if plan.string_ids else "int64")
        padding = np.array([plan.exclusion_padding], dtype=ids.dtype)
        # Position p's id at p + 1; position -1 (none) reads the padding.
        self.ids = tf.Variable(np.concatenate([padding, ids]), trainable=False, name="ids")
        self.positions = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(ids, _ids_dtype(plan)), tf.range(len(ids), dtype=tf.int64)
            ),
            default_value=-1,
        )


def _vocabulary_table(query_input: QueryInput) -> tf.lookup.StaticHashTable:
    keys, indices = query_input.table()
    keys = keys.astype(object) if keys.dtype.kind == "U" else keys
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, _dtype(query_input.raw_dtype)), tf.constant(indices, tf.int64)
        ),
        default_value=0,  # the one OOV bucket (the plan refuses more)
    )


def save_saved_model(model: keras.Model, plan: ExportPlan, path: str) -> None:
    """Writes a SavedModel whose `serving_default` signature searches the catalogue.

    Inputs: the query features (raw values where the model has a vocabulary),
    `k` (int32 scalar, 1 to `max_k`) and `exclude` (`[queries, n]` ids padded
    with the plan's padding). Outputs: `ids` and `scores`, `[queries, k]`.
    """
    _check_tables(plan)
    search = _searcher(model, plan)
    module = tf.Module()
    module.catalogue = _Catalogue(plan)
    module.vocabularies = [
        _vocabulary_table(i) if i.vocabulary is not None else None for i in plan.inputs
    ]
    catalogue = module.catalogue
    raw_specs = [_spec(i, raw=True) for i in plan.inputs]
    signature = [
        *raw_specs,
        tf.TensorSpec((), tf.int32, name=K_INPUT),
        tf.TensorSpec((None, None), _ids_dtype(plan), name=EXCLUDE_INPUT),
    ]

    def serve(*args: Any) -> dict[str, Any]:
        *values, k, exclude = args
        # Every op that reads `k` or `exclude` waits for the checks: without the
        # dependency the graph may run a gather first, and its index error would
        # replace the message (a race seen in CI).
        checks = [
            tf.debugging.assert_greater_equal(
                k, 1, message=f"`k` must be in [1, {plan.max_k}] (the export's max_k)"
            ),
            tf.debugging.assert_less_equal(
                k, plan.max_k, message=f"`k` must be in [1, {plan.max_k}] (the export's max_k)"
            ),
            tf.debugging.assert_equal(
                tf.shape(exclude)[0],
                tf.shape(values[0])[0],
                message="`exclude` must have one row per query (pad rows with the padding id)",
            ),
        ]
        with tf.control_dependencies(checks):
            k = tf.identity(k)
            exclude = tf.identity(exclude)
            values = [tf.identity(value) for value in values]
        features = []
        for query_input, value, table in zip(plan.inputs, values, module.vocabularies, strict=True):
            if table is not None:
                value = tf.cast(table.lookup(value), _dtype(query_input.dtype))
            features.append(value)
        excluded = catalogue.positions.lookup(exclude)
        positions, scores = search(_tower_inputs(plan, features), k, excluded, catalogue.chunks)
        ids = tf.gather(catalogue.ids, positions + 1)
        return {IDS_OUTPUT: ids, SCORES_OUTPUT: scores}

    module.serve = tf.function(serve, input_signature=signature, autograph=False)
    concrete = module.serve.get_concrete_function()
    # Only what serving reads: not the candidate tower's tables (the index holds
    # their output), which can be the largest variables of the model.
    module.model_variables = list(concrete.variables)
    tf.saved_model.save(module, path, signatures={"serving_default": concrete})


def onnx_core(model: keras.Model, plan: ExportPlan) -> tuple[Any, int]:
    """The search as an ONNX model over tower inputs, `k`, excluded positions and chunks.

    Its inputs are the tower's inputs (indices, named as the signature's query
    inputs), `k`, `excluded` (int64 positions, -1 for none) and one input per
    chunk of embeddings (`embeddings_{i}`, which `two_tower.export._onnx` turns
    into initializers); its outputs `positions` (int64, -1 for none) and `scores`.
    Returned with the bytes it holds inline (the weights and id lookups).
    """
    import tf2onnx

    chunk_shapes = [chunk.shape for chunk in plan.chunks]
    signature = [
        *[_spec(i, raw=False) for i in plan.inputs],
        tf.TensorSpec((), tf.int32, name=K_INPUT),
        tf.TensorSpec((None, None), tf.int64, name="excluded"),
        *[
            tf.TensorSpec(shape, tf.float32, name=f"embeddings_{i}")
            for i, shape in enumerate(chunk_shapes)
        ],
    ]
    count = len(plan.inputs)
    search = _searcher(model, plan)

    def core(*args: Any) -> dict[str, Any]:
        values, k, excluded, chunks = args[:count], args[count], args[count + 1], args[count + 2 :]
        positions, scores = search(_tower_inputs(plan, list(values)), k, excluded, list(chunks))
        return {"positions": tf.cast(positions, tf.int64), SCORES_OUTPUT: scores}

    function = tf.function(core, input_signature=signature, autograph=False)
    weights = sum(
        v.shape.num_elements() * v.dtype.size for v in function.get_concrete_function().variables
    )
    inline = weights + plan.table_bytes()
    if inline > INLINE_BYTES:
        raise ValueError(
            f"The ONNX file would hold {inline / 2**30:.2f} GiB inline ({weights / 2**30:.2f} "
            "GiB of query-tower weights, the rest id lookups), more than protobuf's 2 GB: "
            "tf2onnx writes the weights into the file. Export format='tf_saved_model', "
            "which keeps them as variables, or make the query tower smaller."
        )
    logger = tf.get_logger()
    level = logger.level
    # tf2onnx's graph export warns that it cannot serialize a "table_initializer"
    # collection, which this function does not use.
    logger.setLevel("ERROR")
    try:
        model_proto, _ = tf2onnx.convert.from_function(
            function, input_signature=signature, opset=ONNX_OPSET
        )
    finally:
        logger.setLevel(level)
    return model_proto, inline


def write(model: keras.Model, plan: ExportPlan, path: str, format: str) -> None:
    """Writes the `format` artefact (`"tf_saved_model"` or `"onnx"`) at `path`."""
    if format == "tf_saved_model":
        save_saved_model(model, plan, path)
        return
    from two_tower.export._onnx import write_onnx

    core, inline = onnx_core(model, plan)
    write_onnx(core, plan, path, inline)
