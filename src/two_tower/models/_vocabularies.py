"""Raw values to tower inputs: the vocabularies a `TwoTowerRetrieval` carries.

A side's vocabularies are one `Vocabulary` (the tower takes one id array) or a
dict feature name -> `Vocabulary` (the tower takes a dict of features; the
features not named pass through). Everything here runs on the host in NumPy and
takes narrow inputs (the vocabularies, the features, the id key), not the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union  # noqa: UP035 (a runtime alias on Python 3.10)

import keras
import numpy as np

from two_tower.preprocessing.vocabulary import Vocabulary

Vocabularies = Union[Vocabulary, Mapping[str, Vocabulary], None]  # noqa: UP007


def check(vocabularies: Any, argument: str, id_limit: tuple[int, str] | None) -> Vocabularies:
    """`vocabularies` as None, a `Vocabulary` or a plain dict of them, once checked.

    Args:
        vocabularies: what the user passed.
        argument: its name, e.g. "query_vocabulary".
        id_limit: the tower's id range and where it comes from, when the
            tower is known to take ids (see `_input_checks.id_limit`).

    Raises:
        ValueError: anything else than those, a vocabulary with no values set
            yet, or one larger than the tower's id range.
    """
    if vocabularies is None:
        return None
    named = (
        {"": vocabularies}
        if isinstance(vocabularies, Vocabulary)
        else dict(vocabularies)
        if isinstance(vocabularies, Mapping)
        else None
    )
    if named is None or not all(
        isinstance(name, str) and isinstance(v, Vocabulary) for name, v in named.items()
    ):
        raise ValueError(
            f"`{argument}` must be a two_tower.Vocabulary (for a tower over one id array), "
            "a dict of feature name -> two_tower.Vocabulary (for a tower over a dict of "
            f"features), or None. Received: {vocabularies!r}"
        )
    for name, vocabulary in named.items():
        if vocabulary.vocabulary is None:
            where = f"`{argument}`" + (f"[{name!r}]" if name else "")
            raise ValueError(
                f"{where} has no values yet: call its `adapt(data)` (or pass `vocabulary=`) "
                "before giving it to the model."
            )
    if isinstance(vocabularies, Vocabulary):
        if id_limit is not None and vocabularies.size > id_limit[0]:
            raise ValueError(
                f"`{argument}` maps to {vocabularies.size} indices (OOV buckets included), "
                f"more than {id_limit[1]} (={id_limit[0]}). Size the tower's "
                "table with the vocabulary's `size`."
            )
        return vocabularies
    return named


def check_both(
    query_vocabulary: Any,
    candidate_vocabulary: Any,
    query_id_limit: tuple[int, str] | None,
    candidate_id_limit: tuple[int, str] | None,
    candidate_id_key: str | None,
    catalogue_size: int | None,
) -> tuple[Vocabularies, Vocabularies]:
    """The model's two vocabulary arguments, checked (see `check`) and against
    `catalogue_size`: the candidate ids' vocabulary may not map beyond it."""
    queries = check(query_vocabulary, "query_vocabulary", query_id_limit)
    candidates = check(candidate_vocabulary, "candidate_vocabulary", candidate_id_limit)
    ids = id_vocabulary(candidates, candidate_id_key)
    if ids is not None and catalogue_size is not None and ids.size > catalogue_size:
        raise ValueError(
            f"`candidate_vocabulary` maps to {ids.size} indices (OOV buckets "
            f"included), more than catalogue_size={catalogue_size}."
        )
    return queries, candidates


def check_outgrown(
    vocabularies: Vocabularies, encoded: Any, sizes: Any, vocabulary_name: str
) -> None:
    """Raises when looked-up values fall beyond their table: values were added to
    the vocabulary (`Vocabulary.add`) and the tables not grown yet. Values known
    before still look up as they did.

    Args:
        vocabularies: a side's vocabularies.
        encoded: what `encode` returned for them.
        sizes: the side's tower's `table_sizes()` (see `GrowsTables`).
        vocabulary_name: the model argument holding `vocabularies`.
    """
    if isinstance(vocabularies, Vocabulary):
        pairs = [("", vocabularies, encoded, sizes)] if isinstance(sizes, int) else []
    elif isinstance(vocabularies, Mapping) and isinstance(encoded, Mapping):
        tables = sizes if isinstance(sizes, Mapping) else {}
        pairs = [(n, v, encoded.get(n), tables[n]) for n, v in vocabularies.items() if n in tables]
    else:
        pairs = []
    for name, vocabulary, indices, size in pairs:
        if vocabulary.size <= size or indices is None or not np.size(indices):
            continue
        if int(np.max(indices)) >= size:
            where = f"`{vocabulary_name}`" + (f"[{name!r}]" if name else "")
            raise ValueError(
                f"{where} maps to {vocabulary.size} indices, but its table takes {size}: "
                "values were added to the vocabulary (`Vocabulary.add`) and the tables not "
                "grown. Call the model's `grow_tables()` before using the new values."
            )


def id_vocabulary(vocabularies: Vocabularies, id_key: str | None) -> Vocabulary | None:
    """The vocabulary of a side's ids: the one vocabulary, or the id key's."""
    if isinstance(vocabularies, Vocabulary):
        return vocabularies
    if isinstance(vocabularies, Mapping) and id_key is not None:
        return vocabularies.get(id_key)
    return None


def encode(vocabularies: Vocabularies, features: Any, argument: str, vocabulary_name: str) -> Any:
    """`features` with raw values looked up in `vocabularies` (NumPy in, NumPy out).

    Args:
        vocabularies: a side's vocabularies (see the module docstring).
        features: an array-like of raw values, or a dict of them.
        argument: how the caller names `features` in errors, e.g. "`queries`".
        vocabulary_name: the model argument holding `vocabularies`.

    Returns:
        The features unchanged without vocabularies; else the looked-up int32
        indices (a new dict for dict features: the input is not modified).

    Raises:
        ValueError: a dict where one id array is expected or the reverse, a
            named feature missing, or values the vocabulary cannot look up.
    """
    if vocabularies is None:
        return features
    if isinstance(vocabularies, Vocabulary):
        if isinstance(features, Mapping):
            raise ValueError(
                f"{argument} is a dict of features {sorted(map(str, features))}, but "
                f"`{vocabulary_name}` is one Vocabulary, for a tower that takes one array "
                "of ids. Pass the raw ids, or give the model a dict feature name -> "
                "Vocabulary."
            )
        return _lookup(vocabularies, features, argument)
    if not isinstance(features, Mapping):
        raise ValueError(
            f"{argument} must be a dict of features: `{vocabulary_name}` maps features "
            f"{sorted(vocabularies)}. Received {type(features).__name__}"
        )
    missing = sorted(set(vocabularies) - set(features))
    if missing:
        raise ValueError(
            f"{argument} lacks feature(s) {missing}, which `{vocabulary_name}` maps. "
            f"Received features {sorted(map(str, features))}"
        )
    encoded = dict(features)
    for name, vocabulary in vocabularies.items():
        encoded[name] = _lookup(vocabulary, features[name], f"{argument}[{name!r}]")
    return encoded


def _lookup(vocabulary: Vocabulary, values: Any, argument: str) -> np.ndarray:
    return vocabulary.lookup(values, argument.replace("`", ""))


def require_known(vocabulary: Vocabulary, indices: np.ndarray, raw: Any, argument: str) -> None:
    """Raises when raw candidate ids are unknown (their indices are OOV buckets or -1).

    An unknown candidate id has no embedding of its own: indexing it would add a
    copy of the OOV row's candidate, and searching from it returns the OOV row's
    neighbours, whatever the id.
    """
    unknown = np.asarray(indices) < vocabulary.num_oov_buckets
    if np.any(unknown):
        examples = np.unique(np.asarray(raw)[unknown])[:5].tolist()
        raise ValueError(
            f"{argument} holds {int(np.sum(unknown))} id(s) that the candidate vocabulary "
            f"does not know, e.g. {examples}: an unknown candidate has no embedding of its "
            "own to index or to search from. Leave them out, or adapt the vocabulary with "
            "them and train again."
        )


def catalogue_rows(
    vocabularies: Vocabularies, features: Any, id_key: str | None, catalogue_size: int
) -> Any:
    """`set_catalogue`'s raw features as rows by index: row i describes index i.

    With a vocabulary for the `candidate_id_key` feature, the rows may come in
    any order and need not cover every index: each row goes to its id's index,
    and the other rows (the OOV buckets, known ids without features, indices up
    to `catalogue_size`) are filled with 0, -1 (empty) for multi-valued
    features, and their own index as id.

    Raises:
        ValueError: unknown or repeated ids, or features whose row counts differ.
    """
    if vocabularies is None or not isinstance(features, Mapping):
        return features
    encoded = encode(vocabularies, features, "`features`", "candidate_vocabulary")
    vocabulary = id_vocabulary(vocabularies, id_key)
    if vocabulary is None:
        return encoded
    assert id_key is not None
    arrays = {name: np.asarray(value) for name, value in encoded.items()}
    ids = arrays[id_key].reshape(-1)
    require_known(vocabulary, ids, np.asarray(features[id_key]).reshape(-1), "`features`")
    counts = {name: (array.shape[0] if array.ndim else None) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"Catalogue features must have one row per candidate. Received {counts}")
    unique, repeats = np.unique(ids, return_counts=True)
    if np.any(repeats > 1):
        doubled = vocabulary.values_of(unique[repeats > 1])[:5].tolist()
        raise ValueError(f"Each candidate id may appear once in `features`. Repeated: {doubled}")
    # (TwoTowerRetrieval checked vocabulary.size <= catalogue_size when it was made.)
    rows: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name == id_key:
            rows[name] = np.arange(catalogue_size, dtype=array.dtype)
            continue
        fill = -1 if array.ndim > 1 and array.dtype.kind in "iu" else 0
        full = np.full((catalogue_size, *array.shape[1:]), fill, dtype=array.dtype)
        full[ids] = array
        rows[name] = full
    return rows


def serialize(vocabularies: Vocabularies) -> Any:
    if isinstance(vocabularies, Mapping):
        return {name: keras.saving.serialize_keras_object(v) for name, v in vocabularies.items()}
    return keras.saving.serialize_keras_object(vocabularies)


def deserialize(config: Any) -> Vocabularies:
    if config is None:
        return None
    if isinstance(config, Mapping) and "class_name" not in config:
        return {name: keras.saving.deserialize_keras_object(c) for name, c in config.items()}
    return keras.saving.deserialize_keras_object(config)
