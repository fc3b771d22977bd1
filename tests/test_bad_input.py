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

NUM_QUERIES, NUM_CANDIDATES, DIM = 12, 30, 4


def make_model(loss="softmax"):
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_QUERIES, DIM), keras.layers.Embedding(NUM_CANDIDATES, DIM), loss
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
