"""Training under `tf.distribute.MirroredStrategy` on logical CPUs equals one device.

Runs in the `tests-multidevice` nox session, twice: with 2 and with 4 logical
CPU devices (`TWO_TOWER_LOGICAL_CPUS`, which `conftest.py` applies before
TensorFlow starts; Keras' own `tf_distribute_training_test.py` splits one CPU
this way). One strategy per process: a second `MirroredStrategy` over the same
devices in one process fails with mismatched collective instances. Every other
session skips this file, saying why; in that session a missing device count fails.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import two_tower
from testing import interactions, missing_devices, negative_layers, pairs_for

USERS, ITEMS, DIM = 40, 64, 8


def _skip_reason() -> str | None:
    if keras.backend.backend() != "tensorflow":
        return "tf.distribute runs on TensorFlow only (the tests-multidevice session)"
    import tensorflow as tf

    return missing_devices(
        len(tf.config.list_logical_devices("CPU")),
        2,
        "logical CPU devices",
        "TWO_TOWER_LOGICAL_CPUS=2 or 4",
    )


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(scope="module")
def strategy():
    import tensorflow as tf

    devices = [device.name for device in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def _model(loss: str, initial=None, **options):
    defaults = {
        "mse": {},
        "softmax": {"remove_accidental_hits": True},
        "sampled_softmax": {"num_sampled_negatives": 8, "remove_accidental_hits": True},
        "full_softmax": {},
    }[loss]
    model = two_tower.TwoTowerRetrieval.from_ids(
        USERS, ITEMS, DIM, loss=loss, **{**defaults, **options}
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    if initial is not None:
        model.set_weights(initial)
    return model


def _fit(model, loss: str, rows: int):
    x, ratings = interactions(rows, USERS, ITEMS)
    x = pairs_for(loss, x)
    history = model.fit(
        x, ratings if loss == "mse" else None, batch_size=64, epochs=1, shuffle=False, verbose=0
    )
    return history.history["loss"][-1]


def _one_epoch(strategy, loss: str, rows: int):
    """(single-device model, its loss, mirrored model, its loss) after one epoch."""
    initial = _model(loss).get_weights()
    single = _model(loss, initial)
    single_loss = _fit(single, loss, rows)
    with strategy.scope():
        mirrored = _model(loss, initial)
    mirrored_loss = _fit(mirrored, loss, rows)
    assert not np.allclose(single.get_weights()[0], initial[0])  # it trained
    return single, single_loss, mirrored, mirrored_loss


def _max_difference(first: keras.Model, second: keras.Model) -> float:
    return max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(first.get_weights(), second.get_weights(), strict=True)
    )


@pytest.mark.parametrize("loss", two_tower.models.retrieval_task.LOSSES)
def test_mirrored_trains_like_one_device(strategy, loss):
    # 512 rows in batches of 64: every replica holds as many rows.
    single, single_loss, mirrored, mirrored_loss = _one_epoch(strategy, loss, 512)
    assert strategy.num_replicas_in_sync >= 2
    np.testing.assert_allclose(mirrored_loss, single_loss, atol=1e-5, rtol=0)
    assert _max_difference(mirrored, single) <= 1e-5


@pytest.mark.parametrize("loss", two_tower.models.retrieval_task.LOSSES)
def test_uneven_last_batch_trains_like_one_device(strategy, loss):
    # 565 rows: the last batch of 53 splits unevenly (27 + 26, or 14 + 13 + 13 + 13).
    # Each replica's loss is scaled by its share of the rows, not 1 / replicas,
    # and the logged loss is still the global batch's mean (3.8e-3 off before).
    single, single_loss, mirrored, mirrored_loss = _one_epoch(strategy, loss, 565)
    np.testing.assert_allclose(mirrored_loss, single_loss, atol=1e-5, rtol=0)
    assert _max_difference(mirrored, single) <= 1e-5


def test_grown_tables_train_on_like_one_device(strategy):
    # Both models grow the same way; the new rows are set equal, as drawn on one device.
    single, _, mirrored, _ = _one_epoch(strategy, "softmax", 512)
    import contextlib

    for model, scope in ((single, contextlib.nullcontext()), (mirrored, strategy.scope())):
        with scope:
            model.compile(optimizer=keras.optimizers.Adagrad(0.1))
        _fit(model, "softmax", 128)  # builds Adagrad's state
        model.grow_tables(query=USERS + 5, candidate=ITEMS + 7)
    mirrored.set_weights(single.get_weights())
    for mine, theirs in zip(mirrored.optimizer.variables, single.optimizer.variables, strict=True):
        mine.assign(theirs)
    table = mirrored.candidate_tower.embedding.embeddings
    assert table.shape[0] == ITEMS + 7 and "Mirrored" in type(table.value).__name__
    rng = np.random.default_rng(3)
    x = {"query": rng.integers(0, USERS + 5, 512), "candidate": rng.integers(0, ITEMS + 7, 512)}
    losses = [
        model.fit(x, batch_size=64, epochs=1, shuffle=False, verbose=0).history["loss"][-1]
        for model in (single, mirrored)
    ]
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5, rtol=0)
    assert _max_difference(mirrored, single) <= 1e-5


def _numpy_in_batch_softmax(queries: np.ndarray, candidates: np.ndarray) -> float:
    logits = queries.astype("float64") @ candidates.astype("float64").T
    top = logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_sum - np.diag(logits)))


@pytest.mark.parametrize("cross_replica", [True, False])
def test_negatives_are_global_unless_switched_off(strategy, cross_replica):
    replicas = strategy.num_replicas_in_sync
    batch = 16 * replicas
    rng = np.random.default_rng(3)
    x = {"query": rng.integers(0, USERS, batch), "candidate": rng.integers(0, ITEMS, batch)}

    def plain_model():  # no bias column, no L2: the loss is the softmax alone
        model = two_tower.TwoTowerRetrieval(
            keras.layers.Embedding(USERS, DIM),
            keras.layers.Embedding(ITEMS, DIM),
            loss="softmax",
            cross_replica_negatives=cross_replica,
        )
        model.compile(optimizer="sgd")
        return model

    initial = [rng.normal(size=(USERS, DIM)), rng.normal(size=(ITEMS, DIM))]
    with strategy.scope():
        model = plain_model()
        model.embed_queries(np.arange(2))
        model.embed_candidates(np.arange(2))
        model.set_weights(initial)
    loss = model.evaluate(x, batch_size=batch, verbose=0, return_dict=True)["loss"]
    queries = initial[0][x["query"]]
    candidates = initial[1][x["candidate"]]
    if cross_replica:
        expected = _numpy_in_batch_softmax(queries, candidates)
    else:  # each replica's 16 rows against its own 16 candidates only
        shares = [slice(16 * r, 16 * (r + 1)) for r in range(replicas)]
        expected = np.mean([_numpy_in_batch_softmax(queries[s], candidates[s]) for s in shares])
    np.testing.assert_allclose(loss, expected, atol=1e-5, rtol=0)


def _packed_rows():
    """Packed sequence rows whose padding differs by row (the last rows are short)."""
    rng = np.random.default_rng(5)
    users = np.repeat(np.arange(30), rng.integers(2, 9, 30))
    log = two_tower.InteractionLog(users, rng.integers(0, ITEMS, len(users)), np.arange(len(users)))
    data = two_tower.datasets.SequenceDataset(log, max_length=6, batch_size=1000, shuffle=False)
    return data[0]


@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax", "full_softmax"])
def test_per_position_training_is_the_same_across_replicas(strategy, loss):
    # Each replica's loss is the mean over its items, weighted by its item count
    # (not its rows), so that the rows' different padding changes nothing.
    batch = _packed_rows()
    counts = (batch["candidate"] >= 0).sum(axis=1)
    assert len(set(counts.tolist())) > 1

    def model(initial=None):
        options = {"softmax": {"remove_accidental_hits": True},
                   "sampled_softmax": {"num_sampled_negatives": 8}}.get(loss, {})  # fmt: skip
        built = two_tower.TwoTowerRetrieval.for_sequences(
            ITEMS, max_length=6, embedding_dim=DIM, dropout=0.0, loss=loss, **options
        )
        built.compile(optimizer=keras.optimizers.SGD(0.1))
        built.predict({"history": np.full((1, 6), -1)}, verbose=0)
        if initial is not None:
            built.set_weights(initial)
        return built

    initial = model().get_weights()
    single = model(initial)
    rows = 2 * strategy.num_replicas_in_sync
    single_loss = single.fit(batch, batch_size=rows, shuffle=False, verbose=0).history["loss"]
    with strategy.scope():
        mirrored = model(initial)
    mirrored_loss = mirrored.fit(batch, batch_size=rows, shuffle=False, verbose=0).history["loss"]
    assert not np.allclose(single.get_weights()[0], initial[0])
    np.testing.assert_allclose(mirrored_loss, single_loss, atol=1e-5, rtol=0)
    assert _max_difference(mirrored, single) <= 1e-5


def _negatives_model(initial=None):
    return _model("sampled_softmax", initial, **negative_layers(ITEMS))


@pytest.mark.parametrize("rows", [512, 565])
def test_cache_estimator_and_popularity_sampling_train_like_one_device(strategy, rows):
    # One global cache and estimator: every replica writes the gathered batch.
    x, _ = interactions(rows, USERS, ITEMS)
    x.pop("candidate_sampling_probability")  # the estimator's instead
    initial = _negatives_model().get_weights()
    single = _negatives_model(initial)
    single_loss = single.fit(x, batch_size=64, epochs=2, shuffle=False, verbose=0)
    with strategy.scope():
        mirrored = _negatives_model(initial)
    mirrored_loss = mirrored.fit(x, batch_size=64, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        mirrored_loss.history["loss"], single_loss.history["loss"], atol=1e-5, rtol=0
    )
    assert _max_difference(mirrored, single) <= 1e-5
    steps = 2 * -(-rows // 64)
    assert int(mirrored.negative_cache.step.numpy()) == steps
    assert int(single.frequency_estimator.step.numpy()) == steps


def test_local_negatives_scale_log_q_to_their_share(strategy):
    # cross_replica_negatives=False: each replica's 16 candidates are a sample of
    # 16 rows, while the probabilities are per global batch: log q + log(16 / 32).
    replicas = strategy.num_replicas_in_sync
    batch = 16 * replicas
    rng = np.random.default_rng(4)
    x = {
        "query": rng.integers(0, USERS, batch),
        "candidate": rng.integers(0, ITEMS, batch),
        "candidate_sampling_probability": rng.uniform(0.1, 1.0, batch).astype("float32"),
    }
    weights = np.zeros(ITEMS)
    weights[5] = 1.0  # every sampled negative is item 5 (p = 1)
    initial = [rng.normal(size=(USERS, DIM)), rng.normal(size=(ITEMS, DIM))]
    with strategy.scope():
        model = two_tower.TwoTowerRetrieval(
            keras.layers.Embedding(USERS, DIM),
            keras.layers.Embedding(ITEMS, DIM),
            loss="sampled_softmax", catalogue_size=ITEMS, num_sampled_negatives=3,
            cross_replica_negatives=False,
            negative_sampler=two_tower.negatives.PopularitySampler.from_weights(weights),
        )  # fmt: skip
        model.compile(optimizer="sgd")
        model.embed_queries(np.arange(2))
        model.embed_candidates(np.arange(2))
        model.set_weights(initial + model.get_weights()[2:])
    loss = model.evaluate(x, batch_size=batch, verbose=0, return_dict=True)["loss"]
    queries, candidates = initial[0][x["query"]], initial[1][x["candidate"]]
    log_q = np.log(x["candidate_sampling_probability"])
    expected = []
    for r in range(replicas):
        rows = slice(16 * r, 16 * (r + 1))
        columns = np.concatenate([candidates[rows], np.repeat(initial[1][[5]], 3, axis=0)])
        correction = np.concatenate([log_q[rows] + np.log(16 / batch), np.full(3, np.log(3))])
        logits = queries[rows] @ columns.T - correction[None, :]
        top = logits.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        expected.append(np.mean(log_sum - np.diag(logits)))
    np.testing.assert_allclose(loss, np.mean(expected), atol=1e-5, rtol=0)
