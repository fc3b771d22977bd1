"""Bad input raises the same clear ValueError on every backend.

Each case names the argument, what was received and what was expected. Before,
the backends disagreed: an empty request raised Keras' `UnboundLocalError`, string
ids "Invalid dtype: str32", float ids were cast (1.5 became 1, -1.0 the last row)
or, out of range, gave NaN embeddings on JAX, an `IndexError` on torch and a
GatherV2 error on TensorFlow.
"""

import keras
import numpy as np
import pytest

import two_tower
from testing import MLPTower

NUM_QUERIES, NUM_CANDIDATES, DIM = 12, 30, 4


def make_model(loss="softmax", **kwargs):
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM),
        keras.layers.Embedding(NUM_CANDIDATES, DIM),
        loss,
        **kwargs,
    )
    model.compile(optimizer="sgd")
    return model


def pairs(n=16):
    rng = np.random.default_rng(0)
    return {
        "query": rng.integers(0, NUM_QUERIES, n),
        "candidate": rng.integers(0, NUM_CANDIDATES, n),
    }


def indexed_model():
    model = make_model()
    model.index_candidates(np.arange(NUM_CANDIDATES))
    return model


def test_empty_requests_raise():
    model = indexed_model()
    with pytest.raises(ValueError, match="`queries` has 0 rows: expected at least one query"):
        model.recommend(np.zeros(0, "int32"))
    with pytest.raises(ValueError, match="`queries` has 0 rows"):
        model.recommend([])
    with pytest.raises(ValueError, match="`items` has 0 rows"):
        model.similar_items(np.zeros(0, "int32"))


@pytest.mark.parametrize("method", ["fit", "evaluate"])
def test_empty_training_arrays_raise(method):
    model = make_model()
    x = {"query": np.zeros(0, "int32"), "candidate": np.zeros(0, "int32")}
    with pytest.raises(
        ValueError, match=rf"{method} received 0 rows in x\['query'\], x\['candidate'\]"
    ):
        getattr(model, method)(x, verbose=0)


def test_string_ids_for_an_integer_id_tower_raise():
    model = indexed_model()
    strings = np.array(["u1", "u2"])
    expected = r"Query ids in {} must be integer indices \[0, 12\).*Received strings \(dtype <U2\)"
    with pytest.raises(ValueError, match=expected.format("`queries`")):
        model.recommend(strings)
    x = pairs()
    x["query"] = np.array([f"u{i}" for i in range(16)])
    with pytest.raises(ValueError, match=r"Query ids in x\['query'\] must be integer indices"):
        model.fit(x, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"Candidate ids in `candidates` must be integer indices"):
        model.index_candidates(np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"Candidate ids in `items` must be integer indices"):
        model.similar_items(np.array(["a"]), item_ids=np.array([0]))


def test_rows_of_different_lengths_raise():
    model = make_model("mse")
    x = pairs()
    x["candidate"] = x["candidate"][:12]
    labels = np.ones(16, "float32")
    with pytest.raises(ValueError, match=r"Received x\['query'\]: 16, x\['candidate'\]: 12, y: 16"):
        model.fit(x, labels, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"x\['query'\]: 16, x\['candidate'\]: 16, y: 10"):
        model.fit(pairs(), labels[:10], epochs=1, verbose=0)


def test_wrong_keys_in_x_raise():
    model = make_model()
    x = pairs()
    with pytest.raises(
        ValueError, match=r"'query'.*'candidate'.*Received x with keys \['item', 'user'\]"
    ):
        model.fit({"user": x["query"], "item": x["candidate"]}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"keys \['candidate', 'query', 'rating'\]"):
        model.evaluate({**x, "rating": np.ones(16)}, verbose=0)


@pytest.mark.parametrize("bad", [1.5, np.nan, np.inf])
def test_non_integer_float_ids_raise_everywhere(bad):
    model = indexed_model()
    floats = np.array([1.0, 2.0, bad, 3.0])
    match = r"ids in .* must be integers\. Received float64 ids with non-integer values"
    with pytest.raises(ValueError, match=match):
        model.recommend(floats)
    with pytest.raises(ValueError, match=match):
        model.index_candidates(floats)
    with pytest.raises(ValueError, match=match):
        model.similar_items(floats)
    x = pairs(4)
    x["candidate"] = floats
    with pytest.raises(ValueError, match=r"Candidate ids in x\['candidate'\] must be integers"):
        model.fit(x, epochs=1, verbose=0)


@pytest.mark.parametrize(
    ("side", "value", "match"),
    [
        ("query", 99.0, r"Query ids must lie in \[0, 12\).*from 0 to 99 in x\['query'\]"),
        ("query", -1.0, r"Query ids must lie in \[0, 12\).*from -1 to"),
        ("candidate", 1e30, r"Candidate ids must lie in \[0, 30\)"),
    ],
)
def test_out_of_range_float_ids_raise_the_same_error(side, value, match):
    model = indexed_model()
    x = {name: ids.astype("float32") for name, ids in pairs(4).items()}
    x[side][1] = value
    x["query"][0] = 0
    with pytest.raises(ValueError, match=match):
        model.fit(x, epochs=1, verbose=0)
    request = np.array([0.0, value])
    with pytest.raises(ValueError, match=match.split(".*")[0]):
        if side == "query":
            model.recommend(request)
        else:
            model.similar_items(request)


def test_integer_valued_float_ids_are_accepted_as_integers():
    model = indexed_model()
    np.testing.assert_array_equal(
        model.recommend(np.array([3.0, 7.0]), k=5), model.recommend(np.array([3, 7]), k=5)
    )
    found = model.similar_items(np.array([4.0, 9.0]), k=5)
    np.testing.assert_array_equal(found, model.similar_items(np.array([4, 9]), k=5))
    assert 4 not in found[0] and 9 not in found[1]  # each item left out of its own results
    x = {name: ids.astype("float64") for name, ids in pairs().items()}
    model.fit(x, epochs=1, verbose=0)


def test_a_flat_exclusion_list_for_several_queries_raises():
    model = indexed_model()
    with pytest.raises(
        ValueError, match=r"`exclude\[0\]` is a single id \(5\).*one list per query"
    ):
        model.recommend(np.array([0, 1]), k=3, exclude=[5, 7])
    with pytest.raises(ValueError, match=r"`exclude\[0\]` is a single id.*one list per item"):
        model.similar_items(np.array([0, 1]), k=3, exclude=[5, 7])
    with pytest.raises(ValueError, match=r"`exclude\[1\]` is a single id"):
        model.candidate_index.search(np.ones((2, DIM), "float32"), k=3, exclude=[[1], 2])
    # One list per query is the rule; [[5, 7]] * 2 leaves both out of both.
    found = model.recommend(np.array([0, 1]), k=3, exclude=[[5, 7]] * 2)
    assert not {5, 7} & set(found.reshape(-1).tolist())


def feature_model(loss="softmax", **kwargs):
    tower = two_tower.FeatureTower(
        categorical={"movie": NUM_CANDIDATES, "decade": 3}, output_dim=DIM
    )
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM), tower, loss, candidate_id_key="movie", **kwargs
    )
    model.compile(optimizer="sgd")
    return model


def test_an_error_inside_a_training_step_leaves_the_model_usable():
    """On JAX, Keras empties the variables for its step; a failing step lost them for good."""
    # A custom tower: nothing on the host knows it takes ids, so [n, 1] ids reach
    # the step, where its [n, 1, dim] output raises.
    model = two_tower.TwoTowerRetrieval(
        MLPTower(NUM_QUERIES, DIM), keras.layers.Embedding(NUM_CANDIDATES, DIM)
    )
    model.compile(optimizer="sgd")  # not built yet: the failing step is the first one
    x = pairs()
    bad = {"query": x["query"][:, None], "candidate": x["candidate"]}  # [n, 1]: [n, 1, dim]
    with pytest.raises(ValueError, match=r"\[batch, dim\] embeddings"):
        model.fit(bad, epochs=1, verbose=0)
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"\[batch, dim\] embeddings"):
        model.evaluate(bad, verbose=0)
    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    for kept, original in zip(after, before, strict=True):
        np.testing.assert_array_equal(kept, original)
    history = model.fit(x, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    model.index_candidates(np.arange(NUM_CANDIDATES))
    assert model.recommend(np.arange(3), k=4).shape == (3, 4)


def test_ids_given_to_the_towers_directly_are_checked():
    model = make_model()
    with pytest.raises(ValueError, match=r"Query ids must lie in \[0, 12\).*query_features"):
        model.embed_queries(np.array([17]))
    with pytest.raises(ValueError, match=r"Candidate ids must lie in \[0, 30\)"):
        model.embed_candidates(np.array([-1]))
    with pytest.raises(ValueError, match=r"must be a 1D array.*Received shape \(2, 1\)"):
        model.recommend(np.array([[1], [2]])) if False else model.embed_queries(
            np.array([[1], [2]])
        )


def test_catalogue_size_must_fit_the_candidate_tower_and_bounds_the_ids():
    with pytest.raises(ValueError, match=r"`catalogue_size` \(=50\) must not exceed .*\(=30\)"):
        make_model("full_softmax", catalogue_size=50)
    for bad in (-3, 0, 1.5, "10"):
        with pytest.raises(ValueError, match="`catalogue_size` must be a positive integer"):
            make_model("softmax", catalogue_size=bad)
    model = make_model("full_softmax", catalogue_size=5)
    with pytest.raises(ValueError, match=r"Candidate ids must lie in \[0, 5\) \(catalogue_size\)"):
        model.fit(pairs(), epochs=1, verbose=0)


def test_query_ids_beyond_a_metric_num_queries_raise():
    model = make_model("softmax", catalogue_size=NUM_CANDIDATES)
    metric = two_tower.FactorizedTopK(ks=(5,), num_queries=3, catalogue_size=NUM_CANDIDATES)
    model.compile(optimizer="sgd", metrics=[metric])
    with pytest.raises(ValueError, match=r"Query ids must lie in \[0, 3\) \(num_queries"):
        model.evaluate(pairs(), verbose=0)


def test_feature_tower_indices_are_checked_everywhere():
    model = feature_model("full_softmax", catalogue_size=NUM_CANDIDATES)
    catalogue = {"movie": np.arange(NUM_CANDIDATES), "decade": np.arange(NUM_CANDIDATES) % 3}
    catalogue["decade"][4] = 7
    with pytest.raises(ValueError, match=r"Feature 'decade' in the catalogue features .*\[0, 3\)"):
        model.set_catalogue(catalogue)
    catalogue["decade"][4] = 1
    model.set_catalogue(catalogue)
    x = {
        "query": pairs(4)["query"],
        "candidate": {"movie": np.arange(4), "decade": np.array([0, 1, 5, 2])},
    }
    with pytest.raises(ValueError, match=r"Feature 'decade' in x\['candidate'\].*from 0 to 5"):
        model.fit(x, epochs=1, verbose=0)
    x["candidate"]["decade"] = np.array([0, 1, -2, 2])
    with pytest.raises(ValueError, match=r"Feature 'decade'.*from -2 to 2"):
        model.fit(x, epochs=1, verbose=0)
    x["candidate"]["decade"] = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"one row per example.*'movie': 4, 'decade': 3"):
        model.candidate_tower(x["candidate"])


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, "8"])
def test_a_bad_batch_size_raises(batch_size):
    model = make_model()
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer"):
        model.fit(pairs(), batch_size=batch_size, epochs=1, verbose=0)
    model.index_candidates(np.arange(NUM_CANDIDATES))
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer"):
        model.recommend(np.arange(3), batch_size=batch_size)


def test_malformed_training_data_raises_on_the_host():
    model = make_model("mse")
    x = pairs(8)
    with pytest.raises(ValueError, match=r"a dict\. Received a tuple of 2 items"):
        model.fit((x["query"], x["candidate"]), np.ones(8), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"labels `y` must be numbers"):
        model.fit(x, np.array(["5"] * 8), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"`sample_weight` must have shape \[batch\] or"):
        model.fit(x, np.ones(8), sample_weight=np.ones((8, 2)), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"`sample_weight` must not be negative"):
        model.fit(x, np.ones(8), sample_weight=-np.ones(8), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"predict takes query features alone"):
        model.predict({"query": x["query"]}, verbose=0)


def test_malformed_requests_raise():
    model = indexed_model()
    with pytest.raises(ValueError, match=r"takes an array of ids, but `queries` is a dict"):
        model.recommend({"user": np.arange(3)})
    with pytest.raises(ValueError, match=r"Received 3; for one, wrap it: np.array\(\[3\]\)"):
        model.recommend(3)
    with pytest.raises(ValueError, match=r"`queries` must be an array .*Received None\."):
        model.recommend(None)
    with pytest.raises(ValueError, match="one sequence of ids"):
        model.recommend(np.arange(2), exclude={0: [1], 1: [2]})
    with pytest.raises(ValueError, match="not booleans"):
        model.recommend(np.arange(1), exclude=[[True]])
    # A set is a fine sequence of ids.
    found = model.recommend(np.arange(1), k=5, exclude=[{3, 4}])
    assert not {3, 4} & set(found[0].tolist())


def test_saving_a_retrieval_model_as_h5_raises(tmp_path):
    model = indexed_model()
    with pytest.raises(ValueError, match=r"saves to `.keras` files.*model\.h5"):
        model.save(str(tmp_path / "model.h5"))
    assert list(tmp_path.iterdir()) == []


def test_bad_metric_index_and_temperature_arguments_raise():
    for kwargs, match in (
        ({"ks": "10"}, "`ks` must be a sequence of positive integers"),
        ({"ks": [0]}, "`ks` must be positive integers"),
        ({"num_queries": -1}, "`num_queries` must be a positive integer"),
        ({"num_queries": 2.5}, "`num_queries` must be a positive integer"),
        ({"catalogue_size": -5}, "`catalogue_size` must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=match):
            two_tower.FactorizedTopK(**kwargs)
    assert two_tower.FactorizedTopK(ks=5).ks == (5,)
    assert two_tower.FactorizedTopK(ks=[np.int64(5)]).ks == (5,)
    with pytest.raises(ValueError, match="`temperature` must be a number > 0"):
        make_model(temperature="1")
    index = two_tower.BruteForceIndex()
    with pytest.raises(ValueError, match="must be a numeric"):
        index.index(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match=r"dim >= 1. Received shape: \(3, 0\)"):
        index.index(np.zeros((3, 0), "float32"))
    index.index(np.eye(2, dtype="float32"))
    with pytest.raises(ValueError, match="Query embeddings must be numeric"):
        index.search(np.array([["a", "b"]]), k=1)


def test_flags_must_be_booleans_and_options_must_apply():
    model = indexed_model()
    with pytest.raises(ValueError, match=r"`return_scores` must be True or False.*'no'"):
        model.recommend(np.arange(2), return_scores="no")
    with pytest.raises(ValueError, match=r"`exclude_self` must be True or False"):
        model.similar_items(np.arange(2), exclude_self="yes")
    with pytest.raises(ValueError, match=r"`remove_accidental_hits` must be True or False"):
        make_model(remove_accidental_hits="no")
    with pytest.raises(ValueError, match=r"`num_sampled_negatives` applies to .*'softmax'"):
        make_model("softmax", num_sampled_negatives=5)


def test_fit_takes_python_lists_inside_x():
    model = make_model()
    x = pairs(8)
    lists = {name: ids.tolist() for name, ids in x.items()}
    history = model.fit(lists, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert np.isfinite(model.evaluate(lists, batch_size=8, verbose=0))


def test_loading_a_path_that_is_not_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.h5: no such file"):
        two_tower.saving.load_model(tmp_path / "missing.h5")
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(ValueError, match=r"folder\.keras: it is a folder without config\.json"):
        two_tower.saving.load_model(tmp_path / "folder.keras")
    index = two_tower.BruteForceIndex(chunk_size=np.int64(64), query_batch_size=np.int32(8))
    assert index.get_config()["chunk_size"] == 64


def test_ids_given_to_a_dict_feature_tower_raise_on_the_host():
    """Each backend failed in its own words inside the compiled call (JAX "Error
    interpreting argument", torch "Invalid dtype: str384", TensorFlow a trace)."""
    unbuilt = feature_model()
    with pytest.raises(ValueError, match=r"takes a dict of features \['movie', 'decade'\]"):
        unbuilt.index_candidates(np.array(["a", "b"]))
    model = feature_model()
    rows = np.arange(16) % NUM_CANDIDATES
    model.fit(
        {"query": np.arange(16) % NUM_QUERIES, "candidate": {"movie": rows, "decade": rows % 3}},
        epochs=1,
        verbose=0,
    )
    catalogue = {"movie": np.arange(NUM_CANDIDATES), "decade": np.arange(NUM_CANDIDATES) % 3}
    for ids in (np.array(["a", "b"]), np.arange(4)):
        with pytest.raises(
            ValueError,
            match=r"`candidates` must be a dict of features \['decade', 'movie'\], as the "
            r"candidate tower takes\. Received an array of .*features to `set_catalogue` first",
        ):
            model.index_candidates(ids)
    model.index_candidates(catalogue)
    with pytest.raises(ValueError, match=r"`items` must be a dict of features"):
        model.similar_items(np.array([1, 2]), k=3)
    with pytest.raises(ValueError, match=r"`queries` must be one array, as the query tower"):
        model.recommend({"movie": np.array([1])}, k=3)


def test_unknown_exclusions_name_the_argument_that_skips_them():
    model = indexed_model()
    for call in (
        lambda: model.recommend(np.array([1]), k=3, exclude=[[999]]),
        lambda: model.similar_items(np.array([1]), k=3, exclude=[[999]]),
    ):
        with pytest.raises(
            ValueError,
            match=r"excluded id\(s\) .*\[999\]\. Pass "
            r"ignore_unknown_exclusions=True to skip them\.",
        ):
            call()
    assert model.similar_items(
        np.array([1]), k=3, exclude=[[999]], ignore_unknown_exclusions=True
    ).shape == (1, 3)
    with pytest.raises(ValueError, match=r"Pass ignore_unknown=True"):
        model.candidate_index.positions_of([999])
