"""HistoryTower: pooling against NumPy, the shared item table, saving, bad input."""

import keras
import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip, save_and_load

HISTORY = np.array([[3, 1, 4, -1], [-1, -1, -1, -1], [2, 2, 0, 5]], dtype="int32")


def numpy_pool(table, history, position_logits=None, content=None, ages=None, slope=0.0):
    """The pooled history in NumPy: a softmax over the present items' logits."""
    out = np.zeros((len(history), table.shape[1]))
    for row, items in enumerate(history):
        present = items >= 0
        if not present.any():
            continue
        embedded = table[items[present]]
        logits = np.zeros(present.sum())
        if position_logits is not None:
            logits += position_logits[present]
        if content is not None:
            logits += embedded @ content
        if ages is not None:
            logits -= slope * np.log1p(ages[row][present])
        weights = np.exp(logits - logits.max())
        out[row] = (weights / weights.sum()) @ embedded
    return out


def weights_of(tower, name):
    (variable,) = [w for w in tower.weights if w.path.endswith(name)]
    return variable


@pytest.mark.parametrize("pooling", ["mean", "recency", "attention"])
def test_pooling_matches_numpy(pooling):
    tower = two_tower.HistoryTower(
        10, embedding_dim=3, max_length=4, pooling=pooling, project=False
    )
    tower({"history": HISTORY})
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 3)).astype("float32")
    tower.item_table.embeddings.assign(table)
    positions = content = None
    if pooling != "mean":
        positions = rng.normal(size=4).astype("float32")
        weights_of(tower, "position_logits").assign(positions)
    if pooling == "attention":
        content = rng.normal(size=3).astype("float32")
        weights_of(tower, "content_logits").assign(content)
    found = keras.ops.convert_to_numpy(tower({"history": HISTORY}))
    np.testing.assert_allclose(found, numpy_pool(table, HISTORY, positions, content), atol=1e-5)


def test_ages_lower_the_weight_of_old_items_as_numpy_does():
    tower = two_tower.HistoryTower(10, embedding_dim=3, max_length=4, age_key="age", project=False)
    ages = np.array([[1.0, 10.0, 100.0, 0.0], [0, 0, 0, 0], [0.5, 3.0, 7.0, 2.0]], "float32")
    tower({"history": HISTORY, "age": ages})
    table = np.random.default_rng(1).normal(size=(10, 3)).astype("float32")
    tower.item_table.embeddings.assign(table)
    weights_of(tower, "age_slope").assign(np.float32(0.7))
    found = keras.ops.convert_to_numpy(tower({"history": HISTORY, "age": ages}))
    expected = numpy_pool(table, HISTORY, np.zeros(4), ages=ages, slope=0.7)
    np.testing.assert_allclose(found, expected, atol=1e-5)


def test_projection_context_and_constant_bias():
    context = two_tower.FeatureTower(
        categorical={"user": 5}, embedding_dim=3, output_dim=None, combiner="sum"
    )
    tower = two_tower.HistoryTower(
        10, embedding_dim=3, max_length=4, pooling="mean", context=context, bias="constant"
    )
    features = {"history": HISTORY, "user": np.array([1, 2, 4], "int32")}
    tower(features)
    rng = np.random.default_rng(2)
    table = rng.normal(size=(10, 3)).astype("float32")
    kernel = rng.normal(size=(3, 3)).astype("float32")
    tower.item_table.embeddings.assign(table)
    tower.projection.kernel.assign(kernel)
    users = keras.ops.convert_to_numpy(context.embeddings["user"].embeddings)
    found = keras.ops.convert_to_numpy(tower(features))
    expected = numpy_pool(table, HISTORY) @ kernel + users[[1, 2, 4]]
    assert found.shape == (3, 4)
    np.testing.assert_allclose(found[:, :3], expected, atol=1e-5)
    np.testing.assert_array_equal(found[:, 3], np.ones(3))


def test_gru_reads_only_present_items_and_empty_history_is_zero():
    tower = two_tower.HistoryTower(10, embedding_dim=3, max_length=4, pooling="gru")
    found = keras.ops.convert_to_numpy(tower({"history": HISTORY}))
    np.testing.assert_array_equal(found[1], np.zeros(3))
    # Padding is masked: a longer pad after the same items gives the same output.
    padded = two_tower.HistoryTower(10, embedding_dim=3, max_length=6, pooling="gru")
    padded({"history": np.full((1, 6), -1, "int32")})
    padded.set_weights(tower.get_weights())
    wide = np.concatenate([HISTORY, np.full((3, 2), -1, "int32")], axis=1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(padded({"history": wide})), found, atol=1e-5
    )
    assert np.all(np.abs(found[0] - found[2]) > 0)


def shared_model(pooling="recency", dim=4, items=12):
    candidates = two_tower.IdEmbeddingTower(items, embedding_dim=dim, bias="learned")
    model = two_tower.TwoTowerRetrieval(
        two_tower.HistoryTower(max_length=3, pooling=pooling, bias="constant"),
        candidates,
        loss="full_softmax",
        catalogue_size=items,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    return model, candidates


def history_data(rows=64, items=12, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 8, rows)
    movies = rng.integers(0, items, rows).astype("int32")
    times = np.arange(rows)
    history = two_tower.InteractionLog(users, movies, times).history(users, times, 3)
    return {"query": {"history": history}, "candidate": movies}


def test_shares_the_candidate_table_and_trains_it_once():
    model, candidates = shared_model()
    assert model.query_tower.item_table is candidates.embedding
    x = history_data()
    model.fit(x, batch_size=16, epochs=1, verbose=0)
    paths = [w.path for w in model.trainable_weights]
    assert len(paths) == len(set(paths))
    table_variables = [w for w in model.weights if w is candidates.embedding.embeddings]
    assert len(table_variables) == 1
    # The query embeds a history with the candidate rows (project=True starts at I).
    table = keras.ops.convert_to_numpy(candidates.embedding.embeddings)
    query = keras.ops.convert_to_numpy(model.query_tower({"history": np.array([[5, -1, -1]])}))
    kernel = keras.ops.convert_to_numpy(model.query_tower.projection.kernel)
    np.testing.assert_allclose(query[0, :4], table[5] @ kernel, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["recency", "gru"])
def test_saved_and_loaded_with_the_model(tmp_path, pooling):
    model, _ = shared_model(pooling)
    x = history_data()
    model.fit(x, batch_size=16, epochs=2, verbose=0)
    restored = save_and_load(model, tmp_path)
    assert restored.query_tower.item_table is restored.candidate_tower.embedding
    assert len(restored.weights) == len(model.weights)
    history = {"history": x["query"]["history"][:10]}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored.query_tower(history)),
        keras.ops.convert_to_numpy(model.query_tower(history)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored.candidate_tower(np.arange(12))),
        keras.ops.convert_to_numpy(model.candidate_tower(np.arange(12))),
        atol=1e-6,
    )
    # The restored towers read one table: training moves it for both, and a
    # row written through the candidate tower changes the queries holding it.
    restored.compile(optimizer=keras.optimizers.Adam(0.05))
    restored.fit(x, batch_size=16, epochs=1, verbose=0)
    table = restored.candidate_tower.embedding.embeddings
    seven, eight = {"history": np.array([[7, -1, -1]])}, {"history": np.array([[8, -1, -1]])}
    if pooling == "recency":
        kernel = keras.ops.convert_to_numpy(restored.query_tower.projection.kernel)
        query = keras.ops.convert_to_numpy(restored.query_tower(seven))
        np.testing.assert_allclose(
            query[0, :4], keras.ops.convert_to_numpy(table)[7] @ kernel, atol=1e-5
        )
    before = [keras.ops.convert_to_numpy(restored.query_tower(h)) for h in (seven, eight)]
    values = keras.ops.convert_to_numpy(table).copy()
    values[7] += 1.0
    table.assign(values)
    after = [keras.ops.convert_to_numpy(restored.query_tower(h)) for h in (seven, eight)]
    assert np.abs(after[0] - before[0]).max() > 1e-3
    np.testing.assert_array_equal(after[1], before[1])


def test_config_round_trip():
    context = two_tower.FeatureTower(categorical={"user": 5}, embedding_dim=3, output_dim=None)
    tower = two_tower.HistoryTower(
        None,
        None,
        max_length=5,
        pooling="attention",
        age_key="age",
        context=context,
        project=False,
        bias="constant",
        l2=0.0,
    )
    restored = assert_config_round_trip(tower)
    assert (restored.max_length, restored.pooling, restored.age_key) == (5, "attention", "age")
    assert isinstance(restored.context, two_tower.FeatureTower)
    own = assert_config_round_trip(two_tower.HistoryTower(9, 2, max_length=2, l2=0.1))
    assert (own.num_items, own.embedding_dim, own.l2) == (9, 2, 0.1)


def test_l2_on_the_own_table_matches_numpy():
    tower = two_tower.HistoryTower(6, embedding_dim=2, max_length=2, l2=0.3)
    tower({"history": np.array([[1, -1]])})
    table = keras.ops.convert_to_numpy(tower.item_table.embeddings)
    penalty = sum(float(keras.ops.convert_to_numpy(loss)) for loss in tower.losses)
    np.testing.assert_allclose(penalty, 0.3 * np.sum(table**2), rtol=1e-5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_items": 0, "embedding_dim": 2}, "`num_items` must be an integer >= 1"),
        ({"num_items": 5}, "`embedding_dim` is required"),
        ({"max_length": 0}, "`max_length` must be an integer >= 1"),
        ({"pooling": "max"}, "`pooling` must be one of"),
        ({"bias": "learned"}, "`bias` must be None or 'constant'"),
        ({"l2": -1.0}, "`l2` must be a finite number >= 0"),
        ({"history_key": ""}, "`history_key` must be a non-empty string"),
        ({"age_key": "history"}, "must differ"),
        ({"context": "user"}, "`context` must be a Keras layer"),
    ],
)
def test_rejects_bad_options(arguments, message):
    with pytest.raises(ValueError, match=message):
        two_tower.HistoryTower(**arguments)


def test_rejects_bad_histories_on_every_backend():
    tower = two_tower.HistoryTower(10, embedding_dim=2, max_length=3)
    with pytest.raises(
        ValueError, match=r"in \[0, 10\) or -1 padding. Received values from -1 to 10"
    ):
        tower({"history": np.array([[10, -1, -1]])})  # JAX would clamp this silently
    with pytest.raises(ValueError, match=r"must be \[batch, 3\] integer item indices"):
        tower({"history": np.array([[1, 2]])})
    with pytest.raises(ValueError, match=r"must be \[batch, 3\] integer item indices"):
        tower({"history": np.array([[1.0, 2.0, 3.0]])})
    with pytest.raises(ValueError, match="The history feature 'history' is missing"):
        tower({"items": np.array([[1, 2, 3]])})
    with pytest.raises(ValueError, match="takes a dict of features"):
        tower.call(np.array([[1, 2, 3]]))


def test_rejects_candidate_towers_it_cannot_share():
    unshared = two_tower.HistoryTower(max_length=3)
    with pytest.raises(ValueError, match="has none yet"):
        unshared({"history": np.array([[1, -1, -1]])})
    with pytest.raises(ValueError, match="Received MLPTower"):
        from testing import MLPTower

        two_tower.TwoTowerRetrieval(
            two_tower.HistoryTower(max_length=3),
            MLPTower(10, 4),
            loss="full_softmax",
            catalogue_size=10,
        )
    with pytest.raises(ValueError, match="differs from the shared candidate table's width 4"):
        two_tower.TwoTowerRetrieval(
            two_tower.HistoryTower(embedding_dim=8, max_length=3),
            two_tower.IdEmbeddingTower(10, embedding_dim=4),
        )
