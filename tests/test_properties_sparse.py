"""Property-based tests (hypothesis): row-sparse training against a NumPy reference.

Hypothesis draws the tables, the ids (few rows, so a batch nearly always holds
duplicates, within a table and across steps), the labels, the learning rate and
the number of steps. A `TwoTowerRetrieval` with the `"mse"` loss, whose gradient
is simple to write down, trains on them with each optimizer the sparse step
supports (`_sparse_training.check_optimizer`): SGD, Adagrad, Adam (applied as lazy
Adam) and `RowWiseAdagrad`. The expected tables come from the optimizers'
formulas, written here in NumPy from their documentation: duplicate ids add their
gradients first, and only looked-up rows (and their state) move.

`RowWiseAdagrad`, SGD and Adagrad also train a model of plain
`keras.layers.Embedding` tables (no sparse table): the same reference holds,
since rows a batch does not look up have a zero gradient.

Compilation dominates on JAX and TensorFlow, so each (optimizer, table) model is
built and compiled once, with a fixed batch size, and reset between examples.
The "ci" profile of `tests/test_properties.py` applies with `CI` set.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import two_tower

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile("ci" if os.environ.get("CI") else "dev")

QUERIES, CANDIDATES, DIM, BATCH = 5, 7, 3, 8
ADAGRAD_START, ADAGRAD_EPSILON = 0.1, 1e-7  # Keras' Adagrad defaults
BETA_1, BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7  # Keras' Adam defaults
ROW_WISE_EPSILON = 1e-8  # RowWiseAdagrad's default
CASES = [
    ("sgd", "sparse"),
    ("adagrad", "sparse"),
    ("adam", "sparse"),
    ("row_wise_adagrad", "sparse"),
    ("sgd", "dense"),
    ("adagrad", "dense"),
    ("row_wise_adagrad", "dense"),
]

_models: dict[tuple[str, str], tuple[keras.Model, list[np.ndarray]]] = {}


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _models.clear()


def _optimizer(kind: str) -> keras.optimizers.Optimizer:
    return {
        "sgd": lambda: keras.optimizers.SGD(0.1),
        "adagrad": lambda: keras.optimizers.Adagrad(0.1),
        "adam": lambda: keras.optimizers.Adam(0.1),
        "row_wise_adagrad": lambda: two_tower.RowWiseAdagrad(0.1),
    }[kind]()


def _model(kind: str, tables: str) -> keras.Model:
    """One compiled model per case, its optimizer state reset to the start."""
    if (kind, tables) not in _models:
        layer = two_tower.SparseEmbedding if tables == "sparse" else keras.layers.Embedding
        model = two_tower.TwoTowerRetrieval(
            layer(QUERIES, DIM, name="query_table"),
            layer(CANDIDATES, DIM, name="candidate_table"),
            loss="mse",
        )
        model.compile(optimizer=_optimizer(kind), steps_per_execution=1)
        model.embed_queries(np.arange(2))
        model.embed_candidates(np.arange(2))
        model.optimizer.build(model.trainable_variables)
        start = [keras.ops.convert_to_numpy(v.value) for v in model.optimizer.variables]
        _models[kind, tables] = (model, start)
    model, start = _models[kind, tables]
    for variable, value in zip(model.optimizer.variables, start, strict=True):
        variable.assign(value)
    return model


def _reference(kind, query_table, candidate_table, query_ids, candidate_ids, labels, lr):
    """The tables after one optimizer step per batch, in float64."""
    tables = [query_table.astype("float64"), candidate_table.astype("float64")]
    if kind == "adagrad":
        state = [np.full_like(t, ADAGRAD_START) for t in tables]
    elif kind == "row_wise_adagrad":
        state = [np.zeros((len(t), 1)) for t in tables]
    elif kind == "adam":
        state = [(np.zeros_like(t), np.zeros_like(t)) for t in tables]
    for step, start in enumerate(range(0, len(labels), BATCH)):
        batch = slice(start, start + BATCH)
        q_ids, c_ids, y = query_ids[batch], candidate_ids[batch], labels[batch]
        q, c = tables[0][q_ids], tables[1][c_ids]
        # loss = mean((q . c - y)^2): d loss / d score = 2 (score - y) / batch
        d_score = 2 * (np.sum(q * c, axis=1) - y) / len(y)
        for side, (ids, other) in enumerate(((q_ids, c), (c_ids, q))):
            table = tables[side]
            gradient = np.zeros_like(table)
            np.add.at(gradient, ids, d_score[:, None] * other)  # duplicates add up
            rows = np.unique(ids)
            g = gradient[rows]
            if kind == "sgd":
                table[rows] -= lr * g
            elif kind == "adagrad":
                state[side][rows] += g**2
                table[rows] -= lr * g / np.sqrt(state[side][rows] + ADAGRAD_EPSILON)
            elif kind == "row_wise_adagrad":
                state[side][rows] += np.mean(g**2, axis=1, keepdims=True)
                table[rows] -= lr * g / (np.sqrt(state[side][rows]) + ROW_WISE_EPSILON)
            else:  # lazy Adam: looked-up rows only, bias-corrected with the global step
                m, v = state[side]
                m[rows] = BETA_1 * m[rows] + (1 - BETA_1) * g
                v[rows] = BETA_2 * v[rows] + (1 - BETA_2) * g**2
                t = step + 1
                alpha = lr * np.sqrt(1 - BETA_2**t) / (1 - BETA_1**t)
                table[rows] -= alpha * m[rows] / (np.sqrt(v[rows]) + ADAM_EPSILON)
    return tables


@st.composite
def trainings(draw):
    steps = draw(st.integers(1, 3))
    count = steps * BATCH
    values = st.floats(-1, 1, width=32)
    return {
        "case": draw(st.sampled_from(CASES)),
        "query_table": draw(hnp.arrays("float32", (QUERIES, DIM), elements=values)),
        "candidate_table": draw(hnp.arrays("float32", (CANDIDATES, DIM), elements=values)),
        # Few rows: most batches look some row up twice or more, some rows never.
        "query_ids": draw(hnp.arrays("int32", count, elements=st.integers(0, QUERIES - 1))),
        "candidate_ids": draw(hnp.arrays("int32", count, elements=st.integers(0, CANDIDATES - 1))),
        "labels": draw(hnp.arrays("float32", count, elements=values)),
        "learning_rate": draw(st.sampled_from([0.05, 0.5])),
    }


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(training=trainings())
def test_sparse_optimizers_match_numpy_with_duplicate_ids(training):
    kind, tables = training["case"]
    model = _model(kind, tables)
    model.optimizer.learning_rate = training["learning_rate"]
    model.set_weights([training["query_table"], training["candidate_table"]])
    model.fit(
        {"query": training["query_ids"], "candidate": training["candidate_ids"]},
        training["labels"],
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    expected = _reference(
        kind,
        training["query_table"],
        training["candidate_table"],
        training["query_ids"],
        training["candidate_ids"],
        training["labels"],
        training["learning_rate"],
    )
    for actual, wanted in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-5)
