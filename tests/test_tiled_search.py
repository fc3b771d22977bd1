"""The tiled exact search (`_tiled_top_k`) against NumPy and against scoring chunks whole.

The backends tile thousands of candidates at a time; here tiles of 64 put
catalogues of a few thousand rows on the tiled path, with many tiles, a last
tile that overlaps its predecessor (widths that 64 does not divide), several
chunks and a padded last chunk. Real-valued data runs on the backend's own
tiles (the last tests). Expected values
come from NumPy: scores in float64, ranked by (score desc, position asc).
Grid-valued embeddings give exact float32 scores, many ties, and zeros of both
signs, so those cases compare scores exactly.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import two_tower
from two_tower.backends import backend_module
from two_tower.retrieval import _tiled_top_k, brute_force_index

TILE = 64

# As in test_properties.py: with `CI` set, the same examples on every run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def tiled(monkeypatch):
    """Tiles of `TILE` candidates; the list counts traces of the tiled kernel."""
    monkeypatch.setattr(backend_module(), "search_tile", TILE)
    traced = []
    kernel = _tiled_top_k.tiled_top_k

    def counted(*args, **kwargs):
        traced.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(_tiled_top_k, "tiled_top_k", counted)
    return traced


def whole(monkeypatch):
    """Every chunk scored whole (tile 0), the path before tiling."""
    monkeypatch.setattr(backend_module(), "search_tile", 0)


def grid(rng, shape, low=-2, high=2):
    return rng.integers(low, high + 1, shape).astype("float32") / 2


def reference(queries, candidates, k, kept=None):
    """`(positions, scores)` of the top k per query among `kept[q]` (all by
    default), padded with (-1, -inf) where fewer remain."""
    scores = queries.astype("float64") @ candidates.astype("float64").T
    positions, values = [], []
    for row in range(len(queries)):
        allowed = np.arange(len(candidates)) if kept is None else np.flatnonzero(kept[row])
        order = allowed[np.lexsort((allowed, -scores[row, allowed]))][:k]
        pad = k - len(order)
        positions.append(list(order) + [-1] * pad)
        values.append(list(scores[row, order]) + [-np.inf] * pad)
    return np.array(positions), np.array(values)


@pytest.mark.parametrize(("chunk_size", "k"), [(1024, 1), (1024, 8), (2**20, 5)])
def test_random_catalogue_matches_numpy(tiled, chunk_size, k):
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(3000, 16)).astype("float32")
    queries = rng.normal(size=(50, 16)).astype("float32")
    ids = rng.permutation(10**6)[:3000]
    index = two_tower.BruteForceIndex(chunk_size=chunk_size)
    index.index(candidates, ids)
    found, scores = index.search(queries, k=k)
    positions, expected = reference(queries, candidates, k)
    assert tiled, "the tiled kernel did not run"
    np.testing.assert_array_equal(found, ids[positions])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1024, 2**20])
def test_ties_and_signed_zeros_match_numpy_exactly(tiled, chunk_size):
    rng = np.random.default_rng(1)
    candidates = grid(rng, (2500, 3), -1, 1)  # few distinct rows: most scores tie
    queries = grid(rng, (20, 3), -1, 1)
    queries[0] = [-0.0, -0.5, 0.0]  # scores of -0.0 and 0.0, which must tie
    index = two_tower.BruteForceIndex(chunk_size=chunk_size)
    index.index(candidates)
    found, scores = index.search(queries, k=8)
    positions, expected = reference(queries, candidates, 8)
    assert tiled
    np.testing.assert_array_equal(found, positions)
    np.testing.assert_array_equal(scores, expected)


def test_exclusions_are_exact(tiled):
    rng = np.random.default_rng(2)
    n = 2100
    candidates = grid(rng, (n, 4))
    queries = grid(rng, (13, 4))
    ids = rng.permutation(10**5)[:n]
    unfiltered, _ = reference(queries, candidates, 40)
    excluded = []
    for row in range(len(queries)):
        if row % 4 == 0:
            excluded.append(np.array([], int))  # nothing excluded for this query
            continue
        # The query's own best (blocks with several exclusions, some at offset 31,
        # the sign bit of a block's bits), whole blocks, and random positions.
        chosen = set(unfiltered[row, : rng.integers(5, 40)])
        chosen |= set(range(31, n, 32)[:: row + 1])
        chosen |= set(range(64 * row, 64 * row + 96))
        chosen |= set(rng.choice(n, 50, replace=False))
        excluded.append(np.array(sorted(chosen)))
    kept = np.ones((len(queries), n), bool)
    for row, positions in enumerate(excluded):
        kept[row, positions] = False
    index = two_tower.BruteForceIndex(chunk_size=1024)
    index.index(candidates, ids)
    exclude = [ids[positions] if len(positions) else None for positions in excluded]
    found, scores = index.search(queries, k=8, exclude=exclude)
    positions, expected = reference(queries, candidates, 8, kept)
    assert tiled
    np.testing.assert_array_equal(found, ids[positions])
    np.testing.assert_array_equal(scores, expected)


@pytest.mark.parametrize("compact", [False, True])
def test_where_allow_and_exclude_together(tiled, monkeypatch, compact):
    # Masked: every candidate scored, the filtered ones at -inf; compact: a copy
    # of the allowed rows only (forced for any filter), itself searched tiled.
    monkeypatch.setattr(brute_force_index, "_COMPACT_FRACTION", 1 if compact else 10**9)
    rng = np.random.default_rng(3)
    n = 4500
    candidates = grid(rng, (n, 4))
    queries = grid(rng, (11, 4))
    category = rng.integers(0, 3, n)
    index = two_tower.BruteForceIndex(chunk_size=2048)
    index.index(candidates, attributes={"category": category})
    allow = [None] * len(queries)
    allow[1] = rng.choice(n, 5, replace=False)  # fewer than k allowed: padding
    allow[2] = np.flatnonzero(category != 2)[: n // 3]
    allow[5] = np.arange(n)[::7]
    exclude = [None] * len(queries)
    exclude[2] = allow[2][:200]
    exclude[3] = rng.choice(n, 300, replace=False)
    kept = np.broadcast_to(category != 1, (len(queries), n)).copy()
    for row in range(len(queries)):
        if allow[row] is not None:
            restricted = np.zeros(n, bool)
            restricted[allow[row]] = True
            kept[row] &= restricted
        if exclude[row] is not None:
            kept[row, exclude[row]] = False
    found, scores = index.search(
        queries, k=10, where={"category": [0, 2]}, allow=allow, exclude=exclude
    )
    positions, expected = reference(queries, candidates, 10, kept)
    assert tiled
    np.testing.assert_array_equal(found, positions)
    np.testing.assert_array_equal(scores, expected.astype("float32"))


class Bilinear(keras.layers.Layer):
    """`q · W · c`, with `W` a variable: not symmetric, so scored queries-major."""

    def __init__(self, weights, **kwargs):
        super().__init__(**kwargs)
        self.kernel = self.add_weight(shape=weights.shape, initializer="zeros", trainable=False)
        self.kernel.assign(weights)

    def similarity(self, query_embeddings, candidate_embeddings):
        projected = keras.ops.matmul(query_embeddings, self.kernel)
        return keras.ops.matmul(projected, keras.ops.transpose(candidate_embeddings))


def test_a_custom_similarity_reads_its_variables(tiled):
    rng = np.random.default_rng(4)
    candidates = grid(rng, (2200, 3))
    queries = grid(rng, (9, 3))
    weights = grid(rng, (3, 3))
    layer = Bilinear(weights)
    index = two_tower.BruteForceIndex(chunk_size=1024)
    index.index(candidates)
    exclude = [None, [0, 1, 2, 3], None, list(range(0, 2200, 3))] + [None] * 5
    kept = np.ones((9, 2200), bool)
    kept[1, :4] = False
    kept[3, ::3] = False
    for scale in (1.0, -1.0):  # the variable changes between searches
        layer.kernel.assign(weights * scale)
        found, scores = index.search(queries, k=6, similarity_fn=layer.similarity, exclude=exclude)
        positions, expected = reference(queries @ (weights * scale), candidates, 6, kept)
        np.testing.assert_array_equal(found, positions)
        np.testing.assert_array_equal(scores, expected)
    assert tiled


def test_tiled_results_equal_the_whole_chunk_path(tiled, monkeypatch):
    rng = np.random.default_rng(5)
    n = 3300
    candidates = grid(rng, (n, 5))
    queries = grid(rng, (70, 5))
    ids = np.array([f"item-{i}" for i in rng.permutation(n)])
    index = two_tower.BruteForceIndex(chunk_size=2048, query_batch_size=16)  # several batches
    index.index(candidates, ids, attributes={"flag": rng.random(n) < 0.6})
    exclude = [ids[rng.choice(n, int(rng.integers(0, 400)), replace=False)] for _ in queries]
    options = {"k": 9, "exclude": exclude, "where": {"flag": True}}
    tiled_found, tiled_scores = index.search(queries, **options)
    assert tiled
    whole(monkeypatch)
    found, scores = index.search(queries, **options)
    np.testing.assert_array_equal(tiled_found, found)
    np.testing.assert_array_equal(tiled_scores, scores)


def test_a_few_queries_are_padded_to_a_group(tiled):
    rng = np.random.default_rng(6)
    candidates = grid(rng, (1500, 4))
    index = two_tower.BruteForceIndex()
    index.index(candidates)
    for count in (1, 3, 9):
        queries = grid(rng, (count, 4))
        found, scores = index.search(queries, k=4, exclude=[[0, 5]] * count)
        kept = np.ones((count, 1500), bool)
        kept[:, [0, 5]] = False
        positions, expected = reference(queries, candidates, 4, kept)
        np.testing.assert_array_equal(found, positions)
        np.testing.assert_array_equal(scores, expected)
    assert tiled


def test_usable_needs_room_for_the_chosen_blocks():
    assert _tiled_top_k.usable(2**20, 100, 1024, 2048)
    assert not _tiled_top_k.usable(4 * 2048 - 32, 1, 8, 2048)  # fewer than 4 tiles
    assert not _tiled_top_k.usable(2**20, 2**13 + 1, 8, 2048)  # k blocks over 1/4 of it
    assert not _tiled_top_k.usable(2**20, 10, 2**17, 2048)  # (query, block) keys over int32


def test_block_bits_against_a_python_set():
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 5, 300)
    positions = rng.integers(0, 4000, 300)
    keys, bits = _tiled_top_k.block_bits((rows, positions), 1024, 2048)
    expected = {}
    for row, position in zip(rows, positions, strict=True):
        if 1024 <= position < 3072:
            column = position - 1024
            key = row * 64 + column // 32
            expected[key] = expected.get(key, 0) | (1 << (column % 32))
    assert keys.tolist() == sorted(expected)
    assert bits.view("uint32").tolist() == [expected[key] for key in sorted(expected)]
    merged = _tiled_top_k.merged_bits((keys, bits), (keys[:3] + 1, bits[:3]))
    assert len(merged["block_keys"]) >= _tiled_top_k.KEY_GROUP
    assert np.all(np.diff(merged["block_keys"]) >= 0)


@st.composite
def cases(draw):
    chunk_size = draw(st.sampled_from([1024, 4096]))
    k = draw(st.sampled_from([1, 3, 8]))
    n = draw(st.integers(1024, 2600))
    num_queries = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    candidates = grid(rng, (n, 3), -1, 1)
    queries = grid(rng, (num_queries, 3), -1, 1)
    excluded = [
        rng.choice(n, draw(st.sampled_from([0, 1, 31, 500, n - k])), replace=False)
        for _ in range(num_queries)
    ]
    return chunk_size, k, candidates, queries, excluded


_indexes: dict[int, two_tower.BruteForceIndex] = {}


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_property_tiled_search_matches_numpy(case):
    chunk_size, k, candidates, queries, excluded = case
    backend = backend_module()
    tile, backend.search_tile = backend.search_tile, TILE
    try:
        if chunk_size not in _indexes:
            _indexes[chunk_size] = two_tower.BruteForceIndex(chunk_size=chunk_size)
        index = _indexes[chunk_size]
        index.index(candidates)
        found, scores = index.search(queries, k=k, exclude=[list(e) for e in excluded])
    finally:
        backend.search_tile = tile
    kept = np.ones((len(queries), len(candidates)), bool)
    for row, positions in enumerate(excluded):
        kept[row, positions] = False
    positions, expected = reference(queries, candidates, k, kept)
    np.testing.assert_array_equal(found, positions)
    np.testing.assert_array_equal(scores, expected)


@pytest.fixture(scope="module")
def float_catalogue():
    """Real-valued embeddings, whose scores depend on the order a product sums in,
    over 5 tiles of the backend's own size."""
    rng = np.random.default_rng(8)
    n = 5 * backend_module().search_tile + 100
    candidates = rng.normal(size=(n, 64)).astype("float32")
    queries = rng.normal(size=(256, 64)).astype("float32")
    return candidates, queries


def test_real_valued_scores_rank_the_same_on_both_paths(float_catalogue, monkeypatch):
    # Both passes must compute the same float32 scores (see `_tiled_top_k`): then the
    # tiled search equals scoring whole chunks, bit for bit, on real-valued data too.
    candidates, queries = float_catalogue
    index = two_tower.BruteForceIndex(query_batch_size=2**14)  # 256 rows a step either way
    index.index(candidates)
    found, scores = index.search(queries, k=20)
    whole(monkeypatch)
    whole_found, whole_scores = index.search(queries, k=20)
    np.testing.assert_array_equal(found, whole_found)
    np.testing.assert_array_equal(scores, whole_scores)


def test_excluding_other_candidates_leaves_a_ranking_unchanged(float_catalogue):
    # An exclusion scores its block again; with scores that differed from the first
    # pass by rounding, an unrelated exclusion could reorder the top k.
    candidates, queries = float_catalogue
    index = two_tower.BruteForceIndex()
    index.index(candidates)
    top, scores = index.search(queries, k=40)
    rng = np.random.default_rng(9)
    others = [rng.choice(len(candidates), 200, replace=False) for _ in top]
    exclude = [
        np.setdiff1d(np.concatenate([row[10:], more]), row[:10])
        for row, more in zip(top, others, strict=True)
    ]
    kept, kept_scores = index.search(queries, k=10, exclude=exclude)
    np.testing.assert_array_equal(kept, top[:, :10])
    np.testing.assert_array_equal(kept_scores, scores[:, :10])
