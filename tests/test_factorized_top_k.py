import keras
import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip

KS = (1, 3, 10)


def numpy_metrics(queries, catalogue, positives, query_ids, excluded=None, ks=KS):
    """Independent reference: full score matrix, ranks by counting, per-query recall."""
    scores = queries.astype("float64") @ catalogue.astype("float64").T
    if excluded is not None:
        scores = np.where(excluded[query_ids], -np.inf, scores)
    rows = np.arange(len(positives))
    positive_scores = queries.astype("float64") @ catalogue.astype("float64")[positives].T
    positive_scores = positive_scores[rows, rows]
    beats = scores > positive_scores[:, None]
    beats[rows, positives] = False
    rank = beats.sum(axis=1)
    out = {}
    for k in ks:
        hit = rank < k
        out[f"accuracy_at_{k}"] = hit.mean()
        out[f"ndcg_at_{k}"] = np.where(hit, 1 / np.log2(rank + 2), 0).mean()
        per_query = [hit[query_ids == q].mean() for q in np.unique(query_ids)]
        out[f"recall_at_{k}"] = np.mean(per_query)
    return out


def random_problem(seed=0, batch=40, catalogue_size=30, num_queries=8, dim=6):
    rng = np.random.default_rng(seed)
    catalogue = rng.normal(size=(catalogue_size, dim)).astype("float32")
    query_table = rng.normal(size=(num_queries, dim)).astype("float32")
    query_ids = rng.integers(0, num_queries, batch)
    positives = rng.integers(0, catalogue_size, batch)
    return rng, catalogue, query_table, query_ids, positives


@pytest.mark.parametrize("chunk_size", [1, 7, 65_536])
@pytest.mark.parametrize("exclude", [False, True])
def test_matches_numpy_in_two_batches(chunk_size, exclude):
    rng, catalogue, query_table, query_ids, positives = random_problem()
    excluded = None
    kwargs = {}
    if exclude:
        seen_q = rng.integers(0, 8, 60)
        seen_c = rng.integers(0, 30, 60)
        excluded = np.zeros((8, 30), bool)
        excluded[seen_q, seen_c] = True
        kwargs = {"exclude_query_ids": seen_q, "exclude_candidate_ids": seen_c}
    metric = two_tower.FactorizedTopK(
        ks=KS, num_queries=8, catalogue_size=30, chunk_size=chunk_size, name="m", **kwargs
    )
    for part in (slice(0, 25), slice(25, 40)):  # streaming over batches
        metric.update_state(
            query_table[query_ids[part]], catalogue, positives[part], query_ids=query_ids[part]
        )
    result = {k[2:]: float(v) for k, v in metric.result().items()}
    expected = numpy_metrics(query_table[query_ids], catalogue, positives, query_ids, excluded)
    assert sorted(result) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(result[key], value, atol=1e-6, err_msg=key)


def test_exclusion_lifts_a_positive_above_seen_items():
    catalogue = np.eye(3, dtype="float32")
    query = np.array([[3.0, 2.0, 1.0]], "float32")  # positive is item 2, ranked last
    plain = two_tower.FactorizedTopK(ks=(1,), num_queries=1, catalogue_size=3)
    excluding = two_tower.FactorizedTopK(
        ks=(1,),
        num_queries=1,
        catalogue_size=3,
        exclude_query_ids=[0, 0],
        exclude_candidate_ids=[0, 1],
    )
    for metric in (plain, excluding):
        metric.update_state(query, catalogue, np.array([2]), query_ids=np.array([0]))
    assert float(plain.result()["top_k_accuracy_at_1"]) == 0.0
    assert float(excluding.result()["top_k_accuracy_at_1"]) == 1.0


def test_reset_and_config_round_trip():
    metric = two_tower.FactorizedTopK(ks=(2, 4), num_queries=3, catalogue_size=5, chunk_size=2)
    metric.update_state(np.ones((1, 2), "float32"), np.ones((5, 2), "float32"), [0], [0])
    metric.reset_state()
    assert float(metric.result()["top_k_accuracy_at_2"]) == 0.0
    restored = assert_config_round_trip(metric)
    assert restored.ks == (2, 4) and restored.chunk_size == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ks": (0, 5)}, "`ks`"),
        ({"ks": ()}, "`ks`"),
        ({"exclude_query_ids": [0]}, "both"),
        ({"exclude_query_ids": [0], "exclude_candidate_ids": [0]}, "num_queries"),
        (
            {
                "num_queries": 2,
                "catalogue_size": 3,
                "exclude_query_ids": [0],
                "exclude_candidate_ids": [5],
            },
            r"exclude_candidate_ids.*\[0, 3\)",
        ),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_tower.FactorizedTopK(**kwargs)


def test_query_ids_required_for_recall():
    metric = two_tower.FactorizedTopK(ks=(1,), num_queries=2, catalogue_size=2)
    with pytest.raises(ValueError, match="query_ids"):
        metric.update_state(np.ones((1, 2), "float32"), np.eye(2, dtype="float32"), [0])


def test_model_evaluate_reports_metrics_matching_numpy():
    num_queries, catalogue_size, dim = 8, 30, 6
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(num_queries, dim),
        keras.layers.Embedding(catalogue_size, dim),
        loss="full_softmax",
        catalogue_size=catalogue_size,
    )
    rng = np.random.default_rng(3)
    train = {"query": rng.integers(0, 8, 64), "candidate": rng.integers(0, 30, 64)}
    test = {"query": rng.integers(0, 8, 40), "candidate": rng.integers(0, 30, 40)}
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        metrics=[
            two_tower.FactorizedTopK(ks=KS, num_queries=8, catalogue_size=30, name="all"),
            two_tower.FactorizedTopK(
                ks=KS,
                num_queries=8,
                catalogue_size=30,
                exclude_query_ids=train["query"],
                exclude_candidate_ids=train["candidate"],
                name="unseen",
            ),
        ],
    )
    history = model.fit(train, batch_size=16, epochs=2, verbose=0, validation_data=(test,))
    assert "val_unseen_accuracy_at_10" in history.history
    assert not any(key.startswith(("all_", "unseen_")) for key in history.history)
    results = model.evaluate(test, batch_size=16, verbose=0, return_dict=True)

    query_table = keras.ops.convert_to_numpy(model.query_tower.embeddings)
    catalogue = keras.ops.convert_to_numpy(model.candidate_tower.embeddings)
    excluded = np.zeros((8, 30), bool)
    excluded[train["query"], train["candidate"]] = True
    for prefix, table in (("all", None), ("unseen", excluded)):
        expected = numpy_metrics(
            query_table[test["query"]], catalogue, test["candidate"], test["query"], table
        )
        for key, value in expected.items():
            np.testing.assert_allclose(results[f"{prefix}_{key}"], value, atol=1e-5, err_msg=key)


def test_metrics_need_a_catalogue_size():
    model = two_tower.TwoTowerRetrieval(keras.layers.Embedding(3, 2), keras.layers.Embedding(3, 2))
    with pytest.raises(ValueError, match="catalogue_size"):
        model.compile(optimizer="adam", metrics=[two_tower.FactorizedTopK()])


def numpy_ranks(queries, catalogue, positives, query_ids, excluded_pairs, block=2000):
    """Dense NumPy ranks, a block of pairs at a time: candidates scoring above the positive."""
    excluded = {}
    for q, c in zip(*excluded_pairs, strict=True):
        excluded.setdefault(int(q), set()).add(int(c))
    ranks = []
    for start in range(0, len(positives), block):
        rows = slice(start, start + block)
        scores = queries[rows].astype("float64") @ catalogue.astype("float64").T
        for i, q in enumerate(query_ids[rows]):
            for c in excluded.get(int(q), ()):
                scores[i, c] = -np.inf
        # The positive's own score, even when the query excluded it.
        positive = np.einsum("ij,ij->i", queries[rows], catalogue[positives[rows]])
        beats = scores > positive[:, None]
        beats[np.arange(scores.shape[0]), positives[rows]] = False
        ranks.append(beats.sum(axis=1))
    return np.concatenate(ranks)


def metrics_from_ranks(rank, query_ids, ks):
    out = {}
    for k in ks:
        hit = rank < k
        out[f"accuracy_at_{k}"] = hit.mean()
        out[f"ndcg_at_{k}"] = np.where(hit, 1 / np.log2(rank + 2), 0).mean()
        out[f"recall_at_{k}"] = np.mean([hit[query_ids == q].mean() for q in np.unique(query_ids)])
    return out


def test_exclusions_take_memory_per_pair_not_queries_times_catalogue():
    """10^5 queries x 2*10^5 candidates: a dense exclusion table would take 20 GB."""
    num_queries, catalogue_size, dim = 100_000, 200_000, 4
    rng = np.random.default_rng(11)
    catalogue = rng.integers(-2, 3, (catalogue_size, dim)).astype("float32")
    busy = rng.choice(num_queries, 50, replace=False)
    seen_q = rng.choice(busy, 3000)
    seen_c = rng.integers(0, catalogue_size, 3000)
    seen_q, seen_c = np.concatenate([seen_q, seen_q[:100]]), np.concatenate([seen_c, seen_c[:100]])
    metric = two_tower.FactorizedTopK(
        ks=(10, 1000),
        num_queries=num_queries,
        catalogue_size=catalogue_size,
        exclude_query_ids=seen_q,
        exclude_candidate_ids=seen_c,
        chunk_size=50_000,
    )
    stored = sum(
        int(np.prod(t.shape)) for t in (metric._exclusion_offsets, metric._exclusion_candidates)
    )
    assert stored <= num_queries + 1 + 3000
    query_ids = rng.choice(busy, 64)
    queries = rng.integers(-2, 3, (64, dim)).astype("float32")
    # Positives the users also saw: excluding them must not remove the pair.
    positives = np.where(np.arange(64) % 2 == 0, rng.integers(0, catalogue_size, 64), 0)
    for i in range(0, 64, 2):
        matches = seen_c[seen_q == query_ids[i]]
        positives[i + 1] = matches[0]
        query_ids[i + 1] = query_ids[i]
    metric.update_state(queries, catalogue, positives, query_ids=query_ids)
    rank = numpy_ranks(queries, catalogue, positives, query_ids, (seen_q, seen_c))
    expected = metrics_from_ranks(rank, query_ids, (10, 1000))
    results = {k[len("top_k_") :]: float(v) for k, v in metric.result().items()}
    for key, value in expected.items():
        np.testing.assert_allclose(results[key], value, atol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.real_data
def test_sparse_exclusions_equal_the_dense_figures_on_movielens(real_data_dir):
    from two_tower.datasets import movielens

    ratings = movielens.load_ratings(real_data_dir)
    users = ratings["user_id"].astype("int32")
    movies = ratings["movie_id"].astype("int32") - 1
    train, test = movielens.random_split({"u": users, "m": movies}, test_fraction=0.2, seed=42)
    rng = np.random.default_rng(0)
    # Integer embeddings: every score is exact in float32, so ranks match exactly.
    query_table = rng.integers(-2, 3, (944, 8)).astype("float32")
    catalogue = rng.integers(-2, 3, (1682, 8)).astype("float32")
    ks = (10, 100)
    results = two_tower.evaluation.evaluate_retrieval(
        query_table,
        catalogue,
        test["u"],
        test["m"],
        exclude_query_ids=train["u"],
        exclude_candidate_ids=train["m"],
        ks=ks,
    )["unseen"]
    rank = numpy_ranks(
        query_table[test["u"]], catalogue, test["m"], test["u"], (train["u"], train["m"])
    )
    for key, value in metrics_from_ranks(rank, test["u"], ks).items():
        np.testing.assert_allclose(results[key], value, atol=1e-6, err_msg=key)
