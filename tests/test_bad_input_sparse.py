"""Bad input to sparse training and distribution: one clear error, the same on every backend.

Covers `SparseEmbedding` (its arguments, and ids out of range, negative, float or
strings, as a whole tower and deeper inside one), `RowWiseAdagrad` and the
sparse optimizers, `sparse=` on `IdEmbeddingTower` and `FeatureTower`, and
`two_tower.distribution.layout_map` / `keras.distribution` on each backend.

Before, NumPy scalars (`np.int64(16)`) were refused, a learning rate, `epsilon`
or `l2` of NaN was taken, a `SparseEmbedding` deeper in a tower took
out-of-range ids silently on JAX (NaN), gave an `IndexError` on torch and a
"Graph execution error" on TensorFlow, negative ids wrapped round to the last
rows on every backend, and a `keras.distribution` set on TensorFlow or torch was
accepted and ignored (nothing sharded).

The one difference left is explicit and tested here: inside a compiled JAX step
(where no error can be raised without a host callback on every step) ids outside
`[0, input_dim)` give rows of NaN, never another id's row.
"""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest

import two_tower
from two_tower import RowWiseAdagrad, SparseEmbedding

BACKEND = keras.backend.backend()
X = {"query": np.array([1, 2, 3, 4]), "candidate": np.array([5, 6, 7, 8])}
RANGE = r"SparseEmbedding 'table' takes ids in \[0, 3\) \(its input_dim\)\. Received ids from"


def _fit(query_tower, candidate_tower, optimizer, x=X):
    model = two_tower.TwoTowerRetrieval(query_tower, candidate_tower)
    model.compile(optimizer=optimizer)
    return model.fit(x, epochs=1, verbose=0, batch_size=4).history["loss"][-1]


# --------------------------------------------------------------------------
# SparseEmbedding arguments and direct calls.


def test_sparse_embedding_takes_numpy_sizes_and_keeps_a_json_config():
    layer = SparseEmbedding(np.int64(16), np.int32(4))
    config = layer.get_config()
    assert (config["input_dim"], config["output_dim"]) == (16, 4)
    assert type(config["input_dim"]) is int
    json.dumps(config)


@pytest.mark.parametrize(
    ("value", "shown"), [(16.0, "16.0 (float)"), (0, "0 (int)"), (True, "True (bool)")]
)
def test_sparse_embedding_sizes_must_be_positive_integers(value, shown):
    with pytest.raises(
        ValueError,
        match=r"SparseEmbedding: `input_dim` must be an integer >= 1\. "
        rf"Received: input_dim={re.escape(shown)}",
    ):
        SparseEmbedding(value, 4)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.array([0, 3]), RANGE + r" 0 to 3\. Map ids to indices first"),
        (np.array([-1, 2]), RANGE + r" -1 to 2\."),
        (np.array([1.5]), r"'table' takes integer ids\. Received float64 ids with non-integer "),
        (np.array(["a"]), r"'table' takes integer ids in \[0, 3\)\. Received ids of dtype <U1"),
        (np.array([True]), r"'table' takes integer ids in \[0, 3\)\. Received ids of dtype bool"),
    ],
)
def test_direct_calls_with_bad_ids_raise(ids, match):
    layer = SparseEmbedding(3, 2, name="table")
    with pytest.raises(ValueError, match=match):
        layer(ids)


def test_eager_tensor_ids_are_checked_too():
    layer = SparseEmbedding(3, 2, name="table")
    with pytest.raises(ValueError, match=RANGE + r" 0 to 5\."):
        layer(keras.ops.convert_to_tensor(np.array([0, 5], "int32")))


def test_integer_valued_float_ids_and_empty_ids_are_accepted():
    layer = SparseEmbedding(3, 2, name="table")
    rows = keras.ops.convert_to_numpy(layer(np.array([2.0, 0.0])))
    table = keras.ops.convert_to_numpy(layer.embeddings)
    np.testing.assert_array_equal(rows, table[[2, 0]])
    assert tuple(layer(np.zeros((0,), "int32")).shape) == (0, 2)


# --------------------------------------------------------------------------
# A SparseEmbedding that is not the first layer of its tower.


class _Inner(keras.layers.Layer):
    """A custom tower with its table inside: the model cannot check its ids on the host."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = SparseEmbedding(3, 4, name="table")
        self.dense = keras.layers.Dense(4)

    def call(self, ids):
        return self.dense(self.table(ids))


def _not_first(kind):
    if kind == "sequential":
        return keras.Sequential([keras.layers.Identity(), SparseEmbedding(3, 4, name="table")])
    return _Inner()


@pytest.mark.parametrize("kind", ["sequential", "custom"])
@pytest.mark.parametrize("method", ["fit", "evaluate"])
def test_out_of_range_ids_deeper_in_a_tower(kind, method):
    """TensorFlow and torch raise the table's error; JAX's compiled step gives NaN."""
    model = two_tower.TwoTowerRetrieval(_not_first(kind), SparseEmbedding(10, 4))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    run = getattr(model, method)
    if BACKEND == "jax":
        logs = run(X, batch_size=4, verbose=0)  # ids 1..4 of a 3-row table
        loss = logs.history["loss"][-1] if method == "fit" else logs
        assert np.isnan(loss)
    else:
        with pytest.raises(ValueError, match=RANGE + r" 1 to 4\."):
            run(X, batch_size=4, verbose=0)


def test_out_of_range_ids_deeper_in_a_tower_when_serving():
    """Serving's compiled tower functions raise the table's error too (NaN scores on JAX)."""
    model = two_tower.TwoTowerRetrieval(_not_first("sequential"), SparseEmbedding(10, 4))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit({"query": np.array([0, 1, 2]), "candidate": np.array([0, 1, 2])}, verbose=0)
    model.index_candidates(np.arange(10))
    if BACKEND == "jax":
        with pytest.raises(ValueError, match="NaN"):
            model.recommend(np.array([5]), k=2)
    else:
        with pytest.raises(ValueError, match=RANGE + r" 5 to 5\."):
            model.recommend(np.array([5]), k=2)


def test_negative_ids_deeper_in_a_tower_never_wrap():
    tower = keras.Sequential(
        [keras.layers.Lambda(lambda ids: ids - 2), SparseEmbedding(3, 4, name="table")]
    )
    model = two_tower.TwoTowerRetrieval(tower, SparseEmbedding(10, 4))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x = {"query": np.array([2, 3, 4, 1]), "candidate": X["candidate"]}  # 1 - 2 = -1
    if BACKEND == "jax":
        assert np.isnan(model.fit(x, batch_size=4, verbose=0).history["loss"][-1])
    else:
        with pytest.raises(ValueError, match=RANGE + r" -1 to 2\."):
            model.fit(x, batch_size=4, verbose=0)


@pytest.mark.skipif(BACKEND != "jax", reason="the compiled-step rule of the JAX backend")
def test_jax_compiled_lookups_outside_the_table_are_nan_rows():
    import jax

    layer = SparseEmbedding(3, 2, name="table")
    layer.build()
    table = keras.ops.convert_to_numpy(layer.embeddings)
    rows = np.asarray(jax.jit(layer)(jax.numpy.array([0, 3, -1, 2, -3])))
    np.testing.assert_array_equal(rows[[0, 3]], table[[0, 2]])
    assert np.isnan(rows[[1, 2, 4]]).all()  # never row 2 (-1) or row 0 (-3)


# --------------------------------------------------------------------------
# RowWiseAdagrad and the optimizers of sparse tables.


def test_row_wise_adagrad_takes_numpy_scalars_and_keeps_a_json_config():
    optimizer = RowWiseAdagrad(
        np.float32(0.5), initial_accumulator_value=np.float64(0.1), epsilon=np.float32(1e-7)
    )
    config = optimizer.get_config()
    json.dumps(config)
    assert config["learning_rate"] == pytest.approx(0.5)
    assert type(config["epsilon"]) is float and type(config["initial_accumulator_value"]) is float


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": float("nan")}, r"`learning_rate` must be a finite number > 0\. "),
        ({"learning_rate": 0}, r"`learning_rate` must be a finite number > 0\. .*=0 \(int\)"),
        ({"learning_rate": -0.1}, r"`learning_rate` must be a finite number > 0\. .*=-0\.1"),
        ({"epsilon": float("inf")}, r"`epsilon` must be a finite number >= 0\. .*=inf"),
        ({"epsilon": -1.0}, r"`epsilon` must be a finite number >= 0"),
        ({"initial_accumulator_value": float("nan")}, r"`initial_accumulator_value` must be"),
        ({"initial_accumulator_value": "0"}, r"`initial_accumulator_value` must be"),
        (
            {"epsilon": 0, "initial_accumulator_value": 0},
            r"`epsilon` and `initial_accumulator_value` cannot both be 0: a row whose gradient "
            r"is still 0 would be updated by 0 / 0",
        ),
    ],
)
def test_bad_row_wise_adagrad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=rf"RowWiseAdagrad: {match}"):
        RowWiseAdagrad(**kwargs)


def test_row_wise_adagrad_with_a_schedule_and_without_sparse_tables():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    tower = keras.Sequential([keras.layers.Embedding(10, 4), keras.layers.Dense(3)])
    loss = _fit(tower, keras.layers.Embedding(10, 3), RowWiseAdagrad(schedule))
    assert np.isfinite(loss)


@pytest.mark.parametrize("learning_rate", [float("nan"), 0.0, -0.1])
def test_keras_optimizers_with_a_bad_learning_rate_refuse_sparse_tables(learning_rate):
    model = two_tower.TwoTowerRetrieval(SparseEmbedding(10, 4), SparseEmbedding(10, 4))
    with pytest.raises(
        ValueError, match=r"SparseEmbedding tables need a finite learning rate > 0\. Received SGD"
    ):
        model.compile(optimizer=keras.optimizers.SGD(learning_rate))


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [("rmsprop", "Received optimizer RMSprop"), ("adamw", r"AdamW options \{'weight_decay'")],
)
def test_wrong_optimizers_for_sparse_towers(optimizer, match):
    for tower in (
        lambda: two_tower.IdEmbeddingTower(10, 4, sparse=True),
        lambda: two_tower.FeatureTower(categorical={"g": 5}, sparse=True, output_dim=4),
    ):
        model = two_tower.TwoTowerRetrieval(tower(), SparseEmbedding(10, 4))
        with pytest.raises(ValueError, match=match):
            model.compile(optimizer=optimizer)


# --------------------------------------------------------------------------
# sparse= and the other arguments of IdEmbeddingTower and FeatureTower.


def test_id_tower_takes_numpy_scalars_and_keeps_a_json_config():
    tower = two_tower.IdEmbeddingTower(
        np.int64(10),
        np.int32(4),
        l2=np.float32(0.5),
        sparse=np.bool_(True),
        table_rows=np.int64(12),
    )
    config = tower.get_config()
    json.dumps(config)
    assert (config["vocabulary_size"], config["table_rows"], config["sparse"]) == (10, 12, True)
    assert isinstance(tower.embedding, SparseEmbedding)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparse": 1}, r"IdEmbeddingTower: `sparse` must be True or False\. Received: sparse=1"),
        ({"l2": float("nan")}, r"`l2` must be a finite number >= 0\. Received: l2=nan"),
        ({"vocabulary_size": 10.0}, r"`vocabulary_size` must be an integer >= 1"),
        ({"table_rows": 9}, r"`table_rows` must be None or an integer >= vocabulary_size"),
    ],
)
def test_bad_id_tower_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_tower.IdEmbeddingTower(**{"vocabulary_size": 10, **kwargs})


def test_feature_tower_takes_numpy_scalars():
    tower = two_tower.FeatureTower(
        categorical={"g": np.int64(5)},
        embedding_dim=np.int64(4),
        output_dim=np.int32(3),
        hidden_units=[np.int64(8)],
        l2=np.float32(0.25),
        sparse=np.bool_(True),
        table_rows={"g_embedding": np.int64(6)},
    )
    config = tower.get_config()
    json.dumps(config)
    assert config["categorical"] == {"g": 5} and config["sparse"] is True
    assert tuple(tower({"g": np.array([0, 4])}).shape) == (2, 3)


def test_feature_tower_sparse_without_tables_is_refused():
    with pytest.raises(ValueError, match=r"`sparse=True` .* this tower has none \(numeric"):
        two_tower.FeatureTower(numeric=["age"], sparse=True)
    with pytest.raises(ValueError, match=r"FeatureTower: `sparse` must be True or False"):
        two_tower.FeatureTower(categorical={"g": 5}, sparse="yes")


# --------------------------------------------------------------------------
# Distribution: keras.distribution is honoured by Keras on JAX only.

MESH = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], ["cpu:0", "cpu:1"])


@pytest.fixture
def one_device_distribution():
    """A `DataParallel` over one device, set for the test and unset after it."""
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=["cpu:0"]))
    yield
    keras.distribution.set_distribution(None)


@pytest.mark.skipif(BACKEND == "jax", reason="JAX implements keras.distribution")
def test_layout_map_is_refused_where_keras_cannot_shard():
    with pytest.raises(
        ValueError,
        match=rf"two_tower\.distribution\.layout_map needs the JAX backend: Keras implements "
        rf"keras\.distribution on JAX only, and on {BACKEND} it would leave every variable",
    ):
        two_tower.distribution.layout_map(MESH)


@pytest.mark.skipif(BACKEND != "jax", reason="layout_map's arguments are checked on JAX")
def test_layout_map_needs_a_device_mesh():
    with pytest.raises(TypeError, match=r"`device_mesh` must be a keras\.distribution\.DeviceMesh"):
        two_tower.distribution.layout_map("mesh")


@pytest.mark.usefixtures("one_device_distribution")
def test_a_keras_distribution_is_honoured_on_jax_and_refused_elsewhere():
    def fit():
        return _fit(keras.layers.Embedding(10, 4), keras.layers.Embedding(10, 4), "sgd")

    def build_a_tower():
        two_tower.IdEmbeddingTower(10, 4)(np.array([1]))

    if BACKEND == "jax":
        assert np.isfinite(fit())
        build_a_tower()
        return
    match = (
        r"keras\.distribution\.set_distribution\(DataParallel\) needs the JAX backend: Keras "
        rf"implements keras\.distribution on JAX only, and on {BACKEND}"
    )
    for run in (fit, build_a_tower):
        with pytest.raises(ValueError, match=match):
            run()
