import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip


def numpy_top_k(queries, candidates, k):
    scores = queries.astype("float64") @ candidates.astype("float64").T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50, 65_536])
def test_search_matches_numpy(chunk_size):
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(50, 8)).astype("float32")
    queries = rng.normal(size=(6, 8)).astype("float32")
    ids = rng.permutation(1000)[:50].astype("int64")
    index = two_tower.BruteForceIndex(chunk_size=chunk_size)
    index.index(candidates, ids)
    scores, found = index.search(queries, k=5)
    expected_scores, expected_positions = numpy_top_k(queries, candidates, 5)
    np.testing.assert_array_equal(found, ids[expected_positions])
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_int64_ids_above_2_31_come_back_intact():
    ids = np.array([2**31 + 7, 2**40 + 1, 2**62 + 3], dtype="int64")
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"), ids)
    _, found = index.search(np.eye(3, dtype="float32")[::-1], k=1)
    assert found.dtype == np.int64
    np.testing.assert_array_equal(found[:, 0], ids[::-1])


def test_string_ids():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(2, dtype="float32"), np.array(["a", "b"], dtype=object))
    _, found = index.search(np.array([[0.0, 1.0]], "float32"), k=2)
    assert found.tolist() == [["b", "a"]]


def test_reindex_with_a_different_size():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"))
    index.index(np.eye(5, dtype="float32"))
    assert index.num_candidates == 5
    _, found = index.search(np.eye(5, dtype="float32"), k=1)
    np.testing.assert_array_equal(found[:, 0], np.arange(5))


def test_config_round_trip():
    restored = assert_config_round_trip(two_tower.BruteForceIndex(chunk_size=17))
    assert restored.chunk_size == 17


@pytest.mark.parametrize(
    ("embeddings", "ids", "match"),
    [
        (np.zeros((0, 4), "float32"), None, "empty catalogue"),
        (np.zeros((4,), "float32"), None, "2D"),
        (np.eye(3, dtype="float32"), np.array([1, 2, 2]), r"unique.*\[2\]"),
        (np.eye(3, dtype="float32"), np.array([1, 2]), "one id per embedding"),
        (np.full((2, 2), np.nan, "float32"), None, "NaN"),
    ],
)
def test_bad_catalogue_raises(embeddings, ids, match):
    with pytest.raises(ValueError, match=match):
        two_tower.BruteForceIndex().index(embeddings, ids)


def test_bad_queries_raise():
    index = two_tower.BruteForceIndex()
    with pytest.raises(ValueError, match="index is empty"):
        index.search(np.ones((1, 3), "float32"), k=1)
    index.index(np.eye(3, dtype="float32"))
    with pytest.raises(
        ValueError, match=r"`k` \(=4\) must not exceed the number of candidates \(=3\)"
    ):
        index.search(np.ones((1, 3), "float32"), k=4)
    with pytest.raises(ValueError, match="positive integer"):
        index.search(np.ones((1, 3), "float32"), k=0)
    with pytest.raises(ValueError, match=r"\[queries, 3\].*\(1, 4\)"):
        index.search(np.ones((1, 4), "float32"), k=1)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        two_tower.BruteForceIndex(chunk_size=chunk_size)


def test_object_ids_keep_their_kind():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"), np.array([10, 20, 2**40], dtype=object))
    assert index.candidate_ids.dtype == np.int64
    _, found = index.search(np.eye(3, dtype="float32"), k=1)
    assert found[:, 0].tolist() == [10, 20, 2**40]
    with pytest.raises(ValueError, match="all integers or all strings"):
        index.index(np.eye(2, dtype="float32"), np.array([1, "1"], dtype=object))
    with pytest.raises(ValueError, match="fit in int64"):
        index.index(np.eye(2, dtype="float32"), np.array([1, 2**70], dtype=object))
    with pytest.raises(ValueError, match="integers or strings"):
        index.index(np.eye(2, dtype="float32"), np.array([0.5, 1.5]))
