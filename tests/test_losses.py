import numpy as np
import pytest

import two_tower
from testing import assert_all_close


def numpy_softmax_loss(similarities, temperature, weights=None):
    logits = similarities.astype("float64") / temperature
    row_max = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - row_max).sum(axis=1)) + row_max[:, 0]
    per_example = log_z - np.diag(logits)
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()


@pytest.mark.parametrize("temperature", [1.0, 0.1, 5.0])
def test_in_batch_softmax_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    similarities = rng.normal(size=(6, 6)).astype("float32") * 3
    loss = two_tower.losses.in_batch_softmax(similarities, temperature)
    assert_all_close(loss, numpy_softmax_loss(similarities, temperature), atol=1e-5)


def test_in_batch_softmax_sample_weight():
    rng = np.random.default_rng(1)
    similarities = rng.normal(size=(5, 5)).astype("float32")
    weights = rng.random(5).astype("float32")
    loss = two_tower.losses.in_batch_softmax(similarities, 0.5, weights)
    assert_all_close(loss, numpy_softmax_loss(similarities, 0.5, weights), atol=1e-5)


def test_in_batch_softmax_is_stable_for_large_logits():
    similarities = np.array([[1000.0, -1000.0], [0.0, 1000.0]], "float32")
    loss = two_tower.losses.in_batch_softmax(similarities, 0.01)
    assert np.isfinite(float(loss))
    assert_all_close(loss, numpy_softmax_loss(similarities, 0.01), atol=1e-4)


def test_mean_squared_error_matches_numpy():
    rng = np.random.default_rng(2)
    labels = rng.random(7).astype("float32")
    scores = rng.normal(size=7).astype("float32")
    weights = rng.random(7).astype("float32")
    assert_all_close(
        two_tower.losses.mean_squared_error(labels[:, None], scores),
        np.mean((labels - scores) ** 2),
    )
    assert_all_close(
        two_tower.losses.mean_squared_error(labels, scores, weights),
        np.mean(weights * (labels - scores) ** 2),
    )


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        two_tower.losses.in_batch_softmax(np.eye(3, dtype="float32"), temperature)


def test_non_square_similarities_raise():
    with pytest.raises(ValueError, match="square"):
        two_tower.losses.in_batch_softmax(np.ones((2, 3), "float32"))
