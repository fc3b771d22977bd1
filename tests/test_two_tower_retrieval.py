import importlib.util
import json

import keras
import numpy as np
import pytest

import two_tower
from test_losses import numpy_softmax_loss
from testing import MLPTower, assert_all_close, assert_config_round_trip, save_and_load

NUM_QUERIES, NUM_CANDIDATES, DIM = 12, 30, 8


def make_model(loss="softmax", candidate_dim=DIM, **kwargs):
    return two_tower.TwoTowerRetrieval(
        query_tower=keras.layers.Embedding(NUM_QUERIES, DIM),
        candidate_tower=keras.layers.Embedding(NUM_CANDIDATES, candidate_dim),
        loss=loss,
        **kwargs,
    )


def make_pairs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "query": rng.integers(0, NUM_QUERIES, n).astype("int32"),
        "candidate": rng.integers(0, NUM_CANDIDATES, n).astype("int32"),
    }
    return x, rng.random(n).astype("float32")


def tables(model):
    return (
        keras.ops.convert_to_numpy(model.query_tower.embeddings),
        keras.ops.convert_to_numpy(model.candidate_tower.embeddings),
    )


@pytest.mark.parametrize("loss", ["mse", "softmax"])
def test_fit_evaluate_predict(loss):
    model = make_model(loss)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    x, ratings = make_pairs()
    y = ratings if loss == "mse" else None
    history = model.fit(x, y, batch_size=16, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert np.isfinite(model.evaluate(x, y, batch_size=16, verbose=0))

    query_table, candidate_table = tables(model)
    predicted = model.predict(x["query"], verbose=0)
    assert_all_close(predicted, query_table[x["query"]])
    pair = model.predict(x, verbose=0)
    assert_all_close(pair["candidate_embeddings"], candidate_table[x["candidate"]])


def test_softmax_loss_matches_numpy():
    model = make_model("softmax", temperature=0.3)
    model.compile(optimizer="sgd")
    x, _ = make_pairs(n=16)
    weights = np.random.default_rng(3).random(16).astype("float32")
    model.predict(x, verbose=0)  # builds the towers
    query_table, candidate_table = tables(model)
    similarities = query_table[x["query"]] @ candidate_table[x["candidate"]].T
    expected = numpy_softmax_loss(similarities, 0.3, weights)
    # Keras drops array `sample_weight` beside y=None, so feed (x, None, w) batches.
    loss = model.evaluate((batch for batch in [(x, None, weights)]), steps=1, verbose=0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    unweighted = model.evaluate(x, batch_size=16, verbose=0)
    np.testing.assert_allclose(unweighted, numpy_softmax_loss(similarities, 0.3), rtol=1e-5)
    with pytest.raises(ValueError, match="ignores `sample_weight`"):
        model.evaluate(x, sample_weight=weights, verbose=0)


def test_mse_loss_matches_numpy():
    model = make_model("mse")
    model.compile(optimizer="sgd")
    x, ratings = make_pairs(n=16)
    model.predict(x, verbose=0)
    query_table, candidate_table = tables(model)
    scores = np.sum(query_table[x["query"]] * candidate_table[x["candidate"]], axis=1)
    loss = model.evaluate(x, ratings, batch_size=16, verbose=0)
    np.testing.assert_allclose(loss, np.mean((ratings - scores) ** 2), rtol=1e-5, atol=1e-7)


def test_tower_regularisation_is_added_to_the_loss():
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM, embeddings_regularizer=keras.regularizers.L2(0.5)),
        keras.layers.Embedding(NUM_CANDIDATES, DIM),
        loss="mse",
    )
    model.compile(optimizer="sgd")
    x, ratings = make_pairs(n=16)
    model.predict(x, verbose=0)
    query_table, candidate_table = tables(model)
    scores = np.sum(query_table[x["query"]] * candidate_table[x["candidate"]], axis=1)
    expected = np.mean((ratings - scores) ** 2) + 0.5 * np.sum(query_table**2)
    loss = model.evaluate(x, ratings, batch_size=16, verbose=0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_recommend_matches_numpy_top_k():
    model = make_model()
    model.predict(make_pairs()[0], verbose=0)
    ids = np.arange(NUM_CANDIDATES, dtype="int64") * 1000 + 7
    model.index_candidates(np.arange(NUM_CANDIDATES), ids, batch_size=7)
    queries = np.arange(NUM_QUERIES)
    found, scores = model.recommend(queries, k=5, return_scores=True)
    query_table, candidate_table = tables(model)
    all_scores = query_table @ candidate_table.T
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(
        scores, np.take_along_axis(all_scores, order, 1), rtol=1e-5, atol=1e-6
    )


def test_int64_ids_above_2_31_survive_recommend():
    model = make_model()
    ids = np.arange(NUM_CANDIDATES, dtype="int64") + 2**33
    model.index_candidates(np.arange(NUM_CANDIDATES), ids)
    found = model.recommend(np.arange(3), k=NUM_CANDIDATES)
    assert found.dtype == np.int64
    assert found.min() >= 2**33
    assert sorted(found[0].tolist()) == ids.tolist()


def test_dict_feature_towers():
    def tower(name, vocabulary):
        ids = keras.Input(shape=(), dtype="int32", name="ids")
        extra = keras.Input(shape=(3,), dtype="float32", name="extra")
        embedded = keras.layers.Embedding(vocabulary, DIM)(ids)
        out = keras.layers.Concatenate()([embedded, keras.layers.Dense(DIM)(extra)])
        return keras.Model({"ids": ids, "extra": extra}, keras.layers.Dense(DIM)(out), name=name)

    model = two_tower.TwoTowerRetrieval(tower("q", NUM_QUERIES), tower("c", NUM_CANDIDATES))
    model.compile(optimizer="adam")
    rng = np.random.default_rng(0)
    x = {
        "query": {"ids": rng.integers(0, NUM_QUERIES, 32), "extra": rng.random((32, 3))},
        "candidate": {"ids": rng.integers(0, NUM_CANDIDATES, 32), "extra": rng.random((32, 3))},
    }
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    model.index_candidates(
        {"ids": np.arange(NUM_CANDIDATES), "extra": np.zeros((NUM_CANDIDATES, 3))}
    )
    assert model.recommend(x["query"], k=4).shape == (32, 4)


def test_config_round_trip():
    model = two_tower.TwoTowerRetrieval(
        MLPTower(NUM_QUERIES, DIM), MLPTower(NUM_CANDIDATES, DIM), loss="mse", temperature=0.5
    )
    restored = assert_config_round_trip(model)
    assert restored.loss_name == "mse" and restored.temperature == 0.5
    assert isinstance(restored.query_tower, MLPTower)
    json.dumps(model.get_config())


@pytest.mark.parametrize("loss", ["mse", "softmax"])
def test_save_load_gives_same_top_k(tmp_path, loss):
    model = two_tower.TwoTowerRetrieval(
        MLPTower(NUM_QUERIES, DIM), MLPTower(NUM_CANDIDATES, DIM), loss=loss, temperature=0.2
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    x, ratings = make_pairs()
    model.fit(x, ratings if loss == "mse" else None, batch_size=16, epochs=2, verbose=0)
    ids = np.arange(NUM_CANDIDATES, dtype="int64") + 2**35
    model.index_candidates(np.arange(NUM_CANDIDATES), ids)
    expected_ids, expected_scores = model.recommend(
        np.arange(NUM_QUERIES), k=10, return_scores=True
    )

    loaded = save_and_load(model, tmp_path)
    assert isinstance(loaded, two_tower.TwoTowerRetrieval)
    found, scores = loaded.recommend(np.arange(NUM_QUERIES), k=10, return_scores=True)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)
    # The loaded model is compiled and keeps training.
    loaded.fit(x, ratings if loss == "mse" else None, batch_size=16, epochs=1, verbose=0)


def test_save_before_indexing_loads_without_an_index(tmp_path):
    model = make_model()
    model.compile(optimizer="adam")
    model.fit(make_pairs()[0], batch_size=16, epochs=1, verbose=0)
    loaded = save_and_load(model, tmp_path)
    assert loaded.candidate_index.num_candidates == 0
    assert_all_close(
        loaded.predict(np.arange(4), verbose=0), model.predict(np.arange(4), verbose=0)
    )


def test_mismatched_tower_dims_raise():
    model = make_model(candidate_dim=DIM + 1)
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match=rf"output dim \(={DIM}\).*\(={DIM + 1}\)"):
        model.fit(make_pairs()[0], batch_size=16, epochs=1, verbose=0)


def test_k_larger_than_catalogue_raises():
    model = make_model()
    model.index_candidates(np.arange(NUM_CANDIDATES))
    with pytest.raises(
        ValueError, match=r"`k` \(=31\) must not exceed the number of candidates \(=30\)"
    ):
        model.recommend(np.arange(2), k=NUM_CANDIDATES + 1)
    with pytest.raises(ValueError, match="positive integer"):
        model.recommend(np.arange(2), k=0)


def test_recommend_before_indexing_raises():
    with pytest.raises(ValueError, match="index_candidates"):
        make_model().recommend(np.arange(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": "hinge"}, ValueError, "hinge"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1}, ValueError, "temperature"),
        ({"query_tower": "embedding"}, TypeError, "query_tower"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    arguments = {
        "query_tower": keras.layers.Embedding(3, 2),
        "candidate_tower": keras.layers.Embedding(3, 2),
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        two_tower.TwoTowerRetrieval(**arguments)


def test_bad_training_data_raises():
    x, ratings = make_pairs()
    with pytest.raises(ValueError, match="loss to TwoTowerRetrieval"):
        make_model().compile(optimizer="adam", loss="mse")
    softmax = make_model("softmax")
    softmax.compile(optimizer="adam")
    with pytest.raises(ValueError, match="takes no labels"):
        softmax.fit(x, ratings, epochs=1, verbose=0)
    mse = make_model("mse")
    mse.compile(optimizer="adam")
    with pytest.raises(ValueError, match="needs labels"):
        mse.fit(x, epochs=1, verbose=0)
    unpaired = make_model("softmax")
    unpaired.compile(optimizer="adam")
    with pytest.raises(ValueError, match="pair inputs"):
        unpaired.fit(x["query"], epochs=1, verbose=0)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="tf.data needs TensorFlow, which only the tensorflow session installs",
)
def test_fit_on_tf_data_dataset():
    import tensorflow as tf

    x, ratings = make_pairs()
    dataset = tf.data.Dataset.from_tensor_slices((x, ratings)).batch(16)
    model = make_model("mse")
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    history = model.fit(dataset, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    model.index_candidates(np.arange(NUM_CANDIDATES))
    queries = tf.data.Dataset.from_tensor_slices(np.arange(NUM_QUERIES)).batch(4)
    assert model.recommend(queries, k=3).shape == (NUM_QUERIES, 3)


def test_predict_before_fit_then_fit_and_reload(tmp_path):
    model = make_model("softmax")
    before = model.predict(np.arange(NUM_QUERIES), verbose=0)  # builds the query tower only
    assert before.shape == (NUM_QUERIES, DIM)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.fit(make_pairs()[0], batch_size=16, epochs=2, verbose=0)
    model.index_candidates(np.arange(NUM_CANDIDATES))
    expected = model.recommend(np.arange(NUM_QUERIES), k=5)
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(loaded.recommend(np.arange(NUM_QUERIES), k=5), expected)


@pytest.mark.parametrize("num_hard_negatives", [None, 2])
def test_softmax_options_match_numpy(num_hard_negatives):
    from test_losses import numpy_retrieval_softmax

    model = make_model(
        "softmax",
        temperature=0.5,
        remove_accidental_hits=True,
        num_hard_negatives=num_hard_negatives,
    )
    model.compile(optimizer="sgd")
    rng = np.random.default_rng(7)
    x = {
        "query": rng.integers(0, NUM_QUERIES, 16).astype("int32"),
        "candidate": rng.integers(0, 5, 16).astype("int32"),  # many duplicates
        "candidate_sampling_probability": rng.uniform(0.05, 0.5, 16).astype("float32"),
    }
    model.predict(x, verbose=0)
    query_table, candidate_table = tables(model)
    similarities = query_table[x["query"]] @ candidate_table[x["candidate"]].T
    expected = numpy_retrieval_softmax(
        similarities,
        temperature=0.5,
        candidate_ids=x["candidate"],
        log_q=np.log(x["candidate_sampling_probability"]),
        num_hard_negatives=num_hard_negatives,
    )
    loss = model.evaluate(x, batch_size=16, verbose=0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    history = model.fit(x, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_accidental_hits_with_dict_candidates_need_an_id_key():
    candidate = keras.Sequential([keras.layers.Embedding(NUM_CANDIDATES, DIM)])
    ids = keras.Input(shape=(), dtype="int32", name="movie")
    tower = keras.Model({"movie": ids}, candidate(ids))
    x = {"query": np.arange(8), "candidate": {"movie": np.arange(8)}}
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM), tower, remove_accidental_hits=True
    )
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="candidate_id_key"):
        model.fit(x, batch_size=8, epochs=1, verbose=0)
    keyed = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM),
        tower,
        remove_accidental_hits=True,
        candidate_id_key="movie",
    )
    keyed.compile(optimizer="sgd")
    keyed.fit(x, batch_size=8, epochs=1, verbose=0)


def test_softmax_options_round_trip():
    model = make_model(
        "softmax", remove_accidental_hits=True, num_hard_negatives=3, candidate_id_key="id"
    )
    restored = assert_config_round_trip(model)
    assert restored.remove_accidental_hits and restored.num_hard_negatives == 3
    assert restored.candidate_id_key == "id"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_hard_negatives": 0}, "num_hard_negatives"),
        ({"loss": "mse", "remove_accidental_hits": True}, "the softmax losses only"),
        ({"loss": "mse", "num_hard_negatives": 2}, "the softmax losses only"),
        (
            {"loss": "full_softmax", "catalogue_size": 30, "remove_accidental_hits": True},
            "'softmax' and 'sampled_softmax'.*nothing to remove",
        ),
    ],
)
def test_bad_softmax_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(**kwargs)


@pytest.mark.parametrize("loss", ["mse", "full_softmax"])
def test_sampling_probability_is_refused_where_no_loss_uses_it(loss):
    # Before: silently dropped, so a logQ-corrected run and a plain run looked alike.
    model = make_model(loss, catalogue_size=NUM_CANDIDATES if loss == "full_softmax" else None)
    model.compile(optimizer="sgd")
    x, ratings = make_pairs(n=16)
    x["candidate_sampling_probability"] = np.full(16, 0.1, "float32")
    y = ratings if loss == "mse" else None
    for method in (model.fit, model.evaluate):
        with pytest.raises(ValueError, match=rf"logQ.*loss='{loss}' does not use it"):
            method(x, y, batch_size=8, verbose=0)


@pytest.mark.parametrize(
    ("loss", "options"),
    [
        ("mse", {}),
        ("softmax", {"remove_accidental_hits": True}),
        ("sampled_softmax", {"num_sampled_negatives": 5}),
        ("full_softmax", {}),
    ],
)
def test_predict_on_pairs_returns_the_two_embeddings_only(loss, options):
    # Before: every batch's catalogue embeddings and sampled negatives too, which
    # Keras concatenated into [batches x catalogue, dim] for full_softmax.
    model = make_model(loss, catalogue_size=NUM_CANDIDATES, **options)
    metric = two_tower.FactorizedTopK(ks=(5,), catalogue_size=NUM_CANDIDATES)
    model.compile(optimizer="sgd", metrics=[metric])
    x, ratings = make_pairs(n=40)
    pair = model.predict(x, batch_size=8, verbose=0)
    assert sorted(pair) == ["candidate_embeddings", "query_embeddings"]
    query_table, candidate_table = tables(model)
    assert_all_close(pair["query_embeddings"], query_table[x["query"]])
    assert_all_close(pair["candidate_embeddings"], candidate_table[x["candidate"]])
    # Training and evaluation still get everything the loss and metrics need.
    y = ratings if loss == "mse" else None
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    results = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    assert 0.0 <= results["top_k_accuracy_at_5"] <= 1.0


def test_numpy_scalar_temperature_is_accepted():
    assert make_model(temperature=np.float32(0.25)).temperature == 0.25
    with pytest.raises(ValueError, match="temperature"):
        make_model(temperature=float("inf"))


def test_keras_metrics_in_compile_raise():
    with pytest.raises(ValueError, match="FactorizedTopK metrics only"):
        make_model().compile(optimizer="adam", metrics=["mae"])


def test_index_candidates_bad_input_raises():
    model = make_model()
    with pytest.raises(ValueError, match="one row per candidate"):
        model.index_candidates({"a": np.arange(3), "b": np.arange(4)})
    model.index_candidates([1, 2, 3])  # a plain list works
    assert model.candidate_index.num_candidates == 3


def test_mse_labels_of_the_wrong_shape_raise():
    model = make_model("mse")
    model.compile(optimizer="sgd")
    x, _ = make_pairs(n=16)
    with pytest.raises(ValueError, match=r"\[batch\] or \[batch, 1\]"):
        model.fit(x, np.zeros((16, 2), "float32"), batch_size=16, epochs=1, verbose=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_labels_raise_before_training(bad):
    model = make_model("mse")
    model.compile(optimizer="sgd")
    x, ratings = make_pairs(n=16)
    ratings[5] = bad
    with pytest.raises(
        ValueError,
        match=r"labels `y` contain 1 NaN or infinite value\(s\), first at flat position 5",
    ):
        model.fit(x, ratings, batch_size=16, epochs=1, verbose=0)
    assert (
        model.optimizer.iterations.numpy() == 0
        if hasattr(model.optimizer.iterations, "numpy")
        else True
    )


@pytest.mark.parametrize(
    ("side", "value", "match"),
    [
        (
            "query",
            NUM_QUERIES,
            rf"Query ids must lie in \[0, {NUM_QUERIES}\) \(the query tower's Embedding "
            "input_dim\\)",
        ),
        ("query", -1, r"Query ids must lie in \[0, 12\).*from -1"),
        ("candidate", NUM_CANDIDATES + 5, rf"Candidate ids must lie in \[0, {NUM_CANDIDATES}\)"),
    ],
)
def test_out_of_range_ids_raise_the_same_error_on_every_backend(side, value, match):
    model = make_model("softmax")
    model.compile(optimizer="sgd")
    x, _ = make_pairs(n=16)
    x[side][3] = value
    with pytest.raises(ValueError, match=match):
        model.fit(x, batch_size=16, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=match):
        model.evaluate(x, batch_size=16, verbose=0)
    if side == "query":
        with pytest.raises(ValueError, match=match):
            model.predict(x["query"], verbose=0)


def test_out_of_range_catalogue_ids_raise():
    model = make_model("full_softmax", catalogue_size=NUM_CANDIDATES)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"Candidate ids must lie in \[0, 30\)"):
        model.index_candidates(np.arange(NUM_CANDIDATES + 1))


def test_bad_sampling_probability_raises():
    model = make_model("softmax")
    model.compile(optimizer="sgd")
    x, _ = make_pairs(n=16)
    x["candidate_sampling_probability"] = np.zeros(16, "float32")
    with pytest.raises(ValueError, match=r"candidate_sampling_probability` must lie in \(0, 1\]"):
        model.fit(x, batch_size=16, epochs=1, verbose=0)


@pytest.mark.parametrize("logq", [False, True])
def test_sampled_softmax_matches_numpy(logq):
    from test_losses import numpy_retrieval_softmax

    model = make_model(
        "sampled_softmax",
        catalogue_size=NUM_CANDIDATES,
        num_sampled_negatives=7,
        remove_accidental_hits=True,
        temperature=0.5,
    )
    rng = np.random.default_rng(11)
    x = {
        "query": rng.integers(0, NUM_QUERIES, 10).astype("int32"),
        "candidate": rng.integers(0, NUM_CANDIDATES, 10).astype("int32"),
    }
    if logq:
        x["candidate_sampling_probability"] = rng.uniform(0.05, 0.5, 10).astype("float32")
    outputs = model(x, training=False)
    loss = model.compute_loss(x, None, outputs)
    sampled = keras.ops.convert_to_numpy(outputs["sampled_candidate_ids"])
    assert sampled.shape == (7,) and sampled.min() >= 0 and sampled.max() < NUM_CANDIDATES
    query_table, candidate_table = tables(model)
    columns = np.concatenate([x["candidate"], sampled])
    log_q = None
    if logq:
        log_q = np.concatenate(
            [np.log(x["candidate_sampling_probability"]), np.full(7, np.log(7 / NUM_CANDIDATES))]
        )
    expected = numpy_retrieval_softmax(
        query_table[x["query"]] @ candidate_table[columns].T,
        temperature=0.5,
        candidate_ids=columns,
        log_q=log_q,
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss), expected, rtol=1e-5, atol=1e-6)
    again = keras.ops.convert_to_numpy(model(x, training=False)["sampled_candidate_ids"])
    assert not np.array_equal(again, sampled)  # the sampler's seed advances

    model.compile(optimizer=keras.optimizers.Adam(0.05))
    history = model.fit(x, batch_size=5, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_full_softmax_matches_numpy():
    from test_losses import numpy_retrieval_softmax

    model = make_model("full_softmax", catalogue_size=NUM_CANDIDATES, temperature=0.8)
    model.compile(optimizer="sgd")
    x, _ = make_pairs(n=16)
    model.predict(x, verbose=0)
    query_table, candidate_table = tables(model)
    expected = numpy_retrieval_softmax(
        query_table[x["query"]] @ candidate_table.T, x["candidate"], temperature=0.8
    )
    loss = model.evaluate(x, batch_size=16, verbose=0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "full_softmax"}, "catalogue_size"),
        ({"loss": "sampled_softmax", "catalogue_size": 30}, "num_sampled_negatives"),
    ],
)
def test_catalogue_losses_need_their_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(**kwargs)


def test_compile_config_of_another_backend_loads_here():
    """steps_per_execution=16, saved on JAX or TensorFlow, becomes 1 on torch only."""
    model = make_model("softmax")
    config = {"optimizer": "sgd", "steps_per_execution": 16}
    if keras.backend.backend() == "torch":
        with pytest.warns(UserWarning, match="steps_per_execution=16.*steps_per_execution=1"):
            model.compile_from_config(config)
        assert model.steps_per_execution == 1
    else:
        model.compile_from_config(config)
        assert model.steps_per_execution == 16
    x, _ = make_pairs()
    model.fit(x, batch_size=16, epochs=1, verbose=0)


def test_loading_says_that_factorized_top_k_metrics_are_not_saved(tmp_path):
    model = make_model("softmax", catalogue_size=NUM_CANDIDATES)
    metric = two_tower.FactorizedTopK(ks=(5,), catalogue_size=NUM_CANDIDATES, name="held_out")
    model.compile(optimizer="sgd", metrics=[metric])
    x, _ = make_pairs()
    model.fit(x, batch_size=16, epochs=1, verbose=0)
    with pytest.warns(UserWarning, match=r"FactorizedTopK metrics \['held_out'\].*not saved"):
        restored = save_and_load(model, tmp_path)
    assert restored.retrieval_metrics == []
    assert set(restored.evaluate(x, verbose=0, return_dict=True)) == {"loss"}


def test_an_optimizer_saved_on_torch_loads_on_every_backend():
    """Keras on torch saves its own Adam class's module; it resolves to keras.optimizers."""
    model = make_model("softmax")
    saved_on_torch = {
        "module": "keras.src.backend.torch.optimizers.torch_adam",
        "class_name": "Adam",
        "config": {"name": "adam", "learning_rate": 0.01},
        "registered_name": "Adam",
    }
    model.compile_from_config({"optimizer": saved_on_torch, "steps_per_execution": 1})
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.01)
    x, _ = make_pairs()
    before = tables(model)[1].copy() if model.candidate_tower.built else None
    model.fit(x, batch_size=16, epochs=1, verbose=0)
    assert before is None or not np.array_equal(before, tables(model)[1])
