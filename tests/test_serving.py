"""Serving: recommend with exclusions and item-to-item, against NumPy."""

import keras
import numpy as np
import pytest

import testing
import two_tower
from testing import numpy_ranking

NUM_USERS, NUM_ITEMS, DIM = 9, 40, 4


def integer_model(seed=0):
    """An id model whose tables hold small integers: exact scores, many ties."""
    return testing.integer_model(NUM_USERS, NUM_ITEMS, DIM, seed)


def test_recommend_with_exclusions_matches_numpy():
    model, users, items = integer_model()
    item_ids = np.arange(NUM_ITEMS, dtype="int64") * 1000 + 7
    model.index_candidates(np.arange(NUM_ITEMS), item_ids)
    rng = np.random.default_rng(1)
    seen = [rng.choice(NUM_ITEMS, size=rng.integers(0, 30), replace=False) for _ in range(6)]
    queries = np.arange(6)
    found, scores = model.recommend(
        queries, k=8, exclude=[item_ids[s] for s in seen], return_scores=True
    )
    expected = numpy_ranking(users[queries], items, 8, seen)
    np.testing.assert_array_equal(found, item_ids[expected])
    np.testing.assert_array_equal(
        scores, np.take_along_axis(users[queries] @ items.T, expected, axis=1)
    )


def test_similar_items_leaves_the_item_out_and_matches_numpy():
    model, _, items = integer_model(seed=2)
    model.index_candidates(np.arange(NUM_ITEMS))
    queries = np.array([0, 5, 39])
    found = model.similar_items(queries, k=6, exclude=[[1, 2], None, [38]])
    expected = numpy_ranking(items[queries], items, 6, [[0, 1, 2], [5], [39, 38]])
    np.testing.assert_array_equal(found, expected)
    kept = model.similar_items(queries, k=6, exclude_self=False)
    np.testing.assert_array_equal(kept, numpy_ranking(items[queries], items, 6, [[], [], []]))


def test_similar_items_with_a_second_item_tower():
    model, _, items = integer_model(seed=3)
    model.index_candidates(np.arange(NUM_ITEMS), np.array([f"m{i}" for i in range(NUM_ITEMS)]))
    other = keras.layers.Embedding(NUM_ITEMS, DIM)
    other.build((None,))
    other_table = np.random.default_rng(4).integers(-2, 3, (NUM_ITEMS, DIM)).astype("float32")
    other.embeddings.assign(other_table)
    found = model.similar_items(
        np.array([4, 7]), k=5, item_tower=other, item_ids=np.array(["m4", "m7"])
    )
    expected = numpy_ranking(other_table[[4, 7]], items, 5, [[4], [7]])
    assert found.tolist() == [[f"m{i}" for i in row] for row in expected]


def test_similar_items_bad_input_raises():
    model, _, _ = integer_model()
    with pytest.raises(ValueError, match="No candidates are indexed"):
        model.similar_items(np.array([1]))
    model.index_candidates(np.arange(NUM_ITEMS))
    with pytest.raises(ValueError, match="one entry per item: 2 items, received 1"):
        model.similar_items(np.array([1, 2]), exclude=[[3]])
    with pytest.raises(ValueError, match="not in the indexed catalogue"):
        model.similar_items(np.array([1]), exclude=[[NUM_ITEMS + 5]])
    with pytest.raises(ValueError, match="one id per item"):
        model.similar_items(np.array([1, 2]), item_ids=np.array([1]))
    with pytest.raises(ValueError, match=r"`k` \(=41\) must not exceed"):
        model.similar_items(np.array([1]), k=41)
    with pytest.raises(ValueError, match=r"excludes 40 of 40 candidates"):
        model.similar_items(np.array([1]), k=1, exclude=[list(range(NUM_ITEMS))])


def test_recommend_exclusion_errors_name_the_problem():
    model, _, _ = integer_model()
    model.index_candidates(np.arange(NUM_ITEMS))
    with pytest.raises(ValueError, match=r"e.g. \[99\]"):
        model.recommend(np.array([0]), k=3, exclude=[[99]])
    found = model.recommend(np.array([0]), k=3, exclude=[[99]], ignore_unknown_exclusions=True)
    np.testing.assert_array_equal(found, model.recommend(np.array([0]), k=3))


@keras.saving.register_keras_serializable(package="two_tower_tests")
class ScaledRetrieval(two_tower.TwoTowerRetrieval):
    """Scores scaled by a variable: the compiled search step must read it live."""

    def build(self, input_shape=None):
        if not hasattr(self, "scale"):
            self.scale = self.add_weight(shape=(), initializer="ones", name="scale")
        super().build(input_shape)

    def compute_similarities(self, query_embeddings, candidate_embeddings):
        scores = super().compute_similarities(query_embeddings, candidate_embeddings)
        return scores * self.scale


def test_search_reads_the_scoring_variables_of_the_model_live():
    model = ScaledRetrieval(
        keras.layers.Embedding(NUM_USERS, DIM), keras.layers.Embedding(NUM_ITEMS, DIM)
    )
    model.build()
    model.index_candidates(np.arange(NUM_ITEMS))
    found, scores = model.recommend(np.arange(3), k=5, return_scores=True)
    model.scale.assign(-2.0)  # flips the ranking and doubles the scores
    flipped, flipped_scores = model.recommend(np.arange(3), k=5, return_scores=True)
    users = keras.ops.convert_to_numpy(model.query_tower.embeddings)[:3]
    items = keras.ops.convert_to_numpy(model.candidate_tower.embeddings)
    expected = users @ items.T * -2.0
    np.testing.assert_array_equal(flipped, np.argsort(-expected, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(
        flipped_scores, np.sort(expected, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-6
    )
    assert not np.array_equal(found, flipped)


def test_empty_catalogue_and_items_raise():
    model, _, _ = integer_model()
    with pytest.raises(ValueError, match="0 rows: cannot index an empty catalogue"):
        model.index_candidates(np.zeros(0, "int32"))
    model.index_candidates(np.arange(NUM_ITEMS))
    with pytest.raises(ValueError, match="`items` has 0 rows"):
        model.similar_items(np.zeros(0, "int32"))


def test_recommend_takes_a_generator_of_query_batches():
    model, _, _ = integer_model()
    model.index_candidates(np.arange(NUM_ITEMS))
    batches = (np.arange(start, min(start + 4, NUM_USERS)) for start in range(0, NUM_USERS, 4))
    np.testing.assert_array_equal(
        model.recommend(batches, k=5), model.recommend(np.arange(NUM_USERS), k=5)
    )
    with pytest.raises(ValueError, match="`queries` yielded no batches"):
        model.recommend(iter([]), k=5)
