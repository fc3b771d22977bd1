"""Row-sparse training: SparseEmbedding tables, the per-backend sparse steps, RowWiseAdagrad.

Expected values come from dense Keras training on a truly dense gradient (a
one-hot matmul tower) or from NumPy re-implementations of the optimizers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

import two_tower
from testing import assert_config_round_trip, save_and_load

DIM = 4
QUERIES, CANDIDATES = 30, 50
BATCH, STEPS = 8, 20
# Ids used in training stay below these: the rows above are never looked up.
USED_QUERIES, USED_CANDIDATES = 12, 20


class OneHotTable(keras.layers.Layer):
    """A table looked up by a one-hot matmul: its gradient is a dense [rows, dim] array.

    The reference for "dense" optimizer updates. `keras.layers.Embedding` is not
    one on TensorFlow: there its gradient is an IndexedSlices, and Keras'
    Adagrad squares each lookup's slice before summing duplicates.
    """

    def __init__(self, rows: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows, self.dim = rows, dim

    def build(self, input_shape: Any = None) -> None:
        self.embeddings = self.add_weight(
            shape=(self.rows, self.dim), initializer="uniform", name="embeddings"
        )

    def call(self, ids: Any) -> Any:
        return ops.matmul(ops.one_hot(ids, self.rows), self.embeddings)


def _batches(seed: int = 0, steps: int = STEPS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    count = BATCH * steps
    # Few distinct ids: every batch holds duplicates.
    return {
        "query": rng.integers(0, USED_QUERIES, count).astype("int32"),
        "candidate": rng.integers(0, USED_CANDIDATES, count).astype("int32"),
    }


def _model(table: Any, optimizer: keras.optimizers.Optimizer, **kwargs: Any) -> Any:
    kwargs.setdefault("loss", "softmax")
    model = two_tower.TwoTowerRetrieval(
        table(QUERIES, DIM, name="query_table"),
        table(CANDIDATES, DIM, name="candidate_table"),
        **kwargs,
    )
    model.compile(optimizer=optimizer, steps_per_execution=1)
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    return model


def _numpy(variables: list[Any]) -> list[np.ndarray]:
    return [ops.convert_to_numpy(variable.value) for variable in variables]


def _slot(optimizer: Any, table: str, slot: str) -> np.ndarray:
    """The optimizer state `slot` of the table named `table` (found by variable name)."""
    (found,) = [v for v in optimizer.variables if table in v.name and slot in v.name]
    return ops.convert_to_numpy(found.value)


def _train(model: Any, x: dict[str, np.ndarray], **kwargs: Any) -> Any:
    return model.fit(x, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, **kwargs)


@pytest.mark.parametrize(
    "optimizer", [lambda: keras.optimizers.SGD(0.3), lambda: keras.optimizers.Adagrad(0.3)]
)
@pytest.mark.parametrize("loss", ["softmax", "full_softmax"])
def test_sparse_sgd_and_adagrad_equal_dense(optimizer, loss):
    kwargs = {"catalogue_size": CANDIDATES} if loss == "full_softmax" else {}
    dense = _model(OneHotTable, optimizer(), loss=loss, **kwargs)
    sparse = _model(two_tower.SparseEmbedding, optimizer(), loss=loss, **kwargs)
    sparse.set_weights(dense.get_weights())
    x = _batches()
    _train(dense, x)
    _train(sparse, x)
    for expected, actual in zip(dense.get_weights(), sparse.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)
    for expected, actual in zip(
        _numpy(dense.optimizer.variables), _numpy(sparse.optimizer.variables), strict=True
    ):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)
    assert int(ops.convert_to_numpy(sparse.optimizer.iterations)) == STEPS


def test_sparse_sgd_equals_keras_embedding():
    """SGD has no per-row state, so even Keras' own Embedding path agrees on every backend."""
    dense = _model(keras.layers.Embedding, keras.optimizers.SGD(0.3))
    sparse = _model(two_tower.SparseEmbedding, keras.optimizers.SGD(0.3))
    sparse.set_weights(dense.get_weights())
    x = _batches(1)
    _train(dense, x)
    _train(sparse, x)
    for expected, actual in zip(dense.get_weights(), sparse.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


def test_a_table_shared_by_both_towers_sums_both_lookups():
    shared_dense = OneHotTable(CANDIDATES, DIM)
    shared_sparse = two_tower.SparseEmbedding(CANDIDATES, DIM)
    models = []
    for table in (shared_dense, shared_sparse):
        model = two_tower.TwoTowerRetrieval(table, table, loss="softmax")
        model.compile(optimizer=keras.optimizers.Adagrad(0.3), steps_per_execution=1)
        model.embed_queries(np.arange(2))
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    x = _batches(2)
    x["query"] = x["query"] % USED_CANDIDATES
    for model in models:
        _train(model, x)
    np.testing.assert_allclose(
        models[1].get_weights()[0], models[0].get_weights()[0], atol=1e-6, rtol=0
    )


# ------------------------------------------------------------ NumPy references
def _mse_row_gradients(
    queries: np.ndarray, candidates: np.ndarray, q_ids, c_ids, labels
) -> tuple[np.ndarray, np.ndarray]:
    """Per-table dense gradients of mean((q.c - y)^2) over one batch."""
    q, c = queries[q_ids], candidates[c_ids]
    residual = 2.0 * ((q * c).sum(axis=1) - labels) / len(labels)
    query_gradient = np.zeros_like(queries)
    candidate_gradient = np.zeros_like(candidates)
    np.add.at(query_gradient, q_ids, residual[:, None] * c)
    np.add.at(candidate_gradient, c_ids, residual[:, None] * q)
    return query_gradient, candidate_gradient


def _numpy_row_wise_adagrad(table, accumulator, gradient, touched, lr, epsilon):
    accumulator[touched] += (gradient[touched] ** 2).mean(axis=1, keepdims=True)
    table[touched] -= lr * gradient[touched] / (np.sqrt(accumulator[touched]) + epsilon)


def _numpy_lazy_adam(table, m, v, gradient, touched, lr, step, beta_1=0.9, beta_2=0.999):
    epsilon = 1e-7
    alpha = lr * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
    g = gradient[touched]
    m[touched] += (g - m[touched]) * (1 - beta_1)
    v[touched] += (g**2 - v[touched]) * (1 - beta_2)
    table[touched] -= m[touched] * alpha / (np.sqrt(v[touched]) + epsilon)


@pytest.mark.parametrize("kind", ["row_wise_adagrad", "lazy_adam"])
def test_row_wise_adagrad_and_lazy_adam_match_numpy(kind):
    lr = 0.05
    optimizer = (
        two_tower.RowWiseAdagrad(lr, initial_accumulator_value=0.1)
        if kind == "row_wise_adagrad"
        else keras.optimizers.Adam(lr)
    )
    model = _model(two_tower.SparseEmbedding, optimizer, loss="mse")
    tables = [np.array(w, dtype="float64") for w in model.get_weights()]
    states = [
        np.full((QUERIES, 1), 0.1),
        np.full((CANDIDATES, 1), 0.1),
    ]
    moments = [np.zeros_like(t) for t in tables for _ in range(2)]
    x = _batches(3)
    labels = np.random.default_rng(3).uniform(0, 1, BATCH * STEPS).astype("float32")
    model.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        q_ids, c_ids = x["query"][rows], x["candidate"][rows]
        gradients = _mse_row_gradients(tables[0], tables[1], q_ids, c_ids, labels[rows])
        for index, (ids, gradient) in enumerate(zip((q_ids, c_ids), gradients, strict=True)):
            touched = np.unique(ids)
            if kind == "row_wise_adagrad":
                _numpy_row_wise_adagrad(tables[index], states[index], gradient, touched, lr, 1e-8)
            else:
                m, v = moments[2 * index], moments[2 * index + 1]
                _numpy_lazy_adam(tables[index], m, v, gradient, touched, lr, step + 1)
    for expected, actual in zip(tables, model.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    slots = ("accumulator",) if kind == "row_wise_adagrad" else ("momentum", "velocity")
    for index, table in enumerate(("query_table", "candidate_table")):
        for position, slot in enumerate(slots):
            expected = (
                states[index] if kind == "row_wise_adagrad" else moments[2 * index + position]
            )
            np.testing.assert_allclose(
                _slot(model.optimizer, table, slot), expected, atol=1e-5, rtol=0
            )


def test_row_wise_adagrad_on_dense_variables_matches_numpy():
    matrix = keras.Variable(np.ones((3, 2), "float32"))
    vector = keras.Variable(np.ones((2,), "float32"))
    optimizer = two_tower.RowWiseAdagrad(0.1)
    optimizer.build([matrix, vector])
    g_matrix = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, -2.0]], "float32")
    g_vector = np.array([0.5, -1.0], "float32")
    optimizer.apply([g_matrix, g_vector], [matrix, vector])
    accumulator = (g_matrix**2).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(
        ops.convert_to_numpy(matrix.value),
        1 - 0.1 * g_matrix / (np.sqrt(accumulator) + 1e-8),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(vector.value),
        1 - 0.1 * g_vector / (np.abs(g_vector) + 1e-8),
        rtol=1e-6,
    )


# ------------------------------------------------------------- untouched rows
@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.Adam(0.01),
        lambda: two_tower.RowWiseAdagrad(0.1),
        lambda: keras.optimizers.Adagrad(0.1),
    ],
)
def test_rows_never_looked_up_stay_bit_identical(optimizer):
    model = _model(two_tower.SparseEmbedding, optimizer())
    model.optimizer.build(model.trainable_variables)
    before = model.get_weights()
    state_before = _numpy(model.optimizer.variables)[2:]
    _train(model, _batches(4))
    after = model.get_weights()
    used = (USED_QUERIES, USED_CANDIDATES)
    for index, limit in enumerate(used):
        assert np.array_equal(after[index][limit:], before[index][limit:])
        assert not np.allclose(after[index][:limit], before[index][:limit])
    state_after = _numpy(model.optimizer.variables)[2:]
    assert state_after
    for old, new in zip(state_before, state_after, strict=True):
        limit = USED_QUERIES if new.shape[0] == QUERIES else USED_CANDIDATES
        assert np.array_equal(new[limit:], old[limit:])
        assert not np.array_equal(new[:limit], old[:limit])


# ------------------------------------------------------------ saving, resuming
_RESUME = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import two_tower
    folder = sys.argv[1]
    model = keras.saving.load_model(folder + "/model.keras")
    data = np.load(folder + "/data.npz")
    model.fit({"query": data["query"], "candidate": data["candidate"]}, batch_size=%d,
              epochs=1, verbose=0, shuffle=False)
    np.savez(folder + "/resumed.npz", *model.get_weights(),
             *[keras.ops.convert_to_numpy(v.value) for v in model.optimizer.variables])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "row_wise_adagrad"])
def test_save_load_in_a_fresh_process_and_resume(tmp_path: Path, optimizer):
    def build() -> Any:
        keras.utils.set_random_seed(5)
        model = two_tower.TwoTowerRetrieval.from_ids(QUERIES, CANDIDATES, 8, sparse=True)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01)
            if optimizer == "adam"
            else two_tower.RowWiseAdagrad(0.1),
            steps_per_execution=1,
        )
        return model

    first, more = _batches(6), _batches(7, steps=5)
    uninterrupted = build()
    _train(uninterrupted, first)
    _train(uninterrupted, more)

    interrupted = build()
    _train(interrupted, first)
    interrupted.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", **more)
    environment = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    completed = subprocess.run(
        [sys.executable, "-c", _RESUME % BATCH, str(tmp_path)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    resumed = np.load(tmp_path / "resumed.npz")
    expected = uninterrupted.get_weights() + _numpy(uninterrupted.optimizer.variables)
    assert len(resumed.files) == len(expected)
    for index, value in enumerate(expected):
        np.testing.assert_allclose(resumed[f"arr_{index}"], value, atol=1e-6, rtol=0)


def test_optimizer_state_is_saved_with_the_model(tmp_path: Path):
    model = _model(two_tower.SparseEmbedding, two_tower.RowWiseAdagrad(0.1))
    _train(model, _batches(8))
    loaded = save_and_load(model, tmp_path)
    assert isinstance(loaded.optimizer, two_tower.RowWiseAdagrad)
    for expected, actual in zip(
        _numpy(model.optimizer.variables), _numpy(loaded.optimizer.variables), strict=True
    ):
        np.testing.assert_array_equal(actual, expected)


# ----------------------------------------------------------------- towers, fit
def test_feature_tower_sparse_tables_equal_dense_with_sgd():
    def tower(sparse: bool) -> Any:
        return two_tower.FeatureTower(
            categorical={"movie": CANDIDATES},
            multivalued={"genre": 6},
            numeric=["year"],
            embedding_dim=DIM,
            output_dim=DIM,
            bias="learned",
            sparse=sparse,
            name="tower",
        )

    rng = np.random.default_rng(9)
    features = {
        "movie": rng.integers(0, USED_CANDIDATES, BATCH * 10).astype("int32"),
        "genre": np.where(rng.uniform(size=(BATCH * 10, 3)) < 0.3, -1, rng.integers(0, 6, (80, 3))),
        "year": rng.uniform(size=BATCH * 10).astype("float32"),
    }
    x = {"query": rng.integers(0, USED_QUERIES, BATCH * 10), "candidate": features}
    models = []
    for sparse in (False, True):
        query = (two_tower.SparseEmbedding if sparse else keras.layers.Embedding)(QUERIES, DIM + 1)
        model = two_tower.TwoTowerRetrieval(query, tower(sparse), loss="softmax")
        model.compile(optimizer=keras.optimizers.SGD(0.5), steps_per_execution=1)
        model.embed_queries(np.arange(2))
        model.embed_candidates({name: value[:2] for name, value in features.items()})
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    for model in models:
        _train(model, x)
    for expected, actual in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


def test_fit_evaluate_callbacks_and_steps_per_execution_keep_working():
    x = _batches(10)
    results = []
    for steps in (1, two_tower.defaults.steps_per_execution()):
        keras.utils.set_random_seed(3)
        model = two_tower.TwoTowerRetrieval.from_ids(QUERIES, CANDIDATES, 8, sparse=True)
        model.compile(optimizer=two_tower.defaults.optimizer(), steps_per_execution=steps)
        seen: list[float] = []
        callback = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs, seen=seen: seen.append(logs["loss"])
        )
        history = model.fit(
            x, batch_size=BATCH, epochs=2, verbose=0, shuffle=False, callbacks=[callback]
        )
        assert seen == history.history["loss"] and np.all(np.isfinite(seen))
        evaluation = model.evaluate(x, batch_size=BATCH, verbose=0, return_dict=True)
        assert np.isfinite(evaluation["loss"])
        results.append(model.get_weights())
    for expected, actual in zip(*results, strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


def test_regularizer_applies_to_looked_up_rows():
    layer = two_tower.SparseEmbedding(10, 3, embeddings_regularizer=keras.regularizers.L2(0.5))
    ids = np.array([1, 1, 4])
    rows = ops.convert_to_numpy(layer(ids))
    table = ops.convert_to_numpy(layer.embeddings.value)
    np.testing.assert_allclose(rows, table[ids])
    assert len(layer.losses) == 1
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(layer.losses[0])), 0.5 * (table[ids] ** 2).sum(), rtol=1e-6
    )


def test_sparse_embedding_config_and_saving(tmp_path: Path):
    layer = two_tower.SparseEmbedding(
        7, 3, embeddings_initializer="ones", embeddings_regularizer="l2", name="table"
    )
    restored = assert_config_round_trip(layer)
    assert restored.input_dim == 7 and restored.output_dim == 3
    assert isinstance(restored.embeddings_regularizer, keras.regularizers.L2)
    model = two_tower.TwoTowerRetrieval(
        two_tower.SparseEmbedding(5, 3), two_tower.SparseEmbedding(7, 3)
    )
    model.compile(optimizer="adagrad")
    _train(model, {"query": np.array([0, 1, 4]), "candidate": np.array([2, 6, 6])})
    model.index_candidates(np.arange(7))
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(
        loaded.recommend(np.arange(5), k=3), model.recommend(np.arange(5), k=3)
    )
    assert_config_round_trip(two_tower.RowWiseAdagrad(0.2, initial_accumulator_value=0.5))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("optimizer", "named"),
    [
        (lambda: keras.optimizers.RMSprop(), "RMSprop"),
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9), "momentum"),
        (lambda: keras.optimizers.Adam(amsgrad=True), "amsgrad"),
        (lambda: keras.optimizers.Adam(weight_decay=0.01), "weight_decay"),
        (lambda: keras.optimizers.Adagrad(clipnorm=1.0), "clipnorm"),
    ],
)
def test_unsupported_optimizers_raise_naming_the_supported_ones(optimizer, named):
    model = two_tower.TwoTowerRetrieval.from_ids(QUERIES, CANDIDATES, sparse=True)
    with pytest.raises(ValueError, match=named) as raised:
        model.compile(optimizer=optimizer())
    for supported in ("SGD", "Adagrad", "Adam", "RowWiseAdagrad"):
        assert supported in str(raised.value)


def test_dense_models_keep_every_optimizer():
    model = two_tower.TwoTowerRetrieval.from_ids(QUERIES, CANDIDATES, sparse=False)
    model.compile(optimizer=keras.optimizers.RMSprop())
    _train(model, _batches(11, steps=2))


@pytest.mark.parametrize("table", ["sparse_embedding", "id_tower"])
def test_out_of_range_ids_get_the_same_error_as_dense_towers(table):
    def build(sparse: bool) -> Any:
        if table == "id_tower":
            return two_tower.TwoTowerRetrieval.from_ids(QUERIES, CANDIDATES, sparse=sparse)
        layer = two_tower.SparseEmbedding if sparse else keras.layers.Embedding
        return two_tower.TwoTowerRetrieval(layer(QUERIES, DIM), layer(CANDIDATES, DIM))

    messages = []
    for sparse in (False, True):
        model = build(sparse)
        model.compile(optimizer="adagrad")
        with pytest.raises(ValueError, match="must") as raised:
            _train(model, {"query": np.array([0, QUERIES]), "candidate": np.array([1, 2])})
        messages.append(str(raised.value).replace("Embedding input_dim", "X"))
    assert messages[0] == messages[1]
    assert str(QUERIES) in messages[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_dim": 0, "output_dim": 3},
        {"input_dim": 5, "output_dim": 2.5},
        {"input_dim": 5, "output_dim": 3, "mask_zero": True},
        {"input_dim": 5, "output_dim": 3, "embeddings_constraint": "non_neg"},
    ],
)
def test_bad_sparse_embedding_arguments(kwargs):
    with pytest.raises(ValueError, match=r"input_dim|output_dim|mask_zero|constraint"):
        two_tower.SparseEmbedding(**kwargs)


def test_bad_sparse_flags_and_row_wise_adagrad_arguments():
    with pytest.raises(ValueError, match="sparse"):
        two_tower.IdEmbeddingTower(5, 3, sparse="yes")
    with pytest.raises(ValueError, match="sparse"):
        two_tower.FeatureTower(categorical={"a": 3}, sparse=1)
    with pytest.raises(ValueError, match="epsilon"):
        two_tower.RowWiseAdagrad(epsilon=-1.0)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        two_tower.RowWiseAdagrad(initial_accumulator_value="0")


@pytest.mark.slow
def test_benchmark_json_has_the_documented_form(tmp_path: Path):
    """`benchmarks/table_growth.py` writes {backend: {rows: {dense_..., sparse_...}}}."""
    path = tmp_path / "growth.json"
    script = Path(__file__).parents[1] / "benchmarks" / "table_growth.py"
    completed = subprocess.run(
        [
            sys.executable,
            str(script),
            "--backends",
            keras.backend.backend(),
            "--rows",
            "1000,2000",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--no-floor",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(path.read_text())
    assert list(figures) == [keras.backend.backend()]
    assert list(figures[keras.backend.backend()]) == ["1000", "2000"]
    for entry in figures[keras.backend.backend()].values():
        assert set(entry) == {"dense_ms_per_step", "sparse_ms_per_step"}
        assert all(value > 0 for value in entry.values())


@pytest.mark.slow
def test_run_eagerly_gives_the_compiled_result():
    x = _batches(12)
    results = []
    for eager in (False, True):
        keras.utils.set_random_seed(4)
        model = two_tower.TwoTowerRetrieval.from_ids(QUERIES, CANDIDATES, 8, sparse=True)
        model.compile(optimizer=keras.optimizers.Adam(0.01), run_eagerly=eager)
        _train(model, x)
        results.append(model.get_weights())
    for expected, actual in zip(*results, strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)
