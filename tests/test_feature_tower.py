"""FeatureTower against a NumPy reference, and its bad-input errors."""

import keras
import numpy as np
import pytest

import two_tower


def features():
    return {
        "occupation": np.array([3, 5, 0], dtype="int32"),
        "genres": np.array([[1, 4, -1], [-1, -1, -1], [2, 2, 7]], dtype="int32"),
        "age": np.array([0.25, np.nan, -1.0], dtype="float32"),
    }


def test_matches_numpy():
    tower = two_tower.FeatureTower(
        categorical={"occupation": 6}, multivalued={"genres": 8}, numeric=["age"], output_dim=5
    )
    out = keras.ops.convert_to_numpy(tower(features()))
    occupation = keras.ops.convert_to_numpy(tower.embeddings["occupation"].embeddings)
    genres = keras.ops.convert_to_numpy(tower.embeddings["genres"].embeddings)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in tower.output_layer.weights)
    f = features()
    pooled = []
    for row in f["genres"]:
        present = row[row >= 0]
        pooled.append(genres[present].mean(axis=0) if len(present) else np.zeros(genres.shape[1]))
    age = np.nan_to_num(f["age"], nan=0.0)[:, None]
    expected = np.concatenate([occupation[f["occupation"]], np.array(pooled), age], 1)
    np.testing.assert_allclose(out, expected @ kernel + bias, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()


def test_l2_normalised_and_trains_inside_the_model():
    query = two_tower.FeatureTower(
        categorical={"occupation": 6},
        numeric=["age"],
        hidden_units=[8],
        output_dim=4,
        l2_normalize=True,
    )
    candidate = two_tower.FeatureTower(categorical={"movie": 10}, output_dim=4)
    model = two_tower.TwoTowerRetrieval(query, candidate)
    model.compile(optimizer="adam")
    f = features()
    x = {
        "query": {"occupation": f["occupation"], "age": f["age"]},
        "candidate": {"movie": np.array([1, 2, 3])},
    }
    history = model.fit(x, batch_size=3, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    norms = np.linalg.norm(keras.ops.convert_to_numpy(query(x["query"])), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda f: f.pop("age"), r"'age' is missing"),
        (
            lambda f: f.update(occupation=f["occupation"].astype("float32")),
            r"'occupation'.*integer",
        ),
        (lambda f: f.update(occupation=np.ones((3, 2), "int32")), r"'occupation'.*shape \[batch\]"),
        (lambda f: f.update(genres=np.ones((3,), "int32")), r"'genres'.*\[batch, length\]"),
        (lambda f: f.update(genres=[[1, 4], [], [2, 2, 7]]), r"'genres' is ragged"),
        (
            lambda f: f.update(occupation=np.array(["nurse", "poet", ""])),
            r"'occupation' holds strings.*Vocabulary",
        ),
        (lambda f: f.update(occupation=["nurse", "poet", ""]), r"'occupation' holds strings"),
        (
            lambda f: f.update(genres=np.array([[1], [2, 3], []], dtype=object)),
            r"'genres' is ragged",
        ),
    ],
)
def test_bad_features_raise_naming_the_feature(change, match):
    tower = two_tower.FeatureTower(
        categorical={"occupation": 6}, multivalued={"genres": 8}, numeric=["age"]
    )
    f = features()
    change(f)
    with pytest.raises(ValueError, match=match):
        tower(f)


def test_config_round_trip():
    tower = two_tower.FeatureTower(categorical={"a": 3}, numeric=["b"], hidden_units=[4])
    restored = two_tower.FeatureTower.from_config(tower.get_config())
    assert restored.get_config() == tower.get_config()


def test_sum_combiner_with_learned_bias_matches_numpy():
    tower = two_tower.FeatureTower(
        categorical={"occupation": 6},
        multivalued={"genres": 8},
        numeric=["age"],
        combiner="sum",
        output_dim=None,
        embedding_dim=4,
        bias="learned",
    )
    out = keras.ops.convert_to_numpy(tower(features()))
    assert out.shape == (3, 5)
    # Give the bias tables non-zero values so that they are checked too.
    rng = np.random.default_rng(0)
    for layer in [*tower.biases.values(), tower.numeric_bias]:
        weight = layer.weights[0]
        weight.assign(rng.normal(size=tuple(weight.shape)).astype("float32"))
    out = keras.ops.convert_to_numpy(tower(features()))
    f = features()
    table = {n: keras.ops.convert_to_numpy(e.embeddings) for n, e in tower.embeddings.items()}
    bias = {n: keras.ops.convert_to_numpy(e.embeddings) for n, e in tower.biases.items()}
    projection = keras.ops.convert_to_numpy(tower.numeric_projection.kernel)
    age_bias = keras.ops.convert_to_numpy(tower.numeric_bias.kernel)
    age = np.nan_to_num(f["age"], nan=0.0)[:, None]

    def pooled(values):
        rows = []
        for row in f["genres"]:
            present = row[row >= 0]
            rows.append(values[present].mean(axis=0) if len(present) else np.zeros(values.shape[1]))
        return np.array(rows)

    vector = table["occupation"][f["occupation"]] + pooled(table["genres"]) + age @ projection
    scalar = bias["occupation"][f["occupation"]] + pooled(bias["genres"]) + age @ age_bias
    np.testing.assert_allclose(out, np.concatenate([vector, scalar], 1), rtol=1e-5, atol=1e-5)


def test_constant_bias_and_per_feature_l2():
    tower = two_tower.FeatureTower(
        categorical={"occupation": 6},
        multivalued={"genres": 8},
        output_dim=3,
        bias="constant",
        l2={"genres": 0.5},
    )
    out = keras.ops.convert_to_numpy(tower(features()))
    np.testing.assert_array_equal(out[:, -1], 1.0)
    genres = keras.ops.convert_to_numpy(tower.embeddings["genres"].embeddings)
    assert len(tower.losses) == 1  # only the genres table is penalised
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(tower.losses[0]), 0.5 * np.sum(genres**2), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"combiner": "mean"}, "`combiner` must be one of"),
        ({"bias": "yes"}, "`bias` must be one of"),
        ({"l2": -1.0}, "`l2` must be a finite number >= 0"),
        ({"l2": {"occupation": "big"}}, "`l2` must be a finite number >= 0"),
        ({"l2": float("nan")}, "`l2` must be a finite number >= 0"),
        ({"l2": {"zip": 0.1}}, "unknown feature 'zip'"),
        ({"output_dim": 0}, r"`output_dim` must be an integer >= 1\. Received: output_dim=0"),
        ({"hidden_units": [8.0]}, r"`hidden_units` must be an integer >= 1"),
        ({"l2_normalize": "yes"}, r"`l2_normalize` must be True or False"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_tower.FeatureTower(categorical={"occupation": 6}, **kwargs)
