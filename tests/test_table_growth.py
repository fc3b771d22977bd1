"""Growing vocabularies and tables: `Vocabulary.add`, the towers' `grow`, `grow_tables`.

The reference for "training goes on where it was" is a model that had the
larger tables from the start (its new rows set to the values growth draws):
rows no batch looks up get a zero gradient, so Adam's and Adagrad's updates
leave them and their state untouched until the new ids appear. Growing and
then training must equal it, weights and optimizer state. It uses no growth
code. Vocabulary expectations come from a plain-Python dict.
"""

import keras
import numpy as np
import pytest
from keras import ops

import two_tower
from testing import assert_all_close, assert_config_round_trip, run_doc_blocks, save_and_load

OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.05),
    "adagrad": lambda: keras.optimizers.Adagrad(0.3),
}


def numpy(value):
    return ops.convert_to_numpy(value)


# ------------------------------------------------------------------ Vocabulary
def test_add_appends_new_values_and_keeps_every_old_index():
    vocab = two_tower.Vocabulary(["drama", "comedy", "noir"], num_oov_buckets=3)
    probe = ["drama", "comedy", "noir", "horror", "western", "opera", "x"]
    before = vocab(probe).tolist()
    returned = vocab.add(["western", "comedy", "a-much-longer-genre", "western"])
    # The documented rule, by hand: new values after the known ones, first-seen order.
    expected = {"drama": 3, "comedy": 4, "noir": 5, "western": 6, "a-much-longer-genre": 7}
    assert returned.tolist() == [6, 4, 7, 6]
    assert vocab.size == 8
    after = vocab(probe).tolist()
    for value, old, new in zip(probe, before, after, strict=True):
        assert new == expected.get(value, old)  # unknown values keep their OOV bucket
    assert vocab.vocabulary.tolist() == list(expected)
    assert vocab.values_of(np.array([7])).tolist() == ["a-much-longer-genre"]
    clone = assert_config_round_trip(vocab)
    assert clone(probe).tolist() == after


def test_add_to_integer_and_empty_vocabularies():
    vocab = two_tower.Vocabulary([10, 20], padding=-1)
    assert vocab.add(np.array([[30, 10], [40, 30]])).tolist() == [[3, 1], [4, 3]]
    assert vocab([20, 30, 40, 50, -1]).tolist() == [2, 3, 4, 0, -1]
    empty = two_tower.Vocabulary([])
    assert empty.add([7, 5, 7]).tolist() == [1, 2, 1]
    assert empty([5, 7, 6]).tolist() == [2, 1, 0]


@pytest.mark.parametrize(
    "values, match",
    [
        ([3], "cannot be added"),
        (["b", ""], "empty string"),
        (["b", "<pad>"], "padding value"),
        ([1.5], "dtype float64"),
    ],
)
def test_add_refuses_bad_values_and_adds_nothing(values, match):
    vocab = two_tower.Vocabulary(["a"], padding="<pad>")
    with pytest.raises(ValueError, match=match):
        vocab.add(values)
    assert vocab.vocabulary.tolist() == ["a"] and vocab(["b"]).tolist() == [0]
    with pytest.raises(ValueError, match="not set"):
        two_tower.Vocabulary().add(["a"])


# ------------------------------------------------------------------ training on
def _model(tables, sparse, optimizer, users, items):
    model = two_tower.TwoTowerRetrieval(
        two_tower.IdEmbeddingTower(users, 4, bias="constant", sparse=sparse),
        two_tower.IdEmbeddingTower(items, 4, bias="learned", sparse=sparse),
    )
    model.compile(optimizer=OPTIMIZERS[optimizer]())
    model.predict({"query": np.arange(2), "candidate": np.arange(2)}, verbose=0)  # builds
    for variable, value in zip(model.trainable_variables, tables, strict=True):
        variable.assign(value)
    return model


def _fit(model, users, items):
    x = {"query": np.asarray(users), "candidate": np.asarray(items)}
    model.fit(x, batch_size=4, epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_grown_model_trains_on_as_one_that_had_the_rows(sparse, optimizer):
    rng = np.random.default_rng(0)
    users, items, new_users, new_items = 6, 8, 9, 12
    start = [
        rng.normal(0, 0.3, (users, 4)).astype("float32"),
        rng.normal(0, 0.3, (items, 4)).astype("float32"),
        rng.normal(0, 0.1, (items, 1)).astype("float32"),
    ]
    old_batches = (rng.integers(0, users, 16), rng.integers(0, items, 16))
    new_batches = (rng.integers(0, new_users, 16), rng.integers(0, new_items, 16))
    new_batches[0][:4], new_batches[1][:4] = [6, 7, 8, 2], [8, 11, 9, 10]

    grown = _model(start, sparse, optimizer, users, items)
    _fit(grown, *old_batches)
    queries = rng.normal(size=(3, 5)).astype("float32")
    queries[:, -1] = 1.0
    grown.index_candidates(np.arange(items))
    served = grown.recommend(np.array([0, 3, 5]), k=5)
    old_rows = [numpy(v) for v in grown.trainable_variables]
    grown.grow_tables(query=new_users, candidate=new_items)

    # Old ids embed and serve exactly as before; new rows are fresh draws (biases zero).
    tables = [numpy(v) for v in grown.trainable_variables]
    assert [t.shape[0] for t in tables] == [new_users, new_items, new_items]
    for before, after in zip(old_rows, tables, strict=True):
        np.testing.assert_array_equal(after[: len(before)], before)
    assert np.all(tables[2][items:] == 0) and np.all(np.abs(tables[1][items:]) <= 0.05)
    assert np.any(tables[1][items:] != 0)
    again = grown.recommend(np.array([0, 3, 5]), k=5)
    np.testing.assert_array_equal(numpy(again[0]), numpy(served[0]))
    np.testing.assert_array_equal(numpy(again[1]), numpy(served[1]))
    assert grown.candidate_tower.vocabulary_size == new_items

    # The reference: the larger tables from the start, new rows as growth drew them.
    reference = _model(
        [np.concatenate([s, t[len(s) :]]) for s, t in zip(start, tables, strict=True)],
        sparse,
        optimizer,
        new_users,
        new_items,
    )
    _fit(reference, *old_batches)
    _fit(grown, *new_batches)
    _fit(reference, *new_batches)
    for mine, theirs in zip(grown.trainable_variables, reference.trainable_variables, strict=True):
        assert_all_close(mine, theirs, atol=1e-6)
    assert int(numpy(grown.optimizer.iterations)) == int(numpy(reference.optimizer.iterations))
    mine = [numpy(v) for v in grown.optimizer.variables]
    theirs = [numpy(v) for v in reference.optimizer.variables]
    assert [m.shape for m in mine] == [t.shape for t in theirs]
    for m, t in zip(mine, theirs, strict=True):
        assert_all_close(m, t, atol=1e-6)


def test_grow_tables_follows_the_model_vocabularies_and_saves(tmp_path):
    users = two_tower.Vocabulary(["u1", "u2"])
    items = two_tower.Vocabulary([101, 102, 103])
    model = two_tower.TwoTowerRetrieval(
        two_tower.IdEmbeddingTower(users.size, 4),
        two_tower.IdEmbeddingTower(items.size, 4),
        query_vocabulary=users,
        candidate_vocabulary=items,
        loss="full_softmax",
        catalogue_size=items.size,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    x = {"query": np.array(["u1", "u2", "u1"]), "candidate": np.array([101, 102, 103])}
    model.fit(x, epochs=1, verbose=0)
    users.add(["u3"])
    items.add([104, 105])
    with pytest.raises(ValueError, match="grow_tables"):  # the vocabulary outgrew the table
        model.fit({"query": np.array(["u1"]), "candidate": np.array([104])}, verbose=0)
    model.grow_tables()
    assert model.query_tower.vocabulary_size == 4 and model.candidate_tower.vocabulary_size == 6
    assert model.catalogue_size == 6
    model.fit({"query": np.array(["u3", "u1"]), "candidate": np.array([105, 104])}, verbose=0)
    loaded = save_and_load(model, tmp_path)
    assert loaded.catalogue_size == 6 and loaded.candidate_vocabulary.size == 6
    probe = items(np.array([101, 104, 105]))
    assert_all_close(loaded.embed_candidates(probe), model.embed_candidates(probe))
    for mine, theirs in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        assert_all_close(mine, theirs)


def test_feature_history_and_keras_tables_grow():
    tower = two_tower.FeatureTower(
        categorical={"city": 3},
        multivalued={"tags": 4},
        numeric=["age"],
        output_dim=4,
        bias="learned",
    )
    features = {"city": np.array([0, 2]), "tags": np.array([[1, -1], [3, 2]]), "age": np.ones(2)}
    before = numpy(tower(features))
    tower.grow({"tags": 6})
    assert tower.table_sizes() == {"city": 3, "tags": 6}
    assert tower.embeddings["tags"].input_dim == 6 and tower.biases["tags"].input_dim == 6
    assert_all_close(tower(features), before)
    assert tuple(tower({**features, "tags": np.array([[5, -1], [4, 0]])}).shape) == (2, 5)
    with pytest.raises(ValueError, match="no table for"):
        tower.grow({"age": 5})

    history = two_tower.HistoryTower(num_items=5, embedding_dim=4, max_length=3)
    rows = {"history": np.array([[1, 4, -1]])}
    before = numpy(history(rows))
    history.grow(7)
    assert history.table_sizes() == {"history": 7}
    assert_all_close(history(rows), before)
    with pytest.raises(ValueError, match="one item table"):
        history.grow({"genres": 9})

    sequential = keras.Sequential([keras.layers.Embedding(5, 3)])
    model = two_tower.TwoTowerRetrieval(two_tower.IdEmbeddingTower(4, 3), sequential)
    model.compile(optimizer="adagrad")
    model.fit({"query": np.array([0, 1]), "candidate": np.array([3, 4])}, verbose=0)
    old = numpy(sequential.layers[0].embeddings)
    model.grow_tables(candidate=8)
    np.testing.assert_array_equal(numpy(sequential.layers[0].embeddings)[:5], old)
    model.fit({"query": np.array([0, 1]), "candidate": np.array([7, 6])}, verbose=0)


def test_growing_within_table_rows_copies_nothing():
    tower = two_tower.IdEmbeddingTower(5, 4, table_rows=8)
    tower(np.array([0]))
    variable = tower.embedding.embeddings
    old = numpy(variable)
    tower.grow(7)
    assert tower.embedding.embeddings is variable and tower.table_rows == 8
    new = numpy(variable)
    np.testing.assert_array_equal(new[:5], old[:5])
    assert np.any(new[5:7] != 0) and np.all(new[7:] == 0)
    tower.grow(9)
    assert tower.embedding.input_dim == 9 and tower.table_rows is None


def test_bad_growth_is_refused_and_changes_nothing():
    model = two_tower.TwoTowerRetrieval(
        two_tower.IdEmbeddingTower(4, 3), two_tower.IdEmbeddingTower(6, 3)
    )
    model.compile(optimizer="adam")
    model.fit({"query": np.array([0, 1]), "candidate": np.array([3, 4])}, verbose=0)
    optimizer, shapes = model.optimizer, [v.shape for v in model.trainable_variables]
    for kwargs, match in [
        ({"query": 6, "candidate": 5}, "can only grow"),
        ({"candidate": {"item": 9}}, "integer"),
        ({"query": 2.5}, "integer size"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.grow_tables(**kwargs)
        assert model.optimizer is optimizer
        assert [v.shape for v in model.trainable_variables] == shapes
    custom = two_tower.TwoTowerRetrieval(
        keras.Sequential([keras.layers.Dense(3)]), two_tower.IdEmbeddingTower(6, 3)
    )
    with pytest.raises(ValueError, match="cannot grow its tables"):
        custom.grow_tables(query=5)
    custom.grow_tables()  # nothing asked: nothing to do


def test_growth_guide_runs():
    namespace = run_doc_blocks(
        "docs/open-ids.md", "test_table_growth.py::test_growth_guide_runs", {}
    )
    assert namespace["items"].size == 36 and namespace["users"].size == 43
    assert namespace["model"].candidate_tower.vocabulary_size == 36
    recommendations = namespace["recommendations"]
    assert recommendations.shape == (2, 5)
    assert set(recommendations.reshape(-1)) <= set(namespace["items"].vocabulary)


def _trained(optimizer, candidate=None, query=None):
    model = two_tower.TwoTowerRetrieval(
        query or two_tower.IdEmbeddingTower(4, 3), candidate or two_tower.IdEmbeddingTower(6, 3)
    )
    model.compile(optimizer=optimizer)
    model.fit({"query": np.array([0, 1]), "candidate": np.array([3, 4])}, verbose=0)
    return model


def test_optimizer_options_carry_over():
    # A moving average of the weights starts at the new rows' values, not at zero
    # (also inside the loss-scale wrapper that mixed precision compiles with).
    for optimizer in (
        keras.optimizers.Adam(0.05, use_ema=True),
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05, use_ema=True)),
    ):
        model = _trained(optimizer)
        model.grow_tables(candidate=9)
        table = model.candidate_tower.embedding.embeddings
        inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
        averages = inner._model_variables_moving_average
        average = next(a for a in averages if tuple(a.shape) == (9, 3))
        np.testing.assert_array_equal(numpy(average)[6:], numpy(table)[6:])
    # Variables excluded from weight decay stay excluded: an untouched row keeps its value.
    optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["embeddings"])
    # (A Dense layer left to decay: Keras' torch AdamW fails when every variable is excluded.)
    query = keras.Sequential([keras.layers.Embedding(4, 3), keras.layers.Dense(3)])
    model = _trained(optimizer, query=query)
    model.grow_tables(candidate=8)
    before = numpy(model.candidate_tower.embedding.embeddings)
    model.fit({"query": np.array([0, 1]), "candidate": np.array([3, 4])}, verbose=0)
    after = numpy(model.candidate_tower.embedding.embeddings)
    np.testing.assert_array_equal(after[[0, 1, 2, 5, 6, 7]], before[[0, 1, 2, 5, 6, 7]])


class _ForgetfulAdam(keras.optimizers.Adam):  # (named: a leading _ is no scope name)
    """An Adam whose config forgets `amsgrad`: rebuilt, it would have fewer variables."""

    def get_config(self):
        return {**super().get_config(), "amsgrad": False}


def test_an_optimizer_its_config_cannot_rebuild_is_refused_first():
    model = _trained(_ForgetfulAdam(0.05, amsgrad=True, name="forgetful"))
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        model.grow_tables(candidate=9)
    assert [tuple(v.shape) for v in model.trainable_variables] == shapes
    model.fit({"query": np.array([0, 1]), "candidate": np.array([3, 4])}, verbose=0)


def test_new_rows_drawn_at_the_tables_scale_and_parameters_follow():
    table = keras.layers.Embedding(100_000, 3, embeddings_initializer="glorot_uniform")
    model = _trained("adam", keras.Sequential([table]))
    model.grow_tables(candidate=100_002)
    limit = np.sqrt(6 / (100_002 + 3))  # Glorot's bound for the grown table
    new = numpy(table.embeddings)[100_000:]
    assert np.all(np.abs(new) <= limit) and np.any(new != 0)
    if keras.backend.backend() == "torch":
        # Every layer's parameters are the current tables: no old table kept alive.
        shapes = sorted(tuple(p.shape) for p in model.parameters())
        assert shapes == sorted(tuple(v.shape) for v in model.variables)
        tower = two_tower.IdEmbeddingTower(4, 3, bias="learned")
        tower(np.array([0]))
        tower.grow(6)  # a tower grown by itself too
        assert sorted(tuple(p.shape) for p in tower.parameters()) == [(6, 1), (6, 3)]


def test_a_refused_growth_leaves_both_towers_as_they_were():
    table = keras.layers.Embedding(6, 3)
    model = _trained("adam", keras.Sequential([table]))
    table.enable_lora(2)
    query = numpy(model.query_tower.embedding.embeddings)
    with pytest.raises(ValueError, match="LoRA"):
        model.grow_tables(query=5, candidate=8)
    assert model.query_tower.vocabulary_size == 4
    np.testing.assert_array_equal(numpy(model.query_tower.embedding.embeddings), query)


def test_known_values_serve_between_add_and_grow():
    users = two_tower.Vocabulary(["u1", "u2"])
    model = two_tower.TwoTowerRetrieval(
        two_tower.IdEmbeddingTower(users.size, 3),
        two_tower.IdEmbeddingTower(5, 3),
        query_vocabulary=users,
    )
    model.compile(optimizer="adam")
    model.fit({"query": np.array(["u1", "u2"]), "candidate": np.array([3, 4])}, verbose=0)
    model.index_candidates(np.arange(5))
    before = model.recommend(np.array(["u1", "u9"]), k=3)
    users.add(["u3"])
    np.testing.assert_array_equal(model.recommend(np.array(["u1", "u9"]), k=3), before)
    with pytest.raises(ValueError, match="grow_tables"):
        model.recommend(np.array(["u3"]), k=3)
    model.grow_tables()
    assert model.recommend(np.array(["u3"]), k=3).shape == (1, 3)


def test_a_history_tower_grows_from_the_model_vocabulary():
    items = two_tower.Vocabulary([10, 11, 12], padding=-1)
    model = two_tower.TwoTowerRetrieval(
        two_tower.HistoryTower(num_items=items.size, embedding_dim=4, max_length=3),
        two_tower.IdEmbeddingTower(items.size, 4),
        query_vocabulary={"history": items},
        candidate_vocabulary=items,
    )
    model.compile(optimizer="adam")
    x = {"query": {"history": np.array([[10, 11, -1], [12, -1, -1]])}, "candidate": [12, 10]}
    model.fit(x, verbose=0)
    items.add([13, 14])
    new = {"query": {"history": np.array([[13, 14, -1], [12, -1, -1]])}, "candidate": [14, 13]}
    with pytest.raises(ValueError, match="grow_tables"):
        model.fit(new, verbose=0)
    model.grow_tables()
    assert model.query_tower.table_sizes() == {"history": 6}
    assert model.candidate_tower.table_sizes() == 6
    model.fit(new, verbose=0)
