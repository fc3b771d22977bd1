"""Training under `keras.distribution` on 8 simulated JAX devices equals one device.

Runs in the `tests-multidevice` nox session, which starts JAX with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (Keras' own CI simulates
devices this way). Every other session skips this file, saying why; in that
session (`TWO_TOWER_MULTIDEVICE=1`) a missing device count fails instead.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import two_tower

DEVICES = 8
USERS, ITEMS, ROWS = 40, 64, 512


def _devices() -> list:
    if keras.backend.backend() != "jax":
        return []
    import jax

    return jax.devices()


def _skip_reason() -> str | None:
    if keras.backend.backend() != "jax":
        return "keras.distribution runs on JAX only (the tests-multidevice session)"
    if len(_devices()) < DEVICES:
        message = (
            f"needs {DEVICES} JAX devices, found {len(_devices())}: run the "
            "tests-multidevice session (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
        )
        if os.environ.get("TWO_TOWER_MULTIDEVICE"):
            pytest.fail(message)
        return message
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(autouse=True)
def _no_distribution_left():
    yield
    keras.distribution.set_distribution(None)


def _data():
    rng = np.random.default_rng(0)
    items = rng.integers(0, ITEMS, ROWS)
    frequency = np.bincount(items, minlength=ITEMS) / ROWS
    x = {
        "query": rng.integers(0, USERS, ROWS),
        "candidate": items,
        "candidate_sampling_probability": frequency[items].astype("float32"),
    }
    return x, rng.uniform(1, 5, ROWS).astype("float32")


def _train(loss, distribution, initial):
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(1)  # the same negative sampler on both sides
    options = {
        "mse": {},
        "softmax": {"remove_accidental_hits": True},
        "sampled_softmax": {"num_sampled_negatives": 8},
        "full_softmax": {},
    }[loss]
    model = two_tower.TwoTowerRetrieval.from_ids(USERS, ITEMS, 8, loss=loss, **options)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    model.set_weights(initial)
    x, ratings = _data()
    if loss == "mse":
        x = {"query": x["query"], "candidate": x["candidate"]}
    history = model.fit(
        x, ratings if loss == "mse" else None, batch_size=64, epochs=1, shuffle=False, verbose=0
    )
    return model, history.history["loss"][-1]


def _initial_weights():
    keras.distribution.set_distribution(None)
    model = two_tower.TwoTowerRetrieval.from_ids(USERS, ITEMS, 8, loss="softmax")
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    return model.get_weights()


@pytest.mark.parametrize("loss", two_tower.two_tower_retrieval.LOSSES)
def test_data_parallel_trains_like_one_device(loss):
    initial = _initial_weights()
    single, single_loss = _train(loss, None, initial)
    parallel, parallel_loss = _train(
        loss, keras.distribution.DataParallel(devices=_devices()), initial
    )
    np.testing.assert_allclose(parallel_loss, single_loss, atol=1e-5, rtol=0)
    for actual, expected in zip(parallel.get_weights(), single.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    assert not np.allclose(single.get_weights()[0], initial[0])  # it trained
    # Really distributed: the variables live on all 8 devices (replicated).
    table = parallel.query_tower.trainable_variables[0].value
    assert len(table.sharding.device_set) == DEVICES
