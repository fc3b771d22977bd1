"""Round two of the bad-input sweep for the model-side APIs: evaluation, vocabularies,
the model's scalar arguments and the retrieval metric.

Each case names the argument, what was received and what was expected, on every
backend. Before: NaN embeddings scored every test pair as a hit (accuracy 1.0),
an empty test set scored 0.0, float test ids raised NumPy's `IndexError`, embeddings
of different dimensions the backend's own error, `Vocabulary().adapt([])` made a
vocabulary of OOV buckets only, NumPy integers were refused by `Vocabulary`,
`FactorizedTopK(chunk_size=)`, `num_hard_negatives` and `index_candidates(batch_size=)`
(an `AttributeError`), and `from_ids(query_vocabulary=[...])` said "no vocabulary".
"""

import json

import keras
import numpy as np
import pytest

import two_tower
from two_tower.evaluation import evaluate_retrieval

RNG = np.random.default_rng(0)
QUERIES = RNG.normal(size=(5, 4)).astype("float32")
CATALOGUE = RNG.normal(size=(7, 4)).astype("float32")


def _numpy_hits(queries, catalogue, query_ids, candidate_ids, k):
    """A pair is a hit when fewer than k other candidates score strictly higher;
    a NaN anywhere in a row's scores makes it a miss."""
    scores = queries[query_ids] @ catalogue.T
    positive = scores[np.arange(len(query_ids)), candidate_ids]
    others = np.ones_like(scores, bool)
    others[np.arange(len(query_ids)), candidate_ids] = False
    beaten = ~(scores <= positive[:, None]) & others
    return (beaten.sum(axis=1) < k).astype("float64")


@pytest.mark.parametrize("where", ["query_embeddings", "catalogue_embeddings"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_embeddings_are_refused_by_evaluate_retrieval(where, value):
    queries, catalogue = QUERIES.copy(), CATALOGUE.copy()
    (queries if where == "query_embeddings" else catalogue)[3, 1] = value
    what = "query id 3" if where == "query_embeddings" else "row 3"
    with pytest.raises(ValueError, match=rf"`{where}` holds NaN or infinite values .*{what}"):
        evaluate_retrieval(queries, catalogue, [0, 3], [2, 3], ks=(2,))


def test_a_function_returning_nan_embeddings_is_refused():
    with pytest.raises(ValueError, match=r"`query_embeddings` holds NaN .*query id 4"):
        evaluate_retrieval(
            lambda ids: np.where(ids[:, None] == 4, np.nan, QUERIES[ids]),
            CATALOGUE,
            [0, 4],
            [2, 3],
            ks=(2,),
            num_queries=np.int64(5),  # a NumPy integer is a positive integer too
        )


def test_the_metric_counts_nan_scores_as_misses_inside_fit():
    """In a compiled step nothing can raise, so NaN must not score as a perfect rank
    (before, every comparison with NaN was False: rank 0, a hit at every k)."""
    queries = QUERIES.copy()
    queries[1] = np.nan
    catalogue = CATALOGUE.copy()
    catalogue[5, 0] = np.nan  # a NaN candidate ranks above every positive
    query_ids, candidate_ids = np.array([0, 1, 2, 3]), np.array([2, 3, 5, 6])
    metric = two_tower.FactorizedTopK(ks=(1, 3))
    metric.update_state(queries[query_ids], catalogue, candidate_ids)
    result = {k: float(keras.ops.convert_to_numpy(v)) for k, v in metric.result().items()}
    for k in (1, 3):
        expected = _numpy_hits(queries, catalogue, query_ids, candidate_ids, k).mean()
        assert result[f"top_k_accuracy_at_{k}"] == pytest.approx(expected)
    assert result["top_k_accuracy_at_3"] < 1.0


def test_empty_and_non_integer_test_ids_are_refused():
    with pytest.raises(ValueError, match=r"are empty: expected at least one test pair"):
        evaluate_retrieval(QUERIES, CATALOGUE, [], [], ks=(2,))
    with pytest.raises(ValueError, match=r"`test_query_ids` must hold integer ids.*e\.g\. 1\.5"):
        evaluate_retrieval(QUERIES, CATALOGUE, [0, 1.5], [2, 3], ks=(2,))
    with pytest.raises(ValueError, match=r"`test_candidate_ids` must hold integer ids.*nan"):
        evaluate_retrieval(QUERIES, CATALOGUE, [0, 1], [2, np.nan], ks=(2,))
    with pytest.raises(ValueError, match=r"`catalogue_embeddings` must be \[catalogue_size, dim\]"):
        evaluate_retrieval(QUERIES, CATALOGUE[:0], [0], [0], ks=(2,))


def test_integer_valued_float_test_ids_are_accepted():
    as_floats = evaluate_retrieval(QUERIES, CATALOGUE, [0.0, 3.0], [2.0, 3.0], ks=(2,))
    as_ints = evaluate_retrieval(QUERIES, CATALOGUE, [0, 3], [2, 3], ks=(2,))
    assert as_floats == as_ints


def test_embeddings_of_different_dimensions_are_refused():
    with pytest.raises(ValueError, match=r"Query embeddings have 4 dimensions and `catalogue_"):
        evaluate_retrieval(QUERIES, CATALOGUE[:, :3], [0, 1], [2, 3], ks=(2,))


def test_a_k_beyond_the_catalogue_counts_every_pair_as_a_hit():
    """Documented acceptance: the top 100 of 7 candidates is the whole catalogue."""
    results = evaluate_retrieval(QUERIES, CATALOGUE, [0, 1, 2], [2, 3, 6], ks=(100,))
    assert results["all"]["accuracy_at_100"] == 1.0


@pytest.mark.parametrize("batch_size", [0, 2.0, True, "8"])
def test_a_bad_evaluation_batch_size_is_refused(batch_size):
    with pytest.raises(ValueError, match=r"evaluate_retrieval: `batch_size` must be an integer"):
        evaluate_retrieval(QUERIES, CATALOGUE, [0, 1], [2, 3], ks=(2,), batch_size=batch_size)


def test_numpy_integers_are_accepted_by_evaluation_and_the_metric():
    expected = evaluate_retrieval(QUERIES, CATALOGUE, [0, 1, 4], [2, 3, 0], ks=(2,), batch_size=2)
    results = evaluate_retrieval(
        QUERIES, CATALOGUE, [0, 1, 4], [2, 3, 0], ks=(np.int64(2),), batch_size=np.int32(2)
    )
    assert results == expected
    metric = two_tower.FactorizedTopK(ks=2, chunk_size=np.int64(3), catalogue_size=np.int64(7))
    assert json.dumps(metric.get_config())  # stored as Python ints


def test_vocabulary_takes_numpy_integers_and_refuses_no_data():
    vocabulary = two_tower.Vocabulary(num_oov_buckets=np.int64(2), max_size=np.int32(3))
    vocabulary.adapt(["a", "b", "a", "c", "d"])
    assert vocabulary.size == 5
    assert json.dumps(vocabulary.get_config()["num_oov_buckets"]) == "2"
    with pytest.raises(ValueError, match=r"Vocabulary: `min_count` must be an integer >= 1\. "):
        two_tower.Vocabulary(min_count=np.float32(2))
    for empty in ([], np.array([], dtype=str), ["", ""]):
        with pytest.raises(ValueError, match=r"`data` holds no values to adapt to"):
            two_tower.Vocabulary().adapt(empty)
    with pytest.raises(ValueError, match=r"Received 2 value\(s\)"):
        two_tower.Vocabulary(padding="<pad>").adapt(["<pad>", "<pad>"])


def test_from_ids_names_a_vocabulary_that_is_not_one():
    movies = two_tower.Vocabulary()
    movies.adapt(["x", "y"])
    with pytest.raises(
        ValueError, match=r"`query_vocabulary` must be a two_tower\.Vocabulary.*list"
    ):
        two_tower.TwoTowerRetrieval.from_ids(
            query_vocabulary=["ann", "bob"], candidate_vocabulary=movies
        )
    with pytest.raises(ValueError, match=r"`candidate_vocabulary` must be a two_tower\.Vocabulary"):
        two_tower.TwoTowerRetrieval.from_ids(3, candidate_vocabulary={"x": 1})


def test_the_model_stores_numpy_scalar_arguments_as_python_numbers():
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(5, 4),
        keras.layers.Embedding(7, 4),
        loss="sampled_softmax",
        temperature=np.float32(0.5),
        num_hard_negatives=np.int64(2),
        catalogue_size=np.int64(7),
        num_sampled_negatives=np.int32(3),
        remove_accidental_hits=np.bool_(True),
        cross_replica_negatives=np.bool_(False),
    )
    config = model.get_config()
    picked = {
        key: config[key]
        for key in ("temperature", "num_hard_negatives", "catalogue_size", "num_sampled_negatives")
    }
    assert picked == {
        "temperature": 0.5,
        "num_hard_negatives": 2,
        "catalogue_size": 7,
        "num_sampled_negatives": 3,
    }
    assert all(type(value) in (int, float) for value in picked.values())
    json.dumps(picked)


def test_index_candidates_and_recommend_take_numpy_integer_sizes():
    model = two_tower.TwoTowerRetrieval(keras.layers.Embedding(5, 4), keras.layers.Embedding(7, 4))
    model.index_candidates(np.arange(7), batch_size=np.int64(3))
    ids = model.recommend([1], k=np.int64(3), batch_size=np.int32(1))
    embeddings = keras.ops.convert_to_numpy(model.candidate_tower(np.arange(7)))
    query = keras.ops.convert_to_numpy(model.query_tower(np.array([1])))
    expected = np.argsort(-(query @ embeddings.T)[0], kind="stable")[:3]
    np.testing.assert_array_equal(ids[0], expected)


def test_tables_and_plots_name_rows_that_are_not_results(tmp_path):
    from two_tower import evaluation

    for function, arguments in (
        (evaluation.format_table, ()),
        (evaluation.plot_recall, (tmp_path / "recall.png",)),
    ):
        name = function.__name__
        with pytest.raises(ValueError, match=rf"{name}: `rows` must be a dict.*Received list"):
            function([0.5], *arguments)
        with pytest.raises(ValueError, match=rf"{name}: `rows` is empty"):
            function({}, *arguments)
        with pytest.raises(ValueError, match=rf"{name}: `ks` must be an integer >= 1"):
            function({"m": {"recall_at_10": 0.5}}, *arguments, ks=(10.0,))
    with pytest.raises(ValueError, match=r"row 'm' has no `recall_at_k` for ks=\[10\]"):
        evaluation.plot_recall({"m": {"accuracy_at_10": 0.5}}, tmp_path / "r.png", ks=(10,))


def test_plot_recall_writes_png_whole_or_refuses_the_path(tmp_path):
    pytest.importorskip("matplotlib")
    from two_tower import evaluation

    rows = {"m": {"recall_at_10": 0.5, "recall_at_100": 0.8}}
    with pytest.raises(ValueError, match=r"must end in \.png\. Received: '.*recall\.jpg'"):
        evaluation.plot_recall(rows, tmp_path / "recall.jpg", ks=(10, 100))
    with pytest.raises(FileNotFoundError, match=r"the folder '.*missing' of `path` does not"):
        evaluation.plot_recall(rows, tmp_path / "missing" / "recall.png", ks=(10, 100))
    target = tmp_path / "recall.png"
    target.write_bytes(b"an older chart")
    evaluation.plot_recall(rows, target, ks=(10, 100))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recall.png"]  # no temporary left


def _history_model():
    model = two_tower.TwoTowerRetrieval(
        two_tower.HistoryTower(embedding_dim=4, max_length=3), two_tower.IdEmbeddingTower(10, 4)
    )
    model.compile(optimizer="sgd")
    return model


def test_a_bare_history_array_is_named_by_fit_and_predict():
    """Before, the id checks read the bare array as query ids ("must lie in [0, ...)")."""
    model = _history_model()
    histories = np.array([[1, 2, -1], [3, -1, -1]])
    expected = r"HistoryTower takes a dict of features.*bare ndarray of shape \(2, 3\) in {}"
    with pytest.raises(ValueError, match=expected.format(r"x\['query'\]")):
        model.fit({"query": histories, "candidate": np.array([1, 2])}, verbose=0)
    with pytest.raises(ValueError, match=expected.format("x: pass")):
        model.predict(histories, verbose=0)


def test_ragged_lists_are_named_and_rectangular_lists_accepted_by_predict():
    model = _history_model()
    ragged = {"history": [[1, 2], [3]]}
    message = r"x\['query'\]\['history'\] must be a rectangular array.*lengths \[1, 2\]"
    with pytest.raises(ValueError, match=message):
        model.fit({"query": ragged, "candidate": np.array([1, 2])}, verbose=0)
    with pytest.raises(ValueError, match=r"x\['history'\] must be a rectangular array"):
        model.predict(ragged, verbose=0)
    lists = {"history": [[1, 2, -1], [3, -1, -1]]}
    from_lists = model.predict(lists, verbose=0)  # before: Keras' "Unrecognized data type"
    from_array = model.predict({"history": np.array(lists["history"])}, verbose=0)
    np.testing.assert_allclose(from_lists, from_array)
