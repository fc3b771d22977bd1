"""What an exported artefact holds, gathered from a trained model and checked.

Backend-neutral (NumPy only): the parent process checks the plan before it starts
the TensorFlow process that writes the artefact, and that process builds the same
plan from the model it loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from two_tower import _arguments
from two_tower.preprocessing.vocabulary import Vocabulary
from two_tower.retrieval.brute_force_index import BruteForceIndex

FORMATS = ("tf_saved_model", "onnx")
K_INPUT, EXCLUDE_INPUT = "k", "exclude"
IDS_OUTPUT, SCORES_OUTPUT = "ids", "scores"
DEFAULT_MAX_K = 100
# The signature's other inputs and outputs, and the ONNX core's own tensors.
RESERVED = frozenset({K_INPUT, EXCLUDE_INPUT, IDS_OUTPUT, SCORES_OUTPUT, "excluded", "positions"})


@dataclass(frozen=True)
class QueryInput:
    """One input of the exported signature, and the tower input it becomes.

    Attributes:
        name: the signature's input name: `"query"` for a tower over one array,
            else the feature's name.
        key: the feature's key in the tower's dict, or None for one array.
        dtype: the tower's input dtype (e.g. `"int32"`).
        shape: the tower input's shape without the batch dim.
        vocabulary: the `Vocabulary` that maps raw values to the tower's
            indices, or None when the signature takes the tower's input as is.
    """

    name: str
    key: str | None
    dtype: str
    shape: tuple[int | None, ...]
    vocabulary: Vocabulary | None

    @property
    def raw_dtype(self) -> str:
        """The signature's dtype: `"string"` or `"int64"` for raw values, else `dtype`."""
        if self.vocabulary is None:
            return self.dtype
        assert self.vocabulary.vocabulary is not None
        return "string" if self.vocabulary.vocabulary.dtype.kind == "U" else "int64"

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """The vocabulary as `(keys, indices)`: known values and the padding value (-1)."""
        vocabulary = self.vocabulary
        assert vocabulary is not None and vocabulary.vocabulary is not None
        keys = vocabulary.vocabulary
        indices = np.arange(len(keys), dtype="int64") + vocabulary.num_oov_buckets
        padding = vocabulary.padding
        if padding is not None and isinstance(padding, str) == (keys.dtype.kind == "U"):
            keys = np.concatenate([keys, np.array([padding], dtype=keys.dtype)])
            indices = np.concatenate([indices, [-1]])
        return keys, indices


@dataclass(frozen=True)
class ExportPlan:
    """Everything an exported artefact holds, checked.

    Attributes:
        inputs: the query inputs of the signature, in order.
        dict_features: whether the query tower takes a dict of features.
        index: the model's exact index (its embeddings and ids).
        max_k: the largest `k` a request may ask for.
        exclusion_padding: the value that pads exclusion lists (never an id).
    """

    inputs: tuple[QueryInput, ...]
    dict_features: bool
    index: BruteForceIndex
    max_k: int
    exclusion_padding: int | str

    @property
    def chunk_rows(self) -> int:
        """Candidate rows scored at once: the index's own `chunk_size`, at most 2^18.

        An exported search scores each block whole (`[queries, block]` scores,
        no tiles), so its blocks stay as large as the index's were before it
        tiled its chunks (`BruteForceIndex`).
        """
        return min(self.index.chunk_size, EXPORT_BLOCK)

    @cached_property
    def catalogue(self) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, embeddings)` of one version of the index, read once (the index may
        change in place meanwhile: `BruteForceIndex.add`)."""
        with self.index.reading():
            ids, embeddings = self.index.candidate_ids, self.index.embeddings()
        assert ids is not None and embeddings is not None
        return ids, embeddings

    @property
    def ids(self) -> np.ndarray:
        return self.catalogue[0]

    @property
    def string_ids(self) -> bool:
        return self.ids.dtype.kind == "U"

    @cached_property
    def chunks(self) -> list[np.ndarray]:
        """The indexed embeddings in blocks of `chunk_rows` rows (float32), copied once."""
        embeddings = np.asarray(self.catalogue[1], dtype="float32")
        return [
            embeddings[start : start + self.chunk_rows]
            for start in range(0, len(embeddings), self.chunk_rows)
        ]

    def table_bytes(self) -> int:
        """About how many bytes the id lookups take as ONNX attributes: keys and values."""

        def size(keys: np.ndarray) -> int:
            text = int(np.char.str_len(keys).sum()) if keys.dtype.kind == "U" else keys.nbytes
            return text + 8 * len(keys)

        vocabularies = [i.table()[0] for i in self.inputs if i.vocabulary is not None]
        return size(self.ids) + sum(size(keys) for keys in vocabularies)

    def options(self) -> dict[str, Any]:
        """The export options, as JSON (for the process that writes the artefact)."""
        return {"max_k": self.max_k, "exclusion_padding": self.exclusion_padding}


EXPORT_BLOCK = 2**18  # most candidates an exported search scores at once


def plan(
    index: Any,
    query_spec: Any,
    query_vocabulary: Any,
    *,
    max_k: Any,
    exclusion_padding: Any = None,
) -> ExportPlan:
    """The checked plan of an export.

    Args:
        index: the model's `candidate_index`.
        query_spec: the model's recorded query input spec (`_serving.input_spec`).
        query_vocabulary: the model's query vocabularies.
        max_k: the largest `k` a request may ask for; None for 100, or the
            number of candidates when fewer.
        exclusion_padding: the value that pads exclusion lists; None for -1
            (integer ids) or `""` (string ids).

    Raises:
        ValueError: see `TwoTowerRetrieval.export`.
    """
    if not isinstance(index, BruteForceIndex):
        raise ValueError(
            "export writes the exact index into the artefact, so the model's "
            "`candidate_index` must be a two_tower.BruteForceIndex. Received "
            f"{type(index).__name__}: an approximate index (faiss) has no TensorFlow or ONNX "
            "operation. Save it with the model (`model.save`) and serve it from Python, "
            "or index the catalogue with a BruteForceIndex before exporting."
        )
    dtype = index.compute_dtype
    if dtype != "float32":
        raise ValueError(
            f"The index scores in {dtype} (a mixed-precision policy), and an exported "
            "artefact scores in float32, so near-ties could rank differently from "
            "`recommend`. Give the model a float32 index to export: "
            "`candidate_index=two_tower.BruteForceIndex(dtype='float32')`."
        )
    ids = index.candidate_ids
    if ids is None:
        raise ValueError(
            "The index is empty: call `index_candidates` before `export`, so that the "
            "artefact holds the catalogue."
        )
    if query_spec is None:
        raise ValueError(
            "The query tower's inputs are not known yet: call the model on queries "
            "(`fit`, `recommend` or `predict`) before `export`."
        )
    if max_k is None:
        max_k = min(DEFAULT_MAX_K, len(ids))
    max_k = _arguments.integer("max_k", max_k, maximum=len(ids), owner="export")
    inputs = _inputs(query_spec, query_vocabulary)
    return ExportPlan(
        inputs=inputs,
        dict_features=isinstance(query_spec, Mapping),
        index=index,
        max_k=max_k,
        exclusion_padding=_padding(exclusion_padding, ids),
    )


def _inputs(query_spec: Any, query_vocabulary: Any) -> tuple[QueryInput, ...]:
    if isinstance(query_spec, Mapping):
        vocabularies = dict(query_vocabulary or {})
        found = []
        for key in query_spec:
            if not isinstance(query_spec[key], str):
                raise ValueError(
                    "export takes query features that are arrays or a flat dict of arrays. "
                    f"Received a nested feature {key!r}: {query_spec[key]!r}"
                )
            found.append(_input(str(key), str(key), query_spec[key], vocabularies.get(key)))
    elif isinstance(query_spec, str):
        found = [_input("query", None, query_spec, query_vocabulary)]
    else:
        raise ValueError(
            "export takes query features that are one array or a flat dict of arrays. "
            f"Received a query input structure of {query_spec!r}"
        )
    names = {i.name for i in found}
    reserved = sorted(names & RESERVED | {n for n in names if n.startswith("embeddings_")})
    if reserved:
        raise ValueError(
            f"Query features named {reserved} clash with names the exported graphs use "
            f"({sorted(RESERVED)}, embeddings_<i>): rename them."
        )
    return tuple(found)


def _input(name: str, key: str | None, spec: str, vocabulary: Any) -> QueryInput:
    dtype, dims = spec.split("|")
    shape = tuple(None if d == "None" else int(d) for d in dims.split(",") if d)
    if vocabulary is not None and vocabulary.num_oov_buckets > 1:
        raise ValueError(
            f"The query vocabulary of {name!r} has {vocabulary.num_oov_buckets} OOV buckets. "
            "An exported artefact maps an unknown value to bucket 0 only: the CRC32 hash that "
            "spreads unknown values over several buckets has no TensorFlow or ONNX operation. "
            "Train with `Vocabulary(num_oov_buckets=1)` to export."
        )
    return QueryInput(name=name, key=key, dtype=dtype, shape=shape, vocabulary=vocabulary)


def _padding(padding: Any, ids: np.ndarray) -> int | str:
    strings = ids.dtype.kind == "U"
    if padding is None:
        padding = "" if strings else -1
    if strings != isinstance(padding, str) or isinstance(padding, bool):
        raise ValueError(
            f"`exclusion_padding` must be {'a string' if strings else 'an integer'}, like the "
            f"indexed ids. Received exclusion_padding={padding!r}"
        )
    padding = str(padding) if strings else int(padding)
    if np.any(ids == padding):
        raise ValueError(
            f"`exclusion_padding` ({padding!r}) is an indexed candidate id: padding would "
            "exclude it. Choose a value that is not an id."
        )
    return padding
