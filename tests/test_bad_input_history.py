"""Bad input to HistoryTower, InteractionLog and the baselines: one clear error on every backend.

Each case names the argument, what was received and what was expected. Before,
several were silent: `age_key` with `pooling="mean"` or `"gru"` (and `l2` with a
shared table) was accepted and ignored; negative, NaN or infinite ages trained
without a word (NaN or inf gave NaN queries); NaN ages at padded positions
poisoned the gradients (every weight NaN after one step on every backend);
ids below -1 were read as padding; `EASE` and `Popularity` scored every item 0
before `fit` or after fitting on nothing. Others were obscure: a bare history
array, ragged lists, missing ages (a `KeyError` inside the call) and ages of
another shape or dtype (each backend in its own words). The acceptance tests at
the end pin what is accepted on purpose, with NumPy expected values.
"""

import json

import keras
import numpy as np
import pytest

import two_tower
from two_tower.baselines import EASE, Popularity

HISTORY = np.array([[3, 1, -1], [2, -1, -1]])
AGES = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], "float32")


def tower(**options):
    arguments = {"num_items": 10, "embedding_dim": 4, "max_length": 3}
    return two_tower.HistoryTower(**{**arguments, **options})


def aged(ages):
    return tower(age_key="age")({"history": HISTORY, "age": np.asarray(ages, "float32")})


def fitted_ease():
    return EASE(3, l2=1.0).fit(np.array([0, 0, 1]), np.array([0, 1, 2]))


def fitted_popularity():
    return Popularity(3).fit(np.array([0, 1, 1]))


LOG = two_tower.InteractionLog(np.array([7, 7, 9]), np.array([1, 2, 3]), np.array([10, 20, 5]))

CASES = [
    # HistoryTower: options its configuration would ignore.
    (
        lambda: tower(pooling="mean", age_key="age"),
        r"`age_key` applies to pooling='recency' and 'attention'.*pooling='mean' would ignore",
    ),
    (lambda: tower(pooling="gru", age_key="age"), r"pooling='gru' would ignore the ages"),
    (
        lambda: two_tower.HistoryTower(max_length=3, l2=0.1),
        r"`l2` penalises the tower's own item table.*Received: l2=0.1",
    ),
    # HistoryTower: option values.
    (lambda: tower(l2=float("nan")), r"`l2` must be a finite number >= 0.0. Received: l2=nan"),
    (lambda: tower(project="no"), r"`project` must be True or False. Received: project='no'"),
    (
        lambda: tower(max_length=3.0),
        r"`max_length` must be an integer >= 1. Received: max_length=3",
    ),
    (lambda: tower(bias="learned"), r"`bias` must be None or 'constant'. Received: bias='learned'"),
    # HistoryTower: the features.
    (
        lambda: tower()(HISTORY),
        r"takes a dict of features, \{'history': \[batch, 3\] item indices\}. Received a bare "
        r"ndarray of shape \(2, 3\)",
    ),
    (
        lambda: tower()({"history": [[3, 1], [2]]}),
        r"'history' in features must be a rectangular \[batch, 3\] array. Received ragged rows "
        r"of lengths \[1, 2\]",
    ),
    (
        lambda: tower()({"history": np.array([[3, -2, -1]])}),
        r"item indices in \[0, 10\) or -1 padding. Received values from -2 to 3",
    ),
    (
        lambda: tower()({"history": np.array([[-1, 3, 1]])}),
        r"Row 0 has padding before an item: \[-1, 3, 1\]. keras.utils.pad_sequences pads in front",
    ),
    (
        lambda: tower(age_key="age")({"history": HISTORY}),
        r"HistoryTower\(age_key='age'\) reads each item's age, but features holds no 'age'",
    ),
    (lambda: aged(-AGES), r"must be finite and >= 0 where the history holds an item.*Received -1"),
    (lambda: aged(np.where(HISTORY >= 0, np.nan, 0)), r"finite and >= 0 .*Received nan at row 0"),
    (lambda: aged(np.where(HISTORY >= 0, np.inf, 0)), r"finite and >= 0 .*Received inf at row 0"),
    (lambda: aged(AGES[:1]), r"one age \(a number\) per history entry, shape \(2, 3\)"),
    (
        lambda: tower(age_key="age")({"history": HISTORY, "age": AGES.astype(str)}),
        r"one age \(a number\) per history entry.*dtype <U",
    ),
    # InteractionLog.
    (
        lambda: two_tower.InteractionLog(np.array([[7], [7]]), [1, 2], [1, 2]),
        r"must be 1-D arrays of the same length. Received shapes \(2, 1\), \(2,\) and \(2,\)",
    ),
    (
        lambda: two_tower.InteractionLog(np.array(["a", None], object), [1, 2], [1, 2]),
        r"`users` must hold integer or string user ids. Received an object array holding None",
    ),
    (
        lambda: EASE(3, l2=1.0).fit(np.array([1, "1"], object), np.array([0, 1])),
        r"`users` must hold integer or string user ids, not both: as one kind, 1 and '1' would "
        r"be one user. Received 1 at position 0 and '1' at position 1",
    ),
    (
        lambda: two_tower.InteractionLog([7], [1], np.array(["2020-01-01"], "datetime64[s]")),
        r"`times` must hold numbers. Received dtype datetime64\[s\]. Convert datetimes",
    ),
    (
        lambda: LOG.history(np.array([7]), np.array([np.inf]), 2, ages=True),
        r"history\(ages=True\) needs finite request `times`.*Received inf at position 0",
    ),
    (
        lambda: LOG.history(np.array([7]), np.array([30]), 2, ages="no"),
        r"`ages` must be True or False. Received: ages='no'",
    ),
    (
        lambda: LOG.history(np.array([7]), np.array([30]), np.float64(2)),
        r"`width` must be an integer >= 1. Received: width=",
    ),
    # Baselines.
    (
        lambda: EASE(3, l2=1.0).embed_histories(np.array([[0, -1]])),
        r"EASE.embed_histories was called before EASE.fit",
    ),
    (
        lambda: EASE(3, l2=1.0).catalogue_embeddings(),
        r"EASE.catalogue_embeddings was called before EASE.fit",
    ),
    (
        lambda: Popularity(3).catalogue_embeddings(),
        r"Popularity.catalogue_embeddings was called before Popularity.fit",
    ),
    (
        lambda: Popularity(3).embed_histories(np.array([[0]])),
        r"Popularity.embed_histories was called before Popularity.fit",
    ),
    (
        lambda: EASE(3, l2=1.0).fit(np.array([]), np.array([])),
        r"EASE.fit: `items` is empty: fitting needs at least one interaction",
    ),
    (lambda: Popularity(3).fit([]), r"Popularity.fit: `items` is empty"),
    (
        lambda: EASE(3, l2=1.0).fit(np.array([0.0, np.nan]), np.array([0, 1])),
        r"`users` must not hold NaN or infinity.*Received nan at position 1",
    ),
    (
        lambda: EASE(3, l2=1.0).fit(np.array(["a", None], object), np.array([0, 1])),
        r"`users` must hold integer or string user ids. Received an object array holding None",
    ),
    (
        lambda: fitted_ease().embed_histories(np.array([[0, -2]])),
        r"`histories` must hold item indices in \[0, 3\) or -1 padding \(num_items=3\). "
        r"Received values from -2 to 0",
    ),
    (
        lambda: fitted_ease().embed_histories([[0, 1], [2]]),
        r"`histories` must be a rectangular \[queries, width\] array. Received ragged rows",
    ),
    (
        lambda: fitted_popularity().embed_histories(5),
        r"`histories` must be a 2-D \[queries, width\] array \(only its row count is read\). "
        r"Received shape \(\)",
    ),
    (lambda: EASE(3, l2=np.float32(0.0)), r"EASE: `l2` must be a finite number > 0.0"),
]


@pytest.mark.parametrize(("build", "message"), CASES)
def test_bad_input_raises_a_clear_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_histories_are_refused_before_a_step_of_a_model():
    model = two_tower.TwoTowerRetrieval(
        two_tower.HistoryTower(max_length=3, age_key="age", bias="constant"),
        two_tower.IdEmbeddingTower(10, embedding_dim=4, bias="learned"),
        loss="full_softmax",
        catalogue_size=10,
    )
    model.compile(optimizer="sgd")
    candidates = np.array([1, 2])
    with pytest.raises(ValueError, match=r"x\['query'\] holds no 'age'"):
        model.fit({"query": {"history": HISTORY}, "candidate": candidates}, verbose=0)
    flipped = {"history": HISTORY, "age": -AGES}  # interaction time - request time
    with pytest.raises(ValueError, match=r"'age' in x\['query'\] must be finite and >= 0"):
        model.fit({"query": flipped, "candidate": candidates}, verbose=0)
    with pytest.raises(
        ValueError, match=r"in \[0, 10\) or -1 padding. Received values from -1 to 10"
    ):
        model.fit(
            {
                "query": {"history": np.where(HISTORY >= 0, HISTORY + 7, -1), "age": AGES},
                "candidate": candidates,
            }
        )


def test_a_bare_history_array_is_refused_but_batches_of_dicts_pass_to_predict():
    """The bare-array message is for arrays; a PyDataset (or tf.data) of dicts is batches."""
    model = two_tower.TwoTowerRetrieval(
        two_tower.HistoryTower(max_length=3), two_tower.IdEmbeddingTower(10, embedding_dim=4)
    )
    with pytest.raises(ValueError, match=r"Received a bare ndarray of shape \(2, 3\) in x"):
        model.predict(HISTORY, verbose=0)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return ({"history": HISTORY},)

    predicted = model.predict(Batches(), verbose=0)
    # An unfitted tower: the projection is the identity, so the mean of the item rows.
    table = keras.ops.convert_to_numpy(model.candidate_tower.embedding.embeddings)
    expected = np.stack([table[row[row >= 0]].mean(axis=0) for row in HISTORY])
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Accepted on purpose, with NumPy expected values.


def numpy_recency(table, history, positions, ages, slope):
    out = np.zeros((len(history), table.shape[1]))
    for row, items in enumerate(history):
        present = items >= 0
        logits = positions[present] - slope * np.log1p(ages[row][present])
        weights = np.exp(logits - logits.max())
        out[row] = (weights / weights.sum()) @ table[items[present]]
    return out


def test_nan_ages_at_padded_positions_are_masked_in_the_call():
    history = np.array([[3, 1, -1], [2, -1, -1]])
    ages = np.array([[1.0, 5.0, np.nan], [3.0, np.inf, -4.0]], "float32")
    layer = tower(age_key="age", project=False)
    layer({"history": history, "age": np.nan_to_num(ages)})
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 4)).astype("float32")
    positions = rng.normal(size=3).astype("float32")
    layer.item_table.embeddings.assign(table)
    layer.position_logits.assign(positions)
    layer.age_slope.assign(np.float32(0.8))
    found = keras.ops.convert_to_numpy(layer({"history": history, "age": ages}))
    expected = numpy_recency(table, history, positions, np.nan_to_num(ages), 0.8)
    np.testing.assert_allclose(found, expected, atol=1e-5)


def test_nan_ages_at_padded_positions_train_to_finite_weights():
    rng = np.random.default_rng(1)
    history = np.where(np.arange(3) < rng.integers(1, 4, (16, 1)), rng.integers(0, 10, (16, 3)), -1)
    ages = np.where(history >= 0, rng.uniform(1, 50, history.shape), np.nan).astype("float32")
    model = two_tower.TwoTowerRetrieval(
        two_tower.HistoryTower(max_length=3, age_key="age", bias="constant"),
        two_tower.IdEmbeddingTower(10, embedding_dim=4, bias="learned"),
        loss="full_softmax",
        catalogue_size=10,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    x = {"query": {"history": history, "age": ages}, "candidate": rng.integers(0, 10, 16)}
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    for weight in model.weights:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(weight))), weight.path
    assert float(keras.ops.convert_to_numpy(model.query_tower.age_slope)) != 0.0


def test_numpy_scalar_options_and_rectangular_lists_are_accepted():
    layer = two_tower.HistoryTower(
        np.int64(10), np.int32(4), max_length=np.int64(3), l2=np.float32(0.5), project=np.True_
    )
    config = layer.get_config()
    json.dumps(config)  # Python numbers, not NumPy scalars
    assert type(config["num_items"]) is int and type(config["l2"]) is float
    assert type(config["project"]) is bool
    as_list = keras.ops.convert_to_numpy(layer({"history": HISTORY.tolist()}))
    np.testing.assert_allclose(as_list, keras.ops.convert_to_numpy(layer({"history": HISTORY})))


def test_interaction_log_accepts_object_strings_and_empty_lists():
    users = np.array(["a", "b", "a"], object)  # as a pandas column of strings gives them
    log = two_tower.InteractionLog(users, [4, 5, 6], [1, 2, 3])
    found = log.history(np.array(["a", "c"], object), [5, 5], 3)
    np.testing.assert_array_equal(found, [[6, 4, -1], [-1, -1, -1]])
    empty = two_tower.InteractionLog([], [], [])
    assert len(empty) == 0
    np.testing.assert_array_equal(empty.history([1], [1.0], 2), [[-1, -1]])


def test_baselines_accept_numpy_scalars_and_read_histories_as_sets():
    users, items = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 2])
    ease = EASE(np.int64(3), l2=np.float32(2.0)).fit(users, items)
    assert ease.get_config() == {"num_items": 3, "l2": 2.0, "max_items": 20_000}
    # EASE reads a history as a set: padding anywhere, repeats once.
    embedded = ease.embed_histories(np.array([[-1, 2, -1, 2], [-1, -1, -1, -1]]))
    np.testing.assert_array_equal(embedded, [[0, 0, 1, 0], [0, 0, 0, 1]])
    # Popularity reads only the row count: any values, documented.
    popularity = Popularity(np.int64(3)).fit(items)
    np.testing.assert_array_equal(popularity.embed_histories(np.array([[99], [-7]])), [[1], [1]])
