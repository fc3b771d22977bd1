"""Popularity and EASE against independent NumPy computations, on the evaluation protocol."""

import numpy as np
import pytest

import two_tower
from two_tower.evaluation import evaluate_retrieval


def ratings(seed=0, rows=300, users=40, items=15):
    rng = np.random.default_rng(seed)
    return rng.integers(0, users, rows), rng.integers(0, items, rows)


def ridge_columns(users, items, num_items, l2):
    """EASE by its definition: item j regressed on every other item, one column at a time."""
    x = np.zeros((users.max() + 1, num_items))
    x[users, items] = 1.0
    weights = np.zeros((num_items, num_items))
    for j in range(num_items):
        others = np.delete(np.arange(num_items), j)
        a = x[:, others]
        weights[others, j] = np.linalg.solve(a.T @ a + l2 * np.eye(len(others)), a.T @ x[:, j])
    return weights


@pytest.mark.parametrize("l2", [0.5, 40.0])
def test_ease_weights_match_per_column_ridge_regressions(l2):
    users, items = ratings()
    ease = two_tower.baselines.EASE(num_items=15, l2=l2).fit(users, items)
    np.testing.assert_allclose(ease.weights, ridge_columns(users, items, 15, l2), atol=1e-5)
    assert ease.weights.dtype == np.float32


def test_ease_counts_a_repeated_pair_once_and_takes_string_users():
    users, items = ratings(seed=1)
    once = two_tower.baselines.EASE(15, l2=3.0).fit(users, items)
    twice = two_tower.baselines.EASE(15, l2=3.0).fit(
        np.concatenate([users, users]).astype(str), np.concatenate([items, items])
    )
    np.testing.assert_allclose(twice.weights, once.weights, atol=1e-6)


def test_ease_scores_are_the_history_rows_summed_and_popularity_for_new_users():
    users, items = ratings(seed=2)
    ease = two_tower.baselines.EASE(15, l2=2.0).fit(users, items)
    histories = np.array([[3, 7, 3, -1], [-1, -1, -1, -1], [14, -1, -1, -1]])
    scores = ease.embed_histories(histories) @ ease.catalogue_embeddings().T
    np.testing.assert_allclose(scores[0], ease.weights[3] + ease.weights[7], atol=1e-6)
    np.testing.assert_allclose(scores[2], ease.weights[14], atol=1e-6)
    counts = np.bincount(items, minlength=15)
    np.testing.assert_allclose(scores[1], counts / counts.max(), atol=1e-6)


def test_popularity_counts_every_row():
    _, items = ratings(seed=3)
    popularity = two_tower.baselines.Popularity(20).fit(items)
    expected = np.array([np.sum(items == i) for i in range(20)])
    np.testing.assert_array_equal(popularity.counts, expected)
    scores = popularity.embed_histories(np.zeros((4, 2), int)) @ (
        popularity.catalogue_embeddings().T
    )
    np.testing.assert_array_equal(scores, np.tile(expected, (4, 1)))


def test_ease_ranks_on_the_evaluation_protocol_as_numpy_does():
    """Top-k accuracy through a function `query_embeddings`, against a NumPy ranking.

    A hit at k: fewer than k items outside the query's exclusions score
    strictly above the positive (ties count in the positive's favour, and the
    positive itself is never excluded, as in `FactorizedTopK`).
    """
    users, items = ratings(seed=4, rows=400, users=30, items=25)
    ease = two_tower.baselines.EASE(25, l2=5.0).fit(users[:300], items[:300])
    log = two_tower.InteractionLog(users, items, np.arange(400))
    queries = np.arange(300, 400)
    histories = log.history(users[queries], queries, width=None)
    excluded_rows, excluded_items = log.interactions_before(users[queries], queries)
    found = evaluate_retrieval(
        lambda rows: ease.embed_histories(histories[rows]),
        ease.catalogue_embeddings(),
        np.arange(100),
        items[queries],
        exclude_query_ids=excluded_rows,
        exclude_candidate_ids=excluded_items,
        ks=(1, 5),
        batch_size=7,
        num_queries=100,
    )["unseen"]
    scores = ease.embed_histories(histories).astype(np.float64) @ ease.catalogue_embeddings().T
    hits = {1: [], 5: []}
    for row in range(100):
        target = items[queries[row]]
        excluded = set(excluded_items[excluded_rows == row]) - {target}
        above = sum(
            1
            for j in range(25)
            if j not in excluded and scores[row, j] > scores[row, target] + 1e-6
        )
        for k in hits:
            hits[k].append(above < k)
    for k in hits:
        assert found[f"accuracy_at_{k}"] == pytest.approx(np.mean(hits[k]), abs=1e-6)


def test_function_query_embeddings_match_the_array_form():
    rng = np.random.default_rng(5)
    queries, catalogue = rng.normal(size=(12, 4)), rng.normal(size=(30, 4))
    test_queries, test_items = rng.integers(0, 12, 50), rng.integers(0, 30, 50)
    # Same batches on both sides: the metric sums in float32, so other batch sizes may
    # differ in the last bit.
    array = evaluate_retrieval(
        queries, catalogue, test_queries, test_items, ks=(1, 5), batch_size=16
    )
    calls = []

    def embed(rows):
        calls.append(len(rows))
        return queries[rows]

    function = evaluate_retrieval(
        embed, catalogue, test_queries, test_items, ks=(1, 5), batch_size=16, num_queries=12
    )
    assert function == array
    assert calls == [16, 16, 16, 2]


def test_function_query_embeddings_bad_input():
    catalogue, ids = np.ones((3, 2)), np.array([0, 1])
    with pytest.raises(ValueError, match="`num_queries` must be a positive integer"):
        evaluate_retrieval(lambda rows: np.ones((len(rows), 2)), catalogue, ids, ids)
    with pytest.raises(ValueError, match=r"must return \[batch, dim\] for a batch of 2"):
        evaluate_retrieval(lambda rows: np.ones((1, 2)), catalogue, ids, ids, num_queries=2)
    with pytest.raises(ValueError, match="`test_query_ids` must lie in"):
        evaluate_retrieval(lambda rows: np.ones((2, 2)), catalogue, ids, ids, num_queries=1)
    with pytest.raises(ValueError, match="differs from the 4 rows"):
        evaluate_retrieval(np.ones((4, 2)), catalogue, ids, ids, num_queries=3)


def test_ease_refuses_large_catalogues_before_allocating():
    with pytest.raises(ValueError, match=r"num_items=100000 would need about 160 GB"):
        two_tower.baselines.EASE(100_000)
    with pytest.raises(ValueError, match="above max_items=10"):
        two_tower.baselines.EASE(11, max_items=10)
    assert two_tower.baselines.EASE(11, max_items=11).num_items == 11


def fitted_ease():
    return two_tower.baselines.EASE(5).fit(np.array([0, 1]), np.array([2, 3]))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: two_tower.baselines.EASE(0), "`num_items` must be an integer >= 1"),
        (lambda: two_tower.baselines.EASE(5, l2=0.0), "`l2` must be a finite number > 0"),
        (lambda: two_tower.baselines.EASE(5, l2=np.nan), "`l2` must be a finite number > 0"),
        (lambda: two_tower.baselines.Popularity(True), "`num_items` must be an integer >= 1"),
        (
            lambda: two_tower.baselines.EASE(5).fit(np.array([1, 2]), np.array([1])),
            "same length",
        ),
        (
            lambda: two_tower.baselines.EASE(5).fit(np.array([1]), np.array([5])),
            r"must lie in \[0, 5\)",
        ),
        (
            lambda: two_tower.baselines.Popularity(5).fit(np.array([1.0])),
            "integer item indices",
        ),
        (
            lambda: fitted_ease().embed_histories(np.array([1, 2])),
            r"must be \[queries, width\] integer",
        ),
        (
            lambda: fitted_ease().embed_histories(np.array([[5]])),
            r"in \[0, 5\) or -1 padding",
        ),
    ],
)
def test_baselines_reject_bad_input(build, message):
    with pytest.raises(ValueError, match=message):
        build()
