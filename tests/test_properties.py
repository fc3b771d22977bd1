"""Property-based tests (hypothesis) against independent NumPy references.

Hypothesis draws the shapes, ids, ties, padding and exclusions; every expected
value is recomputed here with NumPy (or, for the OOV buckets, with the
documented `crc32` rule), never with the code under test.

Locally the exploration is random (and remembered in `.hypothesis/`); with `CI`
set, the "ci" profile derandomizes it so that every CI run tests the same
examples. Compilation dominates on JAX and TensorFlow, so the search test draws
`chunk_size`, `query_batch_size` and `k` from small sets and reuses one index
per configuration: a handful of compiled steps serve every example.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter

import keras
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import two_tower

# CI: the same examples on every run (no example database), and a failure
# prints the `@reproduce_failure` blob. Locally: random, remembered in `.hypothesis/`.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
# Loaded before the `@settings` below are built: they inherit from it.
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="module", autouse=True)
def _release_cached_layers():
    """Drops the indexes and towers kept across examples once this file is done."""
    yield
    _indexes.clear()
    _towers.clear()


INT64 = st.integers(-(2**63), 2**63 - 1)
# NumPy's unicode dtype drops trailing NUL characters ("a\x00" == "a"), and
# surrogates cannot be encoded: neither is a string the library can keep apart.
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=6)


# --------------------------------------------------------------------------
# 1. BruteForceIndex.search against a NumPy ranking.

# Chunk widths are rounded up to multiples of 32 internally: chunk_size 5 scores
# 32 candidates a step (many chunks, a ragged last one), 33 scores 64 (32 when
# the catalogue has at most 32). query_batch_size 1 sends every query alone
# (exclusions are split per query batch), 128 sends them together.
CONFIGS = [(5, 1), (5, 128), (33, 3), (33, 128)]
# k below, at and above the 32-wide block; k == num_candidates is drawn too.
KS = [1, 3, 32, 40]
MAX_CANDIDATES = 300
# Torch runs the search eagerly, so more examples cost little there; JAX and
# TensorFlow pay a compilation for each new step shape.
SEARCH_EXAMPLES = 150 if keras.backend.backend() == "torch" else 40

_indexes: dict[tuple[int, int], two_tower.BruteForceIndex] = {}


def index_for(chunk_size: int, query_batch_size: int) -> two_tower.BruteForceIndex:
    """One index per configuration for the whole run: its compiled steps are reused."""
    key = (chunk_size, query_batch_size)
    if key not in _indexes:
        _indexes[key] = two_tower.BruteForceIndex(
            chunk_size=chunk_size, query_batch_size=query_batch_size
        )
    return _indexes[key]


def numpy_ranking(queries, candidates, k, excluded_positions):
    """Positions and float64 scores of the top k: score desc, then position asc."""
    scores = queries.astype("float64") @ candidates.astype("float64").T
    top = []
    for row, skip in enumerate(excluded_positions):
        keep = np.ones(len(candidates), bool)
        keep[list(skip)] = False
        positions = np.flatnonzero(keep)
        top.append(positions[np.lexsort((positions, -scores[row, positions]))[:k]])
    top = np.array(top).reshape(len(queries), k)
    return np.take_along_axis(scores, top, axis=1), top


@st.composite
def searches(draw):
    chunk_size, query_batch_size = draw(st.sampled_from(CONFIGS))
    k = draw(st.sampled_from(KS))
    exactly_k = draw(st.sampled_from([False, False, False, True]))  # k == n a quarter of the time
    n = k if exactly_k else draw(st.integers(k, MAX_CANDIDATES))
    dim = draw(st.integers(1, 5))
    num_queries = draw(st.integers(1, 9))
    # Small integers: dot products are exact in float32 and tie very often, and
    # zeros of both signs (-1 * 0 + -1 * 0 is -0.0) must tie with each other.
    small = st.integers(-2, 2)
    candidates = draw(hnp.arrays("float32", (n, dim), elements=small, fill=st.nothing()))
    queries = draw(hnp.arrays("float32", (num_queries, dim), elements=small, fill=st.nothing()))
    # Catalogue ids, then two ids that are not in the catalogue: up to 20 drawn
    # freely (extremes of int64, "", unicode), the rest structured, all shuffled.
    strings = draw(st.booleans())
    free = draw(st.lists(TEXT if strings else INT64, max_size=min(n + 2, 20), unique=True))
    pool = list(free)
    taken = set(free)
    filler = (f"id{i}" if strings else 2**40 + i for i in range(2 * n + 4))
    pool += [v for v in filler if v not in taken][: n + 2 - len(pool)]
    pool = draw(st.permutations(pool))
    ids = np.array(pool[:n], dtype=object if strings else "int64")
    unknown = pool[n:]
    ids_as_list = draw(st.booleans())
    # One entry per query: None, a list of ids (repeats allowed), or all but k.
    ignore_unknown = draw(st.booleans())
    exclude, excluded_positions = [], []
    for _ in range(num_queries):
        mode = draw(st.sampled_from(["none", "some", "all_but_k"]))
        if mode == "none":
            exclude.append(None)
            excluded_positions.append([])
            continue
        if mode == "some":
            positions = draw(st.lists(st.integers(0, n - 1), max_size=min(n - k, 12)))
        else:
            kept = set(draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True)))
            positions = [p for p in range(n) if p not in kept]
        entry = [ids[p] for p in positions]
        entry = [v.item() if isinstance(v, np.generic) else v for v in entry]
        if ignore_unknown:
            entry += draw(st.lists(st.sampled_from(unknown), max_size=2))
        entry = draw(st.permutations(entry))
        if draw(st.booleans()) and entry:
            entry = np.array(entry)  # an array entry, not a list
        exclude.append(entry)
        excluded_positions.append(sorted(set(positions)))
    if not ignore_unknown and all(e is None for e in exclude) and draw(st.booleans()):
        exclude = None
    return {
        "chunk_size": chunk_size,
        "query_batch_size": query_batch_size,
        "k": k,
        "candidates": candidates,
        "queries": queries,
        "ids": ids,
        "ids_as_list": ids_as_list,
        "exclude": exclude,
        "excluded_positions": excluded_positions,
        "ignore_unknown": ignore_unknown,
    }


@pytest.mark.slow
@settings(max_examples=SEARCH_EXAMPLES, deadline=None)
@given(case=searches())
def test_search_matches_numpy_ranking(case):
    index = index_for(case["chunk_size"], case["query_batch_size"])
    ids = case["ids"]
    index.index(case["candidates"], ids.tolist() if case["ids_as_list"] else ids)
    found, scores = index.search(
        case["queries"],
        k=case["k"],
        exclude=case["exclude"],
        ignore_unknown_exclusions=case["ignore_unknown"],
    )
    expected_scores, expected_positions = numpy_ranking(
        case["queries"], case["candidates"], case["k"], case["excluded_positions"]
    )
    expected_ids = ids[expected_positions]
    if expected_ids.dtype == object:
        assert found.dtype.kind == "U"
        assert found.tolist() == expected_ids.tolist()
    else:
        assert found.dtype == np.int64
        np.testing.assert_array_equal(found, expected_ids)
    # Integer dot products of at most 5 terms are exact in float32.
    assert scores.shape == expected_scores.shape
    np.testing.assert_array_equal(scores, expected_scores)


# --------------------------------------------------------------------------
# 2. Vocabulary: known values, OOV buckets, inverse and config round trip.


def crc32_bucket(value, num_oov_buckets):
    """The documented OOV rule, written out independently."""
    if value == "":
        return 0
    if isinstance(value, str):
        data = value.encode("utf-8")
    else:
        data = int(value).to_bytes(8, "little", signed=True)
    return zlib.crc32(data) % num_oov_buckets


@st.composite
def vocabularies(draw):
    values = INT64 if draw(st.booleans()) else TEXT.filter(bool)  # "" is always OOV
    pool = draw(st.lists(values, min_size=1, max_size=40, unique=True))
    num_known = draw(st.integers(1, len(pool)))
    known, unknown = pool[:num_known], pool[num_known:]
    if isinstance(pool[0], str) and draw(st.booleans()):
        unknown = [*unknown, ""]
    num_oov_buckets = draw(st.sampled_from([1, 2, 3, 7, 1000]))
    # Lookups: known and unknown values, in any order and with repeats.
    lookups = draw(st.lists(st.sampled_from(known + unknown), min_size=1, max_size=30))
    return known, unknown, num_oov_buckets, lookups


@settings(max_examples=100, deadline=None)
@given(case=vocabularies(), as_array=st.booleans())
def test_vocabulary_maps_known_values_in_order_and_unknown_values_to_their_bucket(case, as_array):
    known, unknown, num_oov, lookups = case
    vocab = two_tower.Vocabulary(np.array(known) if as_array else known, num_oov_buckets=num_oov)
    assert vocab.size == num_oov + len(known)

    # Known values: distinct indices num_oov, num_oov + 1, ... in the given order.
    indices = vocab(np.array(known))
    assert indices.dtype == np.int32
    np.testing.assert_array_equal(indices, np.arange(num_oov, num_oov + len(known)))
    # `vocabulary` is the inverse: index - num_oov_buckets gives the value back.
    assert vocab.vocabulary[indices - num_oov].tolist() == known

    # Unknown values: their crc32 bucket, in [0, num_oov_buckets).
    position = {value: i for i, value in enumerate(known)}
    expected = [
        position[v] + num_oov if v in position else crc32_bucket(v, num_oov) for v in lookups
    ]
    found = vocab(np.array(lookups))
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(vocab(lookups), expected)  # a plain list too
    assert all(0 <= i < vocab.size for i in found.tolist())
    unseen = [v for v in lookups if v not in position]
    assert all(0 <= i < num_oov for i in vocab(np.array(unseen, dtype=object)).tolist())

    # Each value's index does not depend on the batch it comes in, nor its shape.
    one_at_a_time = [int(vocab(np.array([v]))[0]) for v in lookups]
    assert one_at_a_time == expected
    if len(lookups) % 2 == 0:
        grid = vocab(np.array(lookups).reshape(2, -1))
        np.testing.assert_array_equal(grid, np.reshape(expected, (2, -1)))

    # A JSON config round trip keeps the mapping.
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(vocab)))
    restored = keras.saving.deserialize_keras_object(config)
    assert restored.get_config() == vocab.get_config()
    np.testing.assert_array_equal(restored(np.array(lookups)), expected)


@settings(max_examples=60, deadline=None)
@given(
    data=st.one_of(
        st.lists(st.integers(-3, 3) | st.just(2**62), min_size=1, max_size=40),
        st.lists(st.sampled_from(["a", "b", "é", "ab", "B", ""]), min_size=1, max_size=40),
    ),
    min_count=st.integers(1, 4),
    max_size=st.none() | st.integers(1, 5),
)
# On every run, whatever hypothesis draws: the empty vocabulary (nothing seen
# `min_count` times), and data with no value at all (only empty strings), refused.
@example(data=[1, 2, 2**62], min_count=2, max_size=None)
@example(data=["", ""], min_count=1, max_size=3)
def test_adapt_keeps_the_most_frequent_values_ties_by_value(data, min_count, max_size):
    counts = Counter(v for v in data if v != "")
    kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
    if max_size is not None:
        kept = kept[:max_size]
    vocab = two_tower.Vocabulary(num_oov_buckets=2, min_count=min_count, max_size=max_size)
    if not counts:  # "" is never a value: nothing to adapt to
        with pytest.raises(ValueError, match="`data` holds no values to adapt to"):
            vocab.adapt(np.array(data))
        return
    vocab.adapt(np.array(data))
    assert vocab.vocabulary.tolist() == kept
    assert vocab.size == 2 + len(kept)
    # Every value seen: kept ones at 2, 3, ... in order, the others (all of
    # them when nothing is kept) in their crc32 bucket.
    position = {value: i for i, value in enumerate(kept)}
    expected = [position[v] + 2 if v in position else crc32_bucket(v, 2) for v in data]
    np.testing.assert_array_equal(vocab(np.array(data)), expected)


# --------------------------------------------------------------------------
# 3. FeatureTower: mean pooling over non-padding entries, wherever the -1 are.


# A fixed batch and a few widths: eager JAX compiles every op once per shape.
BATCH = 5
WIDTHS = [0, 1, 2, 5, 8]  # 0: no entries at all


@st.composite
def padded_rows(draw, vocabulary_size):
    """`[BATCH, width]` indices with -1 padding anywhere, some rows all padding."""
    width = draw(st.sampled_from(WIDTHS))
    entry = st.one_of(st.just(-1), st.integers(0, vocabulary_size - 1))
    rows = draw(hnp.arrays("int64", (BATCH, width), elements=entry, fill=st.nothing()))
    if draw(st.booleans()):
        rows[draw(st.integers(0, BATCH - 1))] = -1  # a row with no entries
    return rows.astype(draw(st.sampled_from(["int32", "int64"])))


def numpy_pooled(table, rows):
    """Mean of the rows' non-padding embeddings; zeros for a row with none."""
    pooled = []
    for row in rows:
        present = row[row >= 0]
        pooled.append(table[present].mean(axis=0) if len(present) else np.zeros(table.shape[1]))
    return np.array(pooled)


_towers: dict[tuple[int, int], two_tower.FeatureTower] = {}


def tower_for(genres: int, tags: int) -> two_tower.FeatureTower:
    """One tower per pair of vocabulary sizes, with random (non-zero) bias tables."""
    if (genres, tags) not in _towers:
        tower = two_tower.FeatureTower(
            categorical={"user": 5},
            multivalued={"genres": genres, "tags": tags},
            embedding_dim=3,
            output_dim=None,
            bias="learned",
        )
        tower.build()
        rng = np.random.default_rng(genres * 100 + tags)
        for layer in tower.biases.values():
            layer.embeddings.assign(
                rng.normal(size=tuple(layer.embeddings.shape)).astype("float32")
            )
        _towers[genres, tags] = tower
    return _towers[genres, tags]


@st.composite
def tower_inputs(draw):
    genres, tags = draw(st.sampled_from([1, 4, 9])), draw(st.sampled_from([2, 9]))
    user = draw(hnp.arrays("int32", (BATCH,), elements=st.integers(0, 4)))
    features = {
        "user": user,
        "genres": draw(padded_rows(genres)),
        "tags": draw(padded_rows(tags)),
    }
    return genres, tags, features


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(case=tower_inputs())
def test_feature_tower_mean_pools_whatever_the_padding(case):
    genres, tags, features = case
    tower = tower_for(genres, tags)
    out = keras.ops.convert_to_numpy(tower(features))
    table = {n: keras.ops.convert_to_numpy(e.embeddings) for n, e in tower.embeddings.items()}
    bias = {n: keras.ops.convert_to_numpy(e.embeddings) for n, e in tower.biases.items()}
    user = features["user"]
    expected = np.concatenate(
        [
            table["user"][user],
            numpy_pooled(table["genres"], features["genres"]),
            numpy_pooled(table["tags"], features["tags"]),
            bias["user"][user]
            + numpy_pooled(bias["genres"], features["genres"])
            + numpy_pooled(bias["tags"], features["tags"]),
        ],
        axis=1,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # A row with no entries pools to exactly zero (the user columns are its own).
    for name, start in (("genres", 3), ("tags", 6)):
        empty = np.all(features[name] < 0, axis=1)
        np.testing.assert_array_equal(out[empty, start : start + 3], 0.0)
    # Padding every row to the widest width changes nothing.
    wider = {
        name: np.pad(value, ((0, 0), (0, max(WIDTHS) - value.shape[1])), constant_values=-1)
        if name != "user"
        else value
        for name, value in features.items()
    }
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tower(wider)), out, rtol=1e-6, atol=1e-7)
