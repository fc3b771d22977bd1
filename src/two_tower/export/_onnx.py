"""The ONNX artefact: the converted search core, wrapped with the lookups and the catalogue.

tf2onnx converts the search over tower inputs (`backends.tensorflow_export.onnx_core`);
this module adds what it cannot convert from TensorFlow's hash tables: the
vocabulary lookups of raw query values and the exclusion ids' positions become
ONNX-ML `LabelEncoder` nodes, the ids of the results a `Gather`, and the
catalogue's embeddings initializers (stored beside the file when large, as ONNX's
external data, since one protobuf holds at most 2 GB).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np

from two_tower.export._plan import EXCLUDE_INPUT, IDS_OUTPUT, ExportPlan, QueryInput

ML_DOMAIN = "ai.onnx.ml"
# Above this many bytes of embeddings, they go to `<file>.data` beside the model.
EXTERNAL_DATA_BYTES = 1 << 30


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as error:  # pragma: no cover - the export extra installs it
        raise ImportError(
            'Exporting to ONNX needs the onnx and tf2onnx packages: pip install "two-tower[export]"'
        ) from error
    return onnx


def _label_encoder(
    onnx: Any,
    name: str,
    source: str,
    target: str,
    keys: np.ndarray,
    values: np.ndarray,
    default: int,
) -> Any:
    """A `LabelEncoder` node: `keys` (strings or int64) to int64 `values`, else `default`."""
    key_attribute = (
        {"keys_strings": [str(k) for k in keys.tolist()]}
        if keys.dtype.kind in "UO"
        else {"keys_int64s": keys.astype("int64").tolist()}
    )
    return onnx.helper.make_node(
        "LabelEncoder",
        [source],
        [target],
        name=name,
        domain=ML_DOMAIN,
        values_int64s=values.astype("int64").tolist(),
        default_int64=default,
        **key_attribute,
    )


def _elem_type(onnx: Any, dtype: str) -> int:
    if dtype == "string":
        return onnx.TensorProto.STRING
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _rename_uses(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _raw_input(onnx: Any, graph: Any, query_input: QueryInput) -> list[Any]:
    """Makes `query_input`'s graph input take raw values; returns the lookup nodes."""
    name = query_input.name
    indices = f"{name}__indices"
    _rename_uses(graph, name, indices)
    for value_info in graph.input:
        if value_info.name == name:
            value_info.type.tensor_type.elem_type = _elem_type(onnx, query_input.raw_dtype)
    keys, positions = query_input.table()
    return [
        _label_encoder(onnx, f"{name}__lookup", name, f"{name}__int64", keys, positions, 0),
        onnx.helper.make_node(
            "Cast",
            [f"{name}__int64"],
            [indices],
            name=f"{name}__cast",
            to=_elem_type(onnx, query_input.dtype),
        ),
    ]


def write_onnx(core: Any, plan: ExportPlan, path: str, inline: int) -> list[str]:
    """Wraps the converted `core` and writes it to `path`; returns the files written.

    `inline` is what `core` holds that must stay in the file (weights, id lookups):
    when that and the catalogue exceed `EXTERNAL_DATA_BYTES`, the initializers go to
    external data.

    The model's inputs: the query features (raw values where the model has a
    vocabulary), `k` (int32 scalar) and `exclude` (`[queries, n]` ids, padded);
    its outputs `ids` and `scores`, `[queries, k]`.
    """
    onnx = _onnx()
    graph = core.graph
    first: list[Any] = []
    for query_input in plan.inputs:
        if query_input.vocabulary is not None:
            first += _raw_input(onnx, graph, query_input)
    # Exclusions: raw ids in, catalogue positions (-1 unknown or padding) to the core.
    ids = plan.ids
    first.append(
        _label_encoder(
            onnx,
            "exclude__lookup",
            EXCLUDE_INPUT,
            "excluded",
            ids,
            np.arange(len(ids), dtype="int64"),
            -1,
        )
    )
    exclude = onnx.helper.make_tensor_value_info(
        EXCLUDE_INPUT,
        _elem_type(onnx, "string" if plan.string_ids else "int64"),
        ["queries", "exclusions"],
    )
    kept_inputs = [i for i in graph.input if not i.name.startswith("embeddings_")]
    kept_inputs = [exclude if i.name == "excluded" else i for i in kept_inputs]
    chunks = plan.chunks
    catalogue = sum(chunk.nbytes for chunk in chunks) + 8 * len(ids)
    large = inline + catalogue >= EXTERNAL_DATA_BYTES
    for i, chunk in enumerate(chunks):
        graph.initializer.append(onnx.numpy_helper.from_array(chunk, f"embeddings_{i}"))
    # Results: position p's id at p + 1 of the ids, the padding first (position -1).
    padded = np.concatenate([np.array([plan.exclusion_padding], dtype=ids.dtype), ids])
    graph.initializer.append(
        onnx.numpy_helper.from_array(
            padded.astype(object) if plan.string_ids else padded.astype("int64"),
            "two_tower__result_ids",
        )
    )
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, "int64"), "two_tower__one"))
    last = [
        onnx.helper.make_node(
            "Add",
            ["positions", "two_tower__one"],
            ["two_tower__positions_plus_one"],
            name="ids__shift",
        ),
        onnx.helper.make_node(
            "Gather",
            ["two_tower__result_ids", "two_tower__positions_plus_one"],
            [IDS_OUTPUT],
            name="ids__gather",
            axis=0,
        ),
    ]
    nodes = [*first, *graph.node, *last]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    outputs = [o for o in graph.output if o.name != "positions"]
    ids_output = onnx.helper.make_tensor_value_info(
        IDS_OUTPUT,
        _elem_type(onnx, "string" if plan.string_ids else "int64"),
        ["queries", "k"],
    )
    del graph.output[:]
    graph.output.extend([ids_output, *outputs])
    if not any(o.domain == ML_DOMAIN for o in core.opset_import):
        core.opset_import.append(onnx.helper.make_opsetid(ML_DOMAIN, 2))
    del chunks
    written = [path]
    if large:
        # A name of its own, so a server never pairs one export's graph with another's data.
        location = f"{os.path.basename(path)}.{secrets.token_hex(4)}.data"
        onnx.save_model(
            core,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=1024,
        )
        written.append(os.path.join(os.path.dirname(path), location))
    else:
        onnx.save_model(core, path)
    return written
