"""Mixed precision (`mixed_bfloat16`, `mixed_float16`) on every backend.

The towers compute in 16 bits, the loss and the index in float32; MovieLens
quality matches float32 within 0.005 top-100 (NumPy computes the expected loss
and the ranking).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import two_tower
from testing import fit_default_model, tutorial_split
from two_tower.evaluation import evaluate_retrieval

POLICIES = ("mixed_bfloat16", "mixed_float16")


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _numpy(value):
    return keras.ops.convert_to_numpy(keras.ops.cast(value, "float32"))


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_loss_is_float32_from_the_16_bit_embeddings(policy):
    rng = np.random.default_rng(0)
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(20, 8, embeddings_initializer="normal"),
        keras.layers.Embedding(30, 8, embeddings_initializer="normal"),
        temperature=0.05,  # large logits: 16-bit scores would round them
    )
    x = {"query": rng.integers(0, 20, 16), "candidate": rng.integers(0, 30, 16)}
    outputs = model(x, training=False)
    half = keras.mixed_precision.DTypePolicy(policy).compute_dtype
    assert keras.backend.standardize_dtype(outputs["query_embeddings"].dtype) == half
    loss = model.compute_loss(x, None, outputs, training=False)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    queries = _numpy(outputs["query_embeddings"]).astype("float64")  # the 16-bit values
    candidates = _numpy(outputs["candidate_embeddings"]).astype("float64")
    logits = queries @ candidates.T / 0.05
    top = logits.max(axis=1, keepdims=True)
    log_sum = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    expected = float(np.mean(log_sum - np.diag(logits)))
    np.testing.assert_allclose(float(_numpy(loss)), expected, rtol=1e-5)


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_index_scores_in_float32_unless_asked_for_float16(policy):
    model = two_tower.TwoTowerRetrieval.from_ids(5, 40, 8)
    assert model.candidate_index.compute_dtype == "float32"
    rng = np.random.default_rng(1)
    catalogue = rng.normal(size=(40, 8)).astype("float32")
    queries = rng.normal(size=(6, 8)).astype("float32")
    expected = np.argsort(-(queries.astype("float16") @ catalogue.astype("float16").T), axis=1)
    index = two_tower.BruteForceIndex(dtype="float16")
    index.index(catalogue, np.arange(40))
    ids, scores = index.search(queries, k=3)
    assert keras.backend.standardize_dtype(scores.dtype) == "float16"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(ids), expected[:, :3])


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_negatives_layers_train_in_float32_under_mixed_precision(policy):
    from two_tower.negatives import FrequencyEstimator, NegativeCache, PopularitySampler

    rng = np.random.default_rng(2)
    x = {"query": rng.integers(0, 20, 256), "candidate": rng.integers(0, 30, 256)}

    def trained(policy_name):
        keras.mixed_precision.set_global_policy(policy_name)
        keras.utils.set_random_seed(0)
        model = two_tower.TwoTowerRetrieval.from_ids(
            20, 30, 8, loss="sampled_softmax", catalogue_size=30, num_sampled_negatives=5,
            remove_accidental_hits=True,
            frequency_estimator=FrequencyEstimator(num_buckets=30, decay=0.1),
            negative_cache=NegativeCache(size=64, max_age=2),
            negative_sampler=PopularitySampler.from_weights(np.arange(30) + 1.0),
        )  # fmt: skip
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        history = model.fit(x, batch_size=32, epochs=2, verbose=0)
        return model, history.history["loss"]

    mixed, mixed_loss = trained(policy)
    single, single_loss = trained("float32")
    assert np.all(np.isfinite(mixed_loss))
    np.testing.assert_allclose(mixed_loss, single_loss, rtol=0.05)
    for name in ("frequency_estimator", "negative_cache", "negative_sampler"):
        for variable in getattr(mixed, name).weights:
            assert keras.backend.standardize_dtype(variable.dtype) in ("float32", "int32")
    # The counts do not depend on precision: equal to float32's.
    np.testing.assert_allclose(
        _numpy(mixed.frequency_estimator.counts.value),
        _numpy(single.frequency_estimator.counts.value),
        rtol=1e-6,
    )


def test_sparse_tables_refuse_loss_scaling_and_name_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = two_tower.TwoTowerRetrieval.from_ids(5, 8, 4, sparse=True)
        x = {"query": np.arange(4) % 5, "candidate": np.arange(4)}
        with pytest.raises(ValueError, match="mixed_bfloat16"):
            model.compile(optimizer=keras.optimizers.Adagrad(0.1))
            model.fit(x, batch_size=4, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _movielens_top_100(data_dir, policy: str) -> float:
    train, test = tutorial_split(data_dir)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = fit_default_model(train)
        queries = _numpy(model.query_tower(np.arange(944)))
        catalogue = _numpy(model.candidate_tower(np.arange(1683)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    results = evaluate_retrieval(
        queries, catalogue[1:], test["user"], test["movie"] - 1,
        exclude_query_ids=train["user"], exclude_candidate_ids=train["movie"] - 1, ks=(100,),
    )  # fmt: skip
    return results["unseen"]["accuracy_at_100"]


@pytest.mark.slow
@pytest.mark.real_data
def test_mixed_precision_matches_float32_on_movielens(real_data_dir):
    reference = _movielens_top_100(real_data_dir, "float32")
    assert reference >= 0.60  # the quality bar (tests/test_quality.py)
    for policy in POLICIES:
        assert abs(_movielens_top_100(real_data_dir, policy) - reference) <= 0.005, policy
