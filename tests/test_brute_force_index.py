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
    found, scores = index.search(queries, k=5)
    expected_scores, expected_positions = numpy_top_k(queries, candidates, 5)
    np.testing.assert_array_equal(found, ids[expected_positions])
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_int64_ids_above_2_31_come_back_intact():
    ids = np.array([2**31 + 7, 2**40 + 1, 2**62 + 3], dtype="int64")
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"), ids)
    found, _ = index.search(np.eye(3, dtype="float32")[::-1], k=1)
    assert found.dtype == np.int64
    np.testing.assert_array_equal(found[:, 0], ids[::-1])


def test_string_ids():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(2, dtype="float32"), np.array(["a", "b"], dtype=object))
    found, _ = index.search(np.array([[0.0, 1.0]], "float32"), k=2)
    assert found.tolist() == [["b", "a"]]


def test_reindex_with_a_different_size():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"))
    index.index(np.eye(5, dtype="float32"))
    assert index.num_candidates == 5
    found, _ = index.search(np.eye(5, dtype="float32"), k=1)
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


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, 2**24 + 1])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        two_tower.BruteForceIndex(chunk_size=chunk_size)


def test_object_ids_keep_their_kind():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"), np.array([10, 20, 2**40], dtype=object))
    assert index.candidate_ids.dtype == np.int64
    found, _ = index.search(np.eye(3, dtype="float32"), k=1)
    assert found[:, 0].tolist() == [10, 20, 2**40]
    with pytest.raises(ValueError, match="all integers or all strings"):
        index.index(np.eye(2, dtype="float32"), np.array([1, "1"], dtype=object))
    with pytest.raises(ValueError, match="fit in int64"):
        index.index(np.eye(2, dtype="float32"), np.array([1, 2**70], dtype=object))
    with pytest.raises(ValueError, match="integers or strings"):
        index.index(np.eye(2, dtype="float32"), np.array([0.5, 1.5]))


def numpy_exact(queries, candidates, k, exclude_positions=None):
    """Top k by (score desc, position asc) in float64; excluded positions skipped."""
    scores = queries.astype("float64") @ candidates.astype("float64").T
    results = []
    for row in range(len(queries)):
        keep = np.ones(len(candidates), bool)
        if exclude_positions is not None:
            keep[list(exclude_positions[row])] = False
        positions = np.flatnonzero(keep)
        order = np.lexsort((positions, -scores[row, positions]))[:k]
        results.append(positions[order])
    positions = np.array(results)
    return np.take_along_axis(scores, positions, axis=1), positions


def tied_catalogue(seed=0, num_candidates=300, dim=4):
    """Small-integer embeddings: exact dot products with many equal scores."""
    rng = np.random.default_rng(seed)
    candidates = rng.integers(-1, 2, size=(num_candidates, dim)).astype("float32")
    queries = rng.integers(-1, 2, size=(37, dim)).astype("float32")
    return queries, candidates


@pytest.mark.parametrize(
    ("chunk_size", "k"),
    [(1, 1), (7, 10), (7, 100), (64, 10), (64, 100), (300, 100), (65_536, 1), (65_536, 100)],
)
def test_ties_break_to_the_lower_position_on_every_backend(chunk_size, k):
    queries, candidates = tied_catalogue()
    index = two_tower.BruteForceIndex(chunk_size=chunk_size, query_batch_size=8)
    index.index(candidates)
    found, scores = index.search(queries, k=k)
    expected_scores, expected_positions = numpy_exact(queries, candidates, k)
    np.testing.assert_array_equal(found, expected_positions)
    np.testing.assert_array_equal(scores, expected_scores)


def test_all_equal_scores_come_back_in_position_order():
    index = two_tower.BruteForceIndex(chunk_size=5)
    index.index(np.ones((23, 3), "float32"), np.arange(100, 123))
    found, _ = index.search(np.ones((2, 3), "float32"), k=12)
    np.testing.assert_array_equal(found, np.tile(np.arange(100, 112), (2, 1)))


def test_negative_zero_ties_with_zero():
    candidates = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "float32")
    index = two_tower.BruteForceIndex()
    index.index(candidates)
    # Scores: [-0.0 (0*-1 + -1*0 ...), 0.0, -1.0]: position 0 (-0.0) and 1 (+0.0) tie.
    found, _ = index.search(np.array([[-0.0, -1.0]], "float32"), k=3)
    np.testing.assert_array_equal(found, [[0, 1, 2]])


def test_stable_top_k_against_numpy():
    from two_tower.retrieval.top_k import stable_top_k

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(9, 50)).astype("float32")
    values, columns = stable_top_k(scores, 20)
    expected = np.array([np.lexsort((np.arange(50), -row))[:20] for row in scores])
    np.testing.assert_array_equal(np.asarray(columns), expected)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(scores, expected, 1))


@pytest.mark.parametrize("chunk_size", [13, 64, 65_536])
def test_exclusions_are_exact_even_when_most_are_excluded(chunk_size):
    queries, candidates = tied_catalogue(seed=1, num_candidates=120)
    rng = np.random.default_rng(5)
    ids = rng.permutation(10_000)[:120].astype("int64")
    excluded_positions = [
        rng.choice(120, size=rng.integers(0, 110), replace=False) for _ in queries
    ]
    index = two_tower.BruteForceIndex(chunk_size=chunk_size, query_batch_size=16)
    index.index(candidates, ids)
    exclude = [ids[p].tolist() + ids[p[:3]].tolist() for p in excluded_positions]  # repeats ok
    found, scores = index.search(queries, k=10, exclude=exclude)
    expected_scores, expected_positions = numpy_exact(queries, candidates, 10, excluded_positions)
    np.testing.assert_array_equal(found, ids[expected_positions])
    np.testing.assert_array_equal(scores, expected_scores)


def test_exclusions_with_string_ids_and_none_entries():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32") + 0.5, np.array(["a", "b", "c"]))
    query = np.array([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]], "float32")
    found, _ = index.search(query, k=2, exclude=[["a"], None])
    assert found.tolist() == [["b", "c"], ["a", "b"]]


def test_bad_exclusions_raise():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"), np.array([10, 20, 30]))
    queries = np.eye(3, dtype="float32")[:2]
    with pytest.raises(ValueError, match=r"one entry per query: 2 queries, received 1"):
        index.search(queries, k=1, exclude=[[10]])
    with pytest.raises(ValueError, match=r"not in the indexed catalogue, e.g. \[99\]"):
        index.search(queries, k=1, exclude=[[99], []])
    found, _ = index.search(queries, k=1, exclude=[[99, 10], []], ignore_unknown_exclusions=True)
    assert found[:, 0].tolist() == [20, 20]
    with pytest.raises(ValueError, match=r"Query 1 excludes 2 of 3 candidates.*k=2"):
        index.search(queries, k=2, exclude=[[], [10, 20]])
    with pytest.raises(ValueError, match="dtype"):
        index.search(queries, k=1, exclude=[["x"], []])
    with pytest.raises(ValueError, match="one sequence of ids"):
        index.search(queries, k=1, exclude="abc")


def test_non_finite_queries_raise():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(2, dtype="float32"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(np.array([[np.nan, 1.0]], "float32"), k=1)


def test_positions_of():
    index = two_tower.BruteForceIndex()
    index.index(np.eye(3, dtype="float32"), np.array([30, 10, 20]))
    assert index.positions_of([10, 30, 20]).tolist() == [1, 0, 2]
    assert index.positions_of([5, 20], ignore_unknown=True).tolist() == [-1, 2]


def test_many_queries_are_batched():
    queries, candidates = tied_catalogue(seed=2)
    queries = np.concatenate([queries] * 5)
    index = two_tower.BruteForceIndex(chunk_size=50, query_batch_size=13)
    index.index(candidates)
    found, _ = index.search(queries, k=5)
    np.testing.assert_array_equal(found, numpy_exact(queries, candidates, 5)[1])


def test_index_keeps_its_own_copy_of_the_catalogue():
    catalogue = np.eye(3, dtype="float32")
    ids = np.array([7, 8, 9])
    index = two_tower.BruteForceIndex()
    index.index(catalogue, ids)
    catalogue[:] = 0.0
    ids[:] = 0
    found, _ = index.search(np.eye(3, dtype="float32"), k=1)
    assert found[:, 0].tolist() == [7, 8, 9]


def test_calling_the_layer_with_more_queries_than_a_step_holds():
    # A chunk scored whole takes query_batch_size / 32 queries a step: 300 need several.
    rng = np.random.default_rng(11)
    candidates = rng.integers(-2, 3, (100, 4)).astype("float32")
    queries = rng.integers(-2, 3, (300, 4)).astype("float32")
    index = two_tower.BruteForceIndex(chunk_size=64, query_batch_size=256)
    index.index(candidates)
    scores, positions = index(queries, k=3)
    expected_scores, expected_positions = numpy_exact(queries, candidates, 3)
    np.testing.assert_array_equal(np.asarray(positions), expected_positions)
    np.testing.assert_array_equal(np.asarray(scores), expected_scores)
