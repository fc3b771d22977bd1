"""`two_tower.negatives`: streaming logQ, cross-batch negatives, popularity sampling.

Every expected value is computed here in NumPy: a dense moving average over every
bucket for the estimator, the softmax over explicitly assembled columns for the
cache and the sampler, the drawn frequencies for the sampler.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip
from two_tower.negatives import FrequencyEstimator, NegativeCache, PopularitySampler
from two_tower.negatives.popularity_sampler import TOTAL


def _numpy(value):
    return keras.ops.convert_to_numpy(value)


# ------------------------------------------------------------------ estimator
def _dense_estimates(batches, masks, num_buckets, decay):
    """Per step: the estimates of the batch's ids after a dense update of every bucket."""
    counts = np.zeros(num_buckets)
    results = []
    for step, (ids, mask) in enumerate(zip(batches, masks, strict=True), start=1):
        weight = max(decay, 1.0 / step)
        buckets = ids % num_buckets
        counts = (1 - weight) * counts + weight * np.bincount(buckets[mask], minlength=num_buckets)
        results.append(counts[buckets])
    return results, counts


@pytest.mark.parametrize("decay", [0.2, 0.3, 0.6])  # 1 / decay: 5, 3.33, 1.67 warm-up steps
def test_estimator_is_a_moving_average_of_every_bucket_in_numpy(decay):
    rng = np.random.default_rng(3)
    num_buckets = 7  # ids up to 19 share buckets
    batches = [rng.integers(0, 20, 9) for _ in range(30)]
    masks = [rng.random(9) < 0.8 for _ in range(30)]
    expected, final = _dense_estimates(batches, masks, num_buckets, decay)
    estimator = FrequencyEstimator(num_buckets=num_buckets, decay=decay)
    for ids, mask, want in zip(batches, masks, expected, strict=True):
        got = _numpy(estimator(ids, valid=mask, training=True))
        np.testing.assert_allclose(got[mask], want[mask], rtol=2e-5, atol=1e-7)
    # Read without updating: every bucket as the dense array holds it now (at least
    # `decay`, the floor of a read).
    np.testing.assert_allclose(
        _numpy(estimator(np.arange(7))), np.maximum(final, decay), rtol=2e-5, atol=1e-7
    )
    assert int(_numpy(estimator.step.value)) == 30


def test_reading_ids_not_seen_lately_is_finite_and_at_least_decay():
    estimator = FrequencyEstimator(num_buckets=10, decay=0.25)
    np.testing.assert_array_equal(_numpy(estimator(np.array([0, 3]))), [0.25, 0.25])  # no step
    for _ in range(40):
        estimator(np.array([1, 1, 2]), training=True)
    got = _numpy(estimator(np.array([1, 2, 7])))
    np.testing.assert_allclose(got, [2.0, 1.0, 0.25], rtol=1e-5)  # 7: never seen


def _zipf_stream(rng, ranking, batch, steps):
    """`steps` batches of ids drawn with probability 1/rank (rank 1 = ranking[0])."""
    weights = 1.0 / np.arange(1, len(ranking) + 1)
    cumulative = np.cumsum(weights / weights.sum())
    draws = np.searchsorted(cumulative, rng.random((steps, batch)))
    return ranking[np.minimum(draws, len(ranking) - 1)].astype("int32"), weights / weights.sum()


def test_estimator_is_within_ten_percent_for_the_top_thousand_items():
    # One epoch of a stationary stream, well past the warm-up (1,000 steps).
    rng = np.random.default_rng(0)
    items, batch, steps = 20_000, 16_384, 2_000
    ranking = rng.permutation(items)
    stream, probability = _zipf_stream(rng, ranking, batch, steps)
    estimator = FrequencyEstimator(num_buckets=items)
    for ids in stream:
        estimator(ids, training=True)
    estimates = _numpy(estimator(ranking[:1000]))
    error = np.abs(estimates / (probability[:1000] * batch) - 1)
    assert error.max() <= 0.10, error.max()


def test_estimator_follows_a_popularity_shift_within_three_over_decay_steps():
    rng = np.random.default_rng(1)
    items, batch, decay = 2_000, 4_096, 1e-2
    before = rng.permutation(items)
    after = before.copy()
    after[:100], after[100:200] = before[100:200], before[:100]  # ranks 101-200 rise
    estimator = FrequencyEstimator(num_buckets=items, decay=decay)
    stream, _ = _zipf_stream(rng, before, batch, 500)
    for ids in stream:
        estimator(ids, training=True)
    stream, probability = _zipf_stream(rng, after, batch, 300)
    risen, target = after[:100], probability[:100] * batch
    ratios = {}
    for step, ids in enumerate(stream, start=1):
        estimator(ids, training=True)
        if step in (50, 300):
            ratios[step] = float(np.mean(_numpy(estimator(risen)) / target))
    # After k steps, 1 - (1 - decay)^k of the change: 39 % at 50, 95 % at 300.
    assert ratios[50] < 0.75, ratios
    assert 0.93 <= ratios[300] <= 1.02, ratios


# ------------------------------------------------------------------- sampler
def test_sampler_draws_in_proportion_to_its_weights_and_reports_them():
    weights = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 1e-12, 4.0])
    sampler = PopularitySampler.from_weights(weights)
    probability = weights / weights.sum()
    shares = np.exp(_numpy(sampler.log_probabilities(np.arange(1, 7))))
    # The tiny weight keeps the smallest share, 2^-30; the others their own.
    np.testing.assert_allclose(shares[:4], probability[1:5], rtol=1e-5)
    np.testing.assert_allclose(shares[4], 2.0**-30, rtol=1e-5)
    np.testing.assert_allclose(shares[5], probability[6], rtol=1e-5)
    draws = 200_000
    ids, log_q = sampler.sample(draws, keras.random.SeedGenerator(4))
    ids = _numpy(ids)
    assert ids.min() >= 1 and ids.max() <= 6  # weight 0 never drawn
    frequency = np.bincount(ids, minlength=7) / draws
    spread = np.sqrt(probability * (1 - probability) / draws)
    assert np.all(np.abs(frequency - probability) <= 5 * spread + 1e-9)
    np.testing.assert_allclose(
        _numpy(log_q), np.log(np.maximum(probability, 2.0**-30))[ids], rtol=1e-5
    )


def test_unset_sampler_is_uniform():
    sampler = PopularitySampler(num_items=3)
    shares = np.exp(_numpy(sampler.log_probabilities(np.arange(3))))
    np.testing.assert_allclose(shares, [1 / 3] * 3, rtol=1e-5)
    assert int(_numpy(sampler.cumulative.value)[-1]) == TOTAL


# ------------------------------------------------------------ model, NumPy loss
USERS, ITEMS, DIM, BATCH = 6, 10, 4, 4


def _model(loss="softmax", **options):
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(USERS, DIM),
        keras.layers.Embedding(ITEMS, DIM),
        loss=loss,
        temperature=0.5,
        remove_accidental_hits=True,
        **options,
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    rng = np.random.default_rng(2)
    for tower, rows in ((model.query_tower, USERS), (model.candidate_tower, ITEMS)):
        tower.embeddings.assign(rng.normal(size=(rows, DIM)).astype("float32"))
    return model


def _tables(model):
    return _numpy(model.query_tower.embeddings.value), _numpy(
        model.candidate_tower.embeddings.value
    )


def _batches(with_probability=True):
    rng = np.random.default_rng(9)
    batches = []
    for _ in range(3):
        candidates = rng.integers(0, 4, BATCH)  # few ids: accidental hits in the cache too
        x = {"query": rng.integers(0, USERS, BATCH), "candidate": candidates}
        if with_probability:
            x["candidate_sampling_probability"] = rng.uniform(0.05, 1.0, BATCH).astype("float32")
        batches.append(x)
    return batches


def _numpy_loss(queries, ids, log_q, cache_rows, sampled, temperature=0.5):
    """The softmax over [batch, valid cache rows, sampled], each part logQ-corrected."""
    query_table, item_table = queries
    q, c = query_table, item_table[ids]
    columns, column_ids, corrections = [c], [ids], []
    rows = len(ids)
    cached = len(cache_rows[0])
    shift = np.log((rows + cached) / rows)
    corrections.append(log_q + shift)
    if cached:
        columns.append(item_table[cache_rows[0]])
        column_ids.append(cache_rows[0])
        corrections.append(cache_rows[1] + shift)
    if sampled is not None:
        sampled_ids, sampled_log_p = sampled
        columns.append(item_table[sampled_ids])
        column_ids.append(sampled_ids)
        corrections.append(np.log(len(sampled_ids)) + sampled_log_p)
    columns, column_ids = np.concatenate(columns), np.concatenate(column_ids)
    logits = q @ columns.T / temperature - np.concatenate(corrections)[None, :]
    losses = []
    for i in range(rows):
        row = logits[i].copy()
        hits = (column_ids == ids[i]) & (np.arange(len(column_ids)) != i)
        row[hits] = -np.inf
        top = row.max()
        losses.append(top + np.log(np.exp(row - top).sum()) - row[i])
    return float(np.mean(losses))


@pytest.mark.parametrize(
    ("loss", "max_age", "popular"),
    [("softmax", None, False), ("softmax", 1, False), ("sampled_softmax", None, True)],
)
def test_cached_and_sampled_negatives_give_the_numpy_loss(loss, max_age, popular):
    options = {"negative_cache": NegativeCache(size=6, max_age=max_age)}
    if loss == "sampled_softmax":  # every draw is item 5 (p = 1): deterministic columns
        weights = np.zeros(ITEMS)
        weights[5] = 1.0
        options.update(
            catalogue_size=ITEMS,
            num_sampled_negatives=3,
            negative_sampler=PopularitySampler.from_weights(weights),
        )
    model = _model(loss, **options)
    query_table, item_table = _tables(model)
    batches = _batches()
    history = [model.train_on_batch(x, return_dict=True)["loss"] for x in batches]
    first, second, third = batches

    # After two batches of 4 in a ring of 6: slots 0-1 hold the second batch's last
    # two rows (wrapped), 2-3 the first batch's last two, 4-5 the second's first two.
    def rows(x, positions):
        return x["candidate"][positions], np.log(x["candidate_sampling_probability"][positions])

    parts = [rows(second, [2, 3]), rows(first, [2, 3]), rows(second, [0, 1])]
    if max_age == 1:  # the first batch is two steps old
        parts = [parts[0], parts[2]]
    cache_rows = tuple(np.concatenate([p[i] for p in parts]) for i in range(2))
    sampled = (np.full(3, 5), np.zeros(3)) if popular else None
    expected = _numpy_loss(
        (query_table[third["query"]], item_table),
        third["candidate"],
        np.log(third["candidate_sampling_probability"]),
        cache_rows,
        sampled,
    )
    np.testing.assert_allclose(history[2], expected, rtol=1e-5)
    # The first step had an empty cache: the plain corrected softmax.
    expected_first = _numpy_loss(
        (query_table[first["query"]], item_table),
        first["candidate"],
        np.log(first["candidate_sampling_probability"]),
        (np.zeros(0, int), np.zeros(0)),
        sampled,
    )
    np.testing.assert_allclose(history[0], expected_first, rtol=1e-5)


def test_estimated_log_q_gives_the_numpy_loss():
    # decay 0.5: two warm-up steps, then the moving average (step 3).
    model = _model(frequency_estimator=FrequencyEstimator(num_buckets=ITEMS, decay=0.5))
    query_table, item_table = _tables(model)
    batches = _batches(with_probability=False)
    history = [model.train_on_batch(x, return_dict=True)["loss"] for x in batches]
    ids = [x["candidate"] for x in batches]
    estimates, _ = _dense_estimates(ids, [np.ones(BATCH, bool)] * 3, ITEMS, 0.5)
    for step in (0, 2):
        expected = _numpy_loss(
            (query_table[batches[step]["query"]], item_table),
            ids[step],
            np.log(estimates[step]),
            (np.zeros(0, int), np.zeros(0)),
            None,
        )
        np.testing.assert_allclose(history[step], expected, rtol=1e-5)


def test_task_assembles_batch_cache_and_sampled_columns_as_numpy():
    # Arbitrary sampled ids and log probabilities (the model test draws p = 1).
    from two_tower.models.retrieval_task import RetrievalTask

    rng = np.random.default_rng(6)
    query_table = rng.normal(size=(USERS, DIM)).astype("float32")
    item_table = rng.normal(size=(ITEMS, DIM)).astype("float32")
    users, ids = rng.integers(0, USERS, 5), np.array([1, 2, 2, 7, 3])
    cache_ids = np.array([2, 9, 4, 1, 0, 5])
    cache_valid = np.array([True, True, False, True, False, True])
    cache_log_q = rng.normal(size=6).astype("float32")
    sampled_ids, sampled_log_p = np.array([7, 0, 8]), np.log([0.1, 0.3, 0.05]).astype("float32")
    probability = rng.uniform(0.1, 1.0, 5).astype("float32")
    task = RetrievalTask(
        loss="sampled_softmax", temperature=0.5, remove_accidental_hits=True,
        catalogue_size=ITEMS, num_sampled_negatives=3, caches_negatives=True,
    )  # fmt: skip
    outputs = {
        "query_embeddings": query_table[users],
        "candidate_embeddings": item_table[ids],
        "candidate_ids": ids,
        "candidate_sampling_probability": probability,
        "sampled_candidate_ids": sampled_ids.astype("int32"),
        "sampled_candidate_embeddings": item_table[sampled_ids],
        "sampled_candidate_log_probability": sampled_log_p,
        "cached_negatives": {
            "embeddings": item_table[cache_ids],
            "ids": cache_ids.astype("int32"),
            "log_q": cache_log_q,
            "valid": cache_valid,
        },
    }
    outputs = keras.tree.map_structure(keras.ops.convert_to_tensor, outputs)
    loss = task.compute_loss(
        None, outputs, None,
        similarity_fn=lambda q, c: keras.ops.matmul(q, keras.ops.transpose(c)),
        score_fn=None,
    )  # fmt: skip
    expected = _numpy_loss(
        (query_table[users], item_table), ids, np.log(probability),
        (cache_ids[cache_valid], cache_log_q[cache_valid]), (sampled_ids, sampled_log_p),
    )  # fmt: skip
    np.testing.assert_allclose(float(_numpy(loss)), expected, rtol=1e-5)


def test_negatives_train_and_evaluate_without_touching_the_cache_in_evaluation():
    model = _model(
        frequency_estimator=FrequencyEstimator(num_buckets=16),
        negative_cache=NegativeCache(size=8),
    )
    x = _batches(with_probability=False)[0]
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    assert np.isfinite(model.evaluate(x, batch_size=BATCH, verbose=0))  # before any step
    model.fit(x, batch_size=BATCH, epochs=3, verbose=0)
    steps = int(_numpy(model.negative_cache.step.value))
    estimator_steps = int(_numpy(model.frequency_estimator.step.value))
    loss = model.evaluate(x, batch_size=BATCH, verbose=0)
    assert np.isfinite(loss)
    unseen = {"query": x["query"], "candidate": np.array([9, 9, 8, 1])}  # 8, 9 never trained on
    assert np.isfinite(model.evaluate(unseen, batch_size=BATCH, verbose=0))
    assert (steps, estimator_steps) == (3, 3)
    assert int(_numpy(model.negative_cache.step.value)) == 3
    assert int(_numpy(model.frequency_estimator.step.value)) == 3


def test_negative_layers_are_saved_with_their_state(tmp_path):
    weights = np.arange(ITEMS, dtype="float64") + 1
    model = _model(
        "sampled_softmax",
        catalogue_size=ITEMS,
        num_sampled_negatives=3,
        frequency_estimator=FrequencyEstimator(num_buckets=32, decay=0.01),
        negative_cache=NegativeCache(size=8, max_age=3),
        negative_sampler=PopularitySampler.from_weights(weights),
    )
    model.fit(_batches(with_probability=False)[0], batch_size=BATCH, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name in ("frequency_estimator", "negative_cache", "negative_sampler"):
        original, restored = getattr(model, name), getattr(loaded, name)
        assert type(restored) is type(original)
        assert restored.get_config() == original.get_config()
        for a, b in zip(original.get_weights(), restored.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    assert_config_round_trip(FrequencyEstimator(num_buckets=5, decay=0.5))
    assert_config_round_trip(NegativeCache(size=5, max_age=2))
    assert_config_round_trip(PopularitySampler(num_items=5))
    loaded.fit(_batches(with_probability=False)[1], batch_size=BATCH, epochs=1, verbose=0)
    assert int(_numpy(loaded.negative_cache.step.value)) == 2 + 1


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FrequencyEstimator(num_buckets=0), "num_buckets"),
        (lambda: FrequencyEstimator(decay=0.0), "decay"),
        (lambda: FrequencyEstimator(decay=1.0), "decay"),
        (lambda: FrequencyEstimator(decay=math.nan), "decay"),
        (lambda: NegativeCache(size=0), "size"),
        (lambda: NegativeCache(size=4, max_age=0), "max_age"),
        (lambda: PopularitySampler(num_items=True), "num_items"),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.ones(3), "one weight per item"),
        (np.array([1.0, -1.0, 1.0, 1.0]), ">= 0"),
        (np.zeros(4), "positive sum"),
        (np.array([1.0, np.inf, 1.0, 1.0]), "finite"),
    ],
)
def test_bad_sampler_weights_change_nothing(weights, message):
    sampler = PopularitySampler.from_weights(np.array([1.0, 2.0, 3.0, 4.0]))
    before = _numpy(sampler.cumulative.value).copy()
    with pytest.raises(ValueError, match=message):
        sampler.set_weights_from(weights)
    np.testing.assert_array_equal(_numpy(sampler.cumulative.value), before)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"loss": "mse", "frequency_estimator": FrequencyEstimator()}, ValueError, "softmax"),
        (
            {"loss": "full_softmax", "catalogue_size": ITEMS, "negative_cache": NegativeCache(4)},
            ValueError,
            "softmax",
        ),
        ({"negative_sampler": PopularitySampler(ITEMS)}, ValueError, "sampled_softmax"),
        (
            {
                "loss": "sampled_softmax",
                "catalogue_size": ITEMS,
                "num_sampled_negatives": 2,
                "negative_sampler": PopularitySampler(ITEMS + 1),
            },
            ValueError,
            "catalogue_size",
        ),
        ({"negative_cache": 8}, TypeError, "NegativeCache"),
        ({"frequency_estimator": "yes"}, TypeError, "FrequencyEstimator"),
    ],
)
def test_negative_options_that_do_not_fit_the_loss_are_refused(options, error, message):
    with pytest.raises(error, match=message):
        two_tower.TwoTowerRetrieval(
            keras.layers.Embedding(USERS, DIM), keras.layers.Embedding(ITEMS, DIM), **options
        )


def test_estimator_beside_a_probability_column_is_refused():
    model = _model(frequency_estimator=FrequencyEstimator(num_buckets=16))
    with pytest.raises(ValueError, match="two sources of the logQ"):
        model.fit(_batches()[0], batch_size=BATCH, epochs=1, verbose=0)


def test_float_ids_are_refused_by_the_estimator():
    with pytest.raises(ValueError, match="integers"):
        FrequencyEstimator(num_buckets=4)(np.array([1.0, 2.0]), training=True)


def test_negatives_guide_runs():
    from testing import run_doc_blocks

    namespace = run_doc_blocks(
        "docs/negatives.md", "test_negatives.py::test_negatives_guide_runs", {}
    )
    assert int(_numpy(namespace["model"].frequency_estimator.step.value)) == 2 * 40
    assert int(_numpy(namespace["cached"].negative_cache.step.value)) == 40
    assert int(_numpy(namespace["sampled"].frequency_estimator.step.value)) == 40


def test_packed_positions_train_like_a_row_per_prefix_with_estimator_and_cache():
    # Padding is counted by neither layer: a packed batch and the same targets one per
    # row give the same losses, weights and estimates, two steps in (the cache full).
    from test_per_position_training import WIDTH, packed_batch, per_row_batch

    batch = packed_batch()
    rows = per_row_batch(batch)

    def model():
        made = two_tower.TwoTowerRetrieval.for_sequences(
            9, max_length=WIDTH, embedding_dim=8, num_heads=2, dropout=0.0, loss="softmax",
            remove_accidental_hits=True,
            frequency_estimator=FrequencyEstimator(num_buckets=9, decay=0.5),
            negative_cache=NegativeCache(size=64),
        )  # fmt: skip
        made.compile(optimizer=keras.optimizers.SGD(0.5))
        made.predict({"history": rows["query"]["history"][:1]}, verbose=0)
        return made

    packed_model, row_model = model(), model()
    rng = np.random.default_rng(0)
    tables = {id(w): rng.normal(scale=0.3, size=w.shape).astype("float32")
              for w in packed_model.trainable_weights}  # fmt: skip
    for made in (packed_model, row_model):
        for mine, theirs in zip(
            made.trainable_weights, packed_model.trainable_weights, strict=True
        ):
            mine.assign(tables[id(theirs)])
    packed = packed_model.fit(batch, batch_size=99, epochs=2, shuffle=False, verbose=0)
    by_row = row_model.fit(rows, batch_size=99, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(packed.history["loss"], by_row.history["loss"], rtol=1e-5)
    for after, other in zip(
        packed_model.trainable_weights, row_model.trainable_weights, strict=True
    ):
        np.testing.assert_allclose(_numpy(after.value), _numpy(other.value), atol=2e-5, rtol=1e-4)
    targets = rows["candidate"]
    np.testing.assert_allclose(
        _numpy(packed_model.frequency_estimator(np.arange(9))),
        np.maximum(np.bincount(targets, minlength=9), 0.5),  # the same 9 targets twice
        rtol=1e-6,
    )
    written = _numpy(packed_model.negative_cache.written.value) > 0
    assert written.sum() == 2 * len(targets)  # every target of both steps, no padding
