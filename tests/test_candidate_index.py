"""Both indexes are a `CandidateIndex`, and give the same answers to the same scenario."""

import importlib.util
import inspect

import keras
import numpy as np
import pytest

import two_tower
from testing import numpy_ranking, save_and_load
from two_tower.retrieval import CandidateIndex

NUM_CANDIDATES, NUM_QUERIES, DIM, K = 50, 5, 8, 5
HAS_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(
    not HAS_FAISS, reason="faiss is not installed (the `ann` extra): FaissIndex cannot index"
)


def exact_index():
    return two_tower.BruteForceIndex()


def flat_faiss_index():
    # One inverted list, probed whole: an exhaustive (exact) inner-product search.
    return two_tower.FaissIndex(nlist=1, nprobe=1)


INDEXES = [
    pytest.param(exact_index, id="BruteForceIndex"),
    pytest.param(flat_faiss_index, id="FaissIndex", marks=needs_faiss),
]


def scenario():
    """Gaussian rows: distinct scores, so the top k is unique and backends agree."""
    rng = np.random.default_rng(31)
    candidates = rng.standard_normal((NUM_CANDIDATES, DIM)).astype("float32")
    queries = rng.standard_normal((NUM_QUERIES, DIM)).astype("float32")
    ids = np.arange(NUM_CANDIDATES, dtype="int64") * 10 + 2**40
    return candidates, queries, ids


def protocol_members():
    return sorted(
        name
        for name, value in vars(CandidateIndex).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    )


@pytest.mark.parametrize("cls", [two_tower.BruteForceIndex, two_tower.FaissIndex])
def test_each_index_is_a_candidate_index_with_its_own_members_and_signatures(cls):
    # An explicit protocol base would lend its empty methods to a class that
    # lacked one, so each member must be the class's own.
    assert isinstance(cls(), CandidateIndex)
    members = protocol_members()
    assert members == ["candidate_ids", "index", "num_candidates", "positions_of", "search"]
    for name in members:
        own, declared = inspect.getattr_static(cls, name), vars(CandidateIndex)[name]
        assert own is not declared, f"{cls.__name__}.{name} is inherited from the protocol"
        if isinstance(declared, property):
            assert isinstance(own, property), name
            continue
        wanted = list(inspect.signature(declared).parameters.values())
        found = list(inspect.signature(own).parameters.values())
        # The protocol's parameters first, same names, kinds and defaults; extras optional.
        assert [(p.name, p.kind, p.default) for p in found[: len(wanted)]] == [
            (p.name, p.kind, p.default) for p in wanted
        ], f"{cls.__name__}.{name}{inspect.signature(own)}"
        assert all(p.default is not inspect.Parameter.empty for p in found[len(wanted) :])


@pytest.mark.parametrize("make_index", INDEXES)
def test_the_same_scenario_gives_the_numpy_top_k(make_index):
    candidates, queries, ids = scenario()
    index: CandidateIndex = make_index()
    assert index.num_candidates == 0 and index.candidate_ids is None
    index.index(candidates, ids)
    assert index.num_candidates == NUM_CANDIDATES
    np.testing.assert_array_equal(index.candidate_ids, ids)

    found, scores = index.search(queries, K)
    expected = numpy_ranking(queries, candidates, K, [()] * NUM_QUERIES)
    np.testing.assert_array_equal(found, ids[expected])
    np.testing.assert_allclose(
        scores, np.take_along_axis(queries @ candidates.T, expected, axis=1), rtol=1e-5, atol=1e-5
    )

    # Leaving out each query's best two (and nothing for the last query).
    excluded = [list(ids[row[:2]]) for row in expected[:-1]] + [None]
    found, _ = index.search(queries, K, exclude=excluded)
    skipped = [row[:2] for row in expected[:-1]] + [()]
    np.testing.assert_array_equal(found, ids[numpy_ranking(queries, candidates, K, skipped)])

    np.testing.assert_array_equal(index.positions_of(ids[[3, 0, 49]]), [3, 0, 49])
    np.testing.assert_array_equal(index.positions_of([7], ignore_unknown=True), [-1])
    with pytest.raises(ValueError, match="not in the indexed catalogue"):
        index.search(queries, K, exclude=[[7]] * NUM_QUERIES)
    found, _ = index.search(queries, K, exclude=[[7]] * NUM_QUERIES, ignore_unknown_exclusions=True)
    np.testing.assert_array_equal(found, ids[expected])


@needs_faiss
def test_both_indexes_agree_block_by_block_and_with_a_dot_product_similarity():
    candidates, queries, ids = scenario()
    blocks = [candidates[:17], candidates[17:40], candidates[40:]]
    exact, approximate = exact_index(), flat_faiss_index()
    exact.index(iter(blocks), ids)
    approximate.index(iter(blocks), ids)

    def dot(query_embeddings, candidate_embeddings):
        return keras.ops.matmul(query_embeddings, keras.ops.transpose(candidate_embeddings))

    np.testing.assert_array_equal(
        exact.search(queries, K, dot)[0], approximate.search(queries, K, dot)[0]
    )


@needs_faiss
def test_faiss_refuses_a_similarity_it_cannot_score():
    candidates, queries, ids = scenario()
    index = flat_faiss_index()
    index.index(candidates, ids)

    def scaled(query_embeddings, candidate_embeddings):
        return 20.0 * keras.ops.matmul(query_embeddings, keras.ops.transpose(candidate_embeddings))

    with pytest.raises(ValueError, match="inner product.*BruteForceIndex"):
        index.search(queries, K, scaled)


@needs_faiss
def test_a_model_serves_saves_and_loads_with_a_faiss_index(tmp_path):
    candidates, queries, ids = scenario()
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM),
        keras.layers.Embedding(NUM_CANDIDATES, DIM),
        candidate_index=two_tower.FaissIndex(nlist=4, target_recall=1.0, calibration_k=K),
    )
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    model.query_tower.embeddings.assign(queries)
    model.candidate_tower.embeddings.assign(candidates)
    model.index_candidates(np.arange(NUM_CANDIDATES), ids)
    nprobe = model.candidate_index.calibrated_nprobe
    assert nprobe is not None

    expected = numpy_ranking(queries, candidates, K, [()] * NUM_QUERIES)
    found = model.recommend(np.arange(NUM_QUERIES), k=K)
    np.testing.assert_array_equal(found, ids[expected])
    similar = model.similar_items(np.arange(3), k=K, item_ids=ids[:3])
    np.testing.assert_array_equal(
        similar, ids[numpy_ranking(candidates[:3], candidates, K, [[0], [1], [2]])]
    )

    loaded = save_and_load(model, tmp_path)
    assert isinstance(loaded.candidate_index, two_tower.FaissIndex)
    assert loaded.candidate_index.calibrated_nprobe == nprobe
    np.testing.assert_array_equal(loaded.recommend(np.arange(NUM_QUERIES), k=K), found)
    np.testing.assert_array_equal(
        loaded.similar_items(np.arange(3), k=K, item_ids=ids[:3]), similar
    )


@needs_faiss
def test_an_empty_faiss_index_saves_and_loads_empty(tmp_path):
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM),
        keras.layers.Embedding(NUM_CANDIDATES, DIM),
        candidate_index=two_tower.FaissIndex(nlist=4),
    )
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    loaded = save_and_load(model, tmp_path)
    assert loaded.candidate_index.num_candidates == 0
    assert loaded.candidate_index.get_config() == model.candidate_index.get_config()
