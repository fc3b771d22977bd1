"""`keras.distribution` on 8 simulated JAX devices: the same results as one device.

Runs in the `tests-multidevice` nox session, which starts JAX with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (Keras' own CI simulates
devices this way). Every other session skips this file, saying why; in that
session (`TWO_TOWER_MULTIDEVICE=1`) a missing device count fails instead.
One test starts two more JAX processes of 4 devices each (gloo collectives over
127.0.0.1) and compares them with one process of 8.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import two_tower
from testing import (
    doc_blocks,
    fit_default_model,
    interactions,
    missing_devices,
    negative_layers,
    pairs_for,
    tutorial_split,
)

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
    return missing_devices(
        len(_devices()),
        DEVICES,
        "JAX devices",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8",
    )


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(autouse=True)
def _no_distribution_left():
    yield
    keras.distribution.set_distribution(None)


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
    x, ratings = interactions(ROWS, USERS, ITEMS)
    x = pairs_for(loss, x)
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


def _model_parallel():
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], _devices())
    return keras.distribution.ModelParallel(
        layout_map=two_tower.distribution.layout_map(mesh), batch_dim_name="batch"
    )


def _rows_per_device(variable) -> set[int]:
    return {shard.data.shape[0] for shard in variable.value.addressable_shards}


@pytest.mark.parametrize("kind", ["data", "model"])
@pytest.mark.parametrize("loss", two_tower.models.retrieval_task.LOSSES)
def test_distribution_trains_like_one_device(loss, kind):
    initial = _initial_weights()
    single, single_loss = _train(loss, None, initial)
    distribution = (
        keras.distribution.DataParallel(devices=_devices()) if kind == "data" else _model_parallel()
    )
    parallel, parallel_loss = _train(loss, distribution, initial)
    np.testing.assert_allclose(parallel_loss, single_loss, atol=1e-5, rtol=0)
    for actual, expected in zip(parallel.get_weights(), single.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    assert not np.allclose(single.get_weights()[0], initial[0])  # it trained
    tables = [
        parallel.query_tower.embedding.embeddings,
        parallel.candidate_tower.embedding.embeddings,
        parallel.candidate_tower.bias_embedding.embeddings,
    ]
    for table in tables:  # really distributed: on all 8 devices
        assert len(table.value.sharding.device_set) == DEVICES
        # Replicated, or each device holding a quarter of the rows.
        expected_rows = table.shape[0] if kind == "data" else table.shape[0] // 4
        assert _rows_per_device(table) == {expected_rows}


def _odd_sized(distribution):
    keras.distribution.set_distribution(distribution)
    model = two_tower.TwoTowerRetrieval.from_ids(943, 1683, 8, loss="softmax", catalogue_size=1683)
    metric = two_tower.FactorizedTopK(ks=(10, 100), catalogue_size=1683)
    model.compile(optimizer=keras.optimizers.Adagrad(0.1), metrics=[metric])
    return model


def test_odd_table_sizes_train_and_serve_like_one_device():
    rng = np.random.default_rng(5)
    x = {"query": rng.integers(0, 943, 512), "candidate": rng.integers(0, 1683, 512)}
    parallel = _odd_sized(_model_parallel())
    history = parallel.fit(x, batch_size=64, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    query_table = parallel.query_tower.embedding.embeddings
    candidate_table = parallel.candidate_tower.embedding.embeddings
    # Rounded up to the model axis (4), sharded by rows, the extra row still zero.
    assert query_table.shape == (944, 8) and candidate_table.shape == (1684, 8)
    assert _rows_per_device(query_table) == {236}
    assert _rows_per_device(candidate_table) == {421}
    assert not np.any(np.asarray(candidate_table.value)[1683:])
    assert parallel.query_tower.get_config()["table_rows"] == 944
    parallel.index_candidates(np.arange(1683))
    exclude = [np.array([0, 5]), np.array([], "int64"), np.array([7])] * 3

    keras.distribution.set_distribution(None)
    single = _odd_sized(None)
    single.embed_queries(np.arange(2))
    single.embed_candidates(np.arange(2))
    single.set_weights(
        [
            weights[: len(target)]
            for weights, target in zip(parallel.get_weights(), single.get_weights(), strict=True)
        ]
    )
    single.index_candidates(np.arange(1683))
    # evaluate with FactorizedTopK over the whole catalogue: the same metrics.
    test = {"query": rng.integers(0, 943, 128), "candidate": rng.integers(0, 1683, 128)}
    results = {}
    for name, model, distribution in (
        ("parallel", parallel, _model_parallel()),
        ("single", single, None),
    ):
        keras.distribution.set_distribution(distribution)
        results[name] = model.evaluate(test, batch_size=64, verbose=0, return_dict=True)
    assert results["single"]["top_k_accuracy_at_100"] > 0
    for key, value in results["single"].items():
        np.testing.assert_allclose(results["parallel"][key], value, atol=1e-5, rtol=0)
    for queries in (1, 3, 7):
        users = rng.integers(0, 943, queries)
        keras.distribution.set_distribution(_model_parallel())
        ids, scores = parallel.recommend(users, k=10, exclude=exclude[:queries], return_scores=True)
        keras.distribution.set_distribution(None)
        expected_ids, expected_scores = single.recommend(
            users, k=10, exclude=exclude[:queries], return_scores=True
        )
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5, rtol=0)
        for row, excluded in zip(ids, exclude[:queries], strict=True):
            assert not np.isin(row, excluded).any()
        items = rng.integers(0, 1683, queries)
        keras.distribution.set_distribution(_model_parallel())
        similar = parallel.similar_items(items, k=10)
        keras.distribution.set_distribution(None)
        np.testing.assert_array_equal(similar, single.similar_items(items, k=10))


def test_grown_tables_stay_sharded_and_train_on():
    rng = np.random.default_rng(6)
    parallel = _odd_sized(_model_parallel())
    x = {"query": rng.integers(0, 943, 256), "candidate": rng.integers(0, 1683, 256)}
    parallel.fit(x, batch_size=64, epochs=1, verbose=0)
    table = parallel.candidate_tower.embedding.embeddings
    old = np.asarray(table.value)[:1683].copy()
    parallel.grow_tables(query=950, candidate=1690)
    table = parallel.candidate_tower.embedding.embeddings
    # Padded to the model axis again (1690 -> 1692), sharded by rows, old rows kept.
    assert table.shape == (1692, 8) and _rows_per_device(table) == {423}
    assert len(table.value.sharding.device_set) == DEVICES
    np.testing.assert_array_equal(np.asarray(table.value)[:1683], old)
    assert not np.any(np.asarray(table.value)[1690:]) and np.any(np.asarray(table.value)[1683:1690])
    assert parallel.candidate_tower.get_config()["table_rows"] == 1692
    assert parallel.catalogue_size == 1690
    slots = [v for v in parallel.optimizer.variables if tuple(v.shape) == (1692, 8)]
    assert slots and all(_rows_per_device(v) == {423} for v in slots)  # sharded as the table
    x = {"query": rng.integers(940, 950, 128), "candidate": rng.integers(1680, 1690, 128)}
    history = parallel.fit(x, batch_size=64, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert np.any(np.asarray(parallel.candidate_tower.embedding.embeddings.value)[1683:1690] != 0)
    keras.distribution.set_distribution(None)
    # Outside the distribution the tables would lose their sharding: refused, unchanged.
    with pytest.raises(ValueError, match="laid out by a keras.distribution"):
        parallel.grow_tables(candidate=1700)
    assert parallel.candidate_tower.embedding.embeddings.shape == (1692, 8)


def _stable_top_k(queries, candidates, k, exclude):
    """NumPy reference: best first, equal scores lower position first."""
    scores = (queries.astype("float64") @ candidates.astype("float64").T).astype("float32")
    for row, positions in enumerate(exclude):
        scores[row, positions] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("kind", ["data", "model"])
def test_sharded_index_is_exact_with_ties(kind, tmp_path):
    rng = np.random.default_rng(7)
    num_candidates = 1683
    # Small integers: every score is exact in float32, and many are equal.
    candidates = rng.integers(-2, 3, (num_candidates, 8)).astype("float32")
    candidates[1000:1040] = candidates[:40]  # equal rows on different devices
    queries = rng.integers(-2, 3, (7, 8)).astype("float32")
    ids = np.arange(num_candidates) * 10 + 3
    exclude = [rng.choice(num_candidates, 50, replace=False) for _ in range(7)]
    exclude[2] = np.array([], "int64")
    distribution = (
        keras.distribution.DataParallel(devices=_devices()) if kind == "data" else _model_parallel()
    )
    keras.distribution.set_distribution(distribution)
    index = two_tower.BruteForceIndex(chunk_size=64)  # 4 steps of 8 x 64 rows
    group = np.arange(num_candidates) % 3
    index.index(candidates, ids, attributes={"group": group})
    sharded = index._catalogue.sharded  # private: how the rows are laid out
    assert len(sharded.chunks) == 4 and sharded.width == 64
    for chunk in sharded.chunks:  # each device holds 64 rows of each chunk, no more
        assert len(chunk.sharding.device_set) == DEVICES
        assert {shard.data.size // 8 for shard in chunk.addressable_shards} == {64}
    for k in (1, 10, 100):  # 100 > 64: a device's whole chunk reaches the merge
        expected_scores, expected = _stable_top_k(queries, candidates, k, [[]] * 7)
        found, scores = index.search(queries, k)
        np.testing.assert_array_equal(found, ids[expected])
        np.testing.assert_array_equal(scores, expected_scores)
        expected_scores, expected = _stable_top_k(queries, candidates, k, exclude)
        found, scores = index.search(queries, k, exclude=[ids[e] for e in exclude])
        np.testing.assert_array_equal(found, ids[expected])
        np.testing.assert_array_equal(scores, expected_scores)
    # Filters: a shared `where` and per-query allow-lists, across devices and chunks.
    allow = [rng.choice(num_candidates, 60, replace=False) for _ in range(7)]
    disallowed = []
    for row in range(7):
        outside = np.setdiff1d(np.arange(num_candidates), allow[row] if row % 2 else [])
        if row % 2 == 0:  # no allow-list
            outside = np.zeros(0, "int64")
        disallowed.append(np.union1d(outside, np.flatnonzero(group == 1)))
    expected_scores, expected = _stable_top_k(queries, candidates, 10, disallowed)
    found, scores = index.search(
        queries,
        10,
        where={"group": [0, 2]},
        allow=[ids[a] if row % 2 else None for row, a in enumerate(allow)],
    )
    np.testing.assert_array_equal(found, ids[expected])
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(index.embeddings(), candidates)
    index.save_assets(str(tmp_path))
    keras.distribution.set_distribution(None)
    reloaded = two_tower.BruteForceIndex(chunk_size=64)
    reloaded.load_assets(str(tmp_path))  # on one device
    assert reloaded._catalogue.sharded is None
    np.testing.assert_array_equal(reloaded.search(queries, 10)[0], index.search(queries, 10)[0])
    # add / remove / update: sharded again, in the order one device would leave them.
    new = rng.integers(-2, 3, (30, 8)).astype("float32")
    keras.distribution.set_distribution(distribution)
    for target in (index, reloaded):
        target.add(new, np.arange(30) + 10**6, attributes={"group": np.zeros(30, "int64")})
        target.remove(ids[:45])
        target.update(ids[100:103], new[:3])
        keras.distribution.set_distribution(None)
    assert index._catalogue.sharded is not None and reloaded._catalogue.sharded is None
    np.testing.assert_array_equal(index.candidate_ids, reloaded.candidate_ids)
    np.testing.assert_array_equal(index.embeddings(), reloaded.embeddings())
    for where in (None, {"group": [0]}):
        for got, expected in zip(
            index.search(queries, 10, where=where), reloaded.search(queries, 10, where=where),
            strict=True,
        ):  # fmt: skip
            np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
@pytest.mark.real_data
def test_movielens_default_on_8_devices_clears_the_bar(real_data_dir):
    """The single-device bar of test_quality.py, trained and served on a 2 x 4 mesh."""
    train, test = tutorial_split(real_data_dir)
    keras.distribution.set_distribution(_model_parallel())
    model = fit_default_model(train)
    assert _rows_per_device(model.candidate_tower.embedding.embeddings) == {421}
    movies = np.arange(1, 1683)
    model.index_candidates(movies, candidate_ids=movies)  # sharded over the 8 devices
    users = np.unique(test["user"])
    seen = [train["movie"][train["user"] == user] for user in users]
    top = model.recommend(users, k=100, exclude=seen)
    row_of = np.searchsorted(users, test["user"])
    hits = (top[row_of] == test["movie"][:, None]).any(axis=1)
    print(f"top-100, train-seen excluded, 8 devices: {hits.mean():.4f}")
    assert hits.mean() >= 0.60


def test_model_saved_under_model_parallel_loads_on_one_device(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(6)
    x = {"query": rng.integers(0, 943, 256), "candidate": rng.integers(0, 1683, 256)}
    model = _odd_sized(_model_parallel())
    model.fit(x, batch_size=64, epochs=1, verbose=0)
    model.index_candidates(np.arange(1683))
    expected = model.recommend(np.arange(5), k=10)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "expected.npy", np.asarray(expected))
    script = (
        "import sys, numpy as np, keras, two_tower\n"
        "model = keras.saving.load_model(sys.argv[1] + '/model.keras')\n"
        "assert len(keras.distribution.list_devices()) == 1\n"
        "np.testing.assert_array_equal(model.recommend(np.arange(5), k=10),"
        " np.load(sys.argv[1] + '/expected.npy'))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


TWO_PROCESSES = """
import os, sys
role, port, out = sys.argv[1:]
devices = "8" if role == "single" else "4"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + devices
import jax
import keras, numpy as np
import two_tower

if role != "single":  # two processes on this machine, 4 CPU devices each
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(role))
devices = keras.distribution.list_devices()
assert len(devices) == 8 and jax.process_count() == (1 if role == "single" else 2)
mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
distribution = keras.distribution.ModelParallel(
    layout_map=two_tower.distribution.layout_map(mesh), batch_dim_name="batch")
distribution.auto_shard_dataset = False  # each process is handed its own rows below
keras.distribution.set_distribution(distribution)
rng = np.random.default_rng(0)
items = rng.integers(0, 64, 512)
frequency = (np.bincount(items, minlength=64) / 512).astype("float32")
x = {"query": rng.integers(0, 40, 512), "candidate": items,
     "candidate_sampling_probability": frequency[items]}
ratings = rng.uniform(1, 5, 512).astype("float32")
rows, batch_size = np.arange(512), 64
if role != "single":  # its half of every global batch of 64
    rows, batch_size = rows.reshape(8, 2, 32)[:, int(role)].reshape(-1), 32
results = {}
for loss, options in [("mse", {}), ("softmax", {"remove_accidental_hits": True}),
                      ("sampled_softmax", {"num_sampled_negatives": 8}), ("full_softmax", {})]:
    keras.utils.set_random_seed(1)
    model = two_tower.TwoTowerRetrieval.from_ids(40, 64, 8, loss=loss, **options)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.embed_queries(np.arange(2))  # built, to keep the initial weights
    model.embed_candidates(np.arange(2))
    initial = [np.asarray(jax.experimental.multihost_utils.process_allgather(w.value, tiled=True))
               for w in model.weights]
    inputs = {key: value[rows] for key, value in x.items()}
    if loss in ("mse", "full_softmax"):  # the losses without logQ
        del inputs["candidate_sampling_probability"]
    history = model.fit(inputs, ratings[rows] if loss == "mse" else None, batch_size=batch_size,
                        epochs=1, shuffle=False, verbose=0)
    results[f"{loss}/loss"] = np.array(history.history["loss"][-1])
    for i, weight in enumerate(model.weights):
        value = weight.value
        if role != "single":  # gathered from both processes' devices
            value = jax.experimental.multihost_utils.process_allgather(value, tiled=True)
        results[f"{loss}/{i}"] = np.asarray(value)
        results[f"{loss}/initial/{i}"] = initial[i]
np.savez(out, **results)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives over 127.0.0.1) = 1 process x 8."""
    import subprocess
    import sys

    port = str(_free_port())

    def start(role):
        return subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESSES, role, port, str(tmp_path / f"{role}.npz")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    runs = [start("single")]
    runs[0].wait(timeout=600)
    runs += [start("0"), start("1")]
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
    single = np.load(tmp_path / "single.npz")
    assert len(single.files) == 4 * 7  # 4 losses: loss, 3 tables, 3 initial tables
    for loss in ("mse", "softmax", "sampled_softmax", "full_softmax"):
        for i in range(3):  # it trained
            assert not np.allclose(single[f"{loss}/{i}"], single[f"{loss}/initial/{i}"])
    for role in ("0", "1"):
        both = np.load(tmp_path / f"{role}.npz")
        for key in single.files:
            np.testing.assert_allclose(both[key], single[key], atol=1e-5, rtol=0, err_msg=key)


def test_unshardable_table_is_named():
    keras.distribution.set_distribution(_model_parallel())
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(943, 8, name="user_table"), keras.layers.Embedding(64, 8)
    )
    model.compile(optimizer="sgd")
    x = {"query": np.arange(64) % 943, "candidate": np.arange(64)}
    with pytest.raises(ValueError, match=r"'user_table'.*943 rows.*4 devices.*944"):
        model.fit(x, batch_size=32, epochs=1, verbose=0)


@pytest.mark.parametrize(
    ("rows", "batch_size", "message"),
    [(64, 30, r"batch size \(30 rows.*8 devices"), (70, 32, r"last batch \(6 rows.*8 devices")],
)
def test_batches_that_do_not_divide_are_refused(rows, batch_size, message):
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=_devices()))
    model = two_tower.TwoTowerRetrieval.from_ids(USERS, ITEMS, 8)
    model.compile(optimizer="sgd")
    x = {"query": np.arange(rows) % USERS, "candidate": np.arange(rows) % ITEMS}
    with pytest.raises(ValueError, match=message):
        model.fit(x, batch_size=batch_size, epochs=1, verbose=0)


def test_distributed_guide_runs_on_jax():
    x, _ = interactions(8192, USERS, ITEMS)
    x = pairs_for("full_softmax", x)  # from_ids' default loss
    namespace = {"x": x, "num_users": USERS, "num_items": ITEMS}
    test = "test_multidevice_jax.py::test_distributed_guide_runs_on_jax"
    first, second = doc_blocks("docs/distributed.md", test)
    exec(compile(first, "distributed.md", "exec"), namespace)
    history = namespace["model"].history.history["loss"]
    assert len(history) == 10 and np.all(np.isfinite(history)) and history[-1] < history[0]
    exec(compile(second, "distributed.md", "exec"), namespace)
    model = namespace["model"]
    model.embed_queries(np.arange(2))
    table = model.query_tower.embedding.embeddings  # rounded up, sharded by rows
    assert table.shape[0] == 944 and _rows_per_device(table) == {944 // 4}


def _negatives_model():
    return two_tower.TwoTowerRetrieval.from_ids(
        USERS, ITEMS, 8, loss="sampled_softmax", num_sampled_negatives=8,
        remove_accidental_hits=True, **negative_layers(ITEMS),
    )  # fmt: skip


def _train_with_negatives(distribution, initial):
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(1)
    model = _negatives_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    model.set_weights(initial)
    x, _ = interactions(ROWS, USERS, ITEMS)
    x.pop("candidate_sampling_probability")  # the estimator's instead
    history = model.fit(x, batch_size=64, epochs=2, shuffle=False, verbose=0)
    return model, history.history["loss"][-1]


def test_cache_estimator_and_popularity_sampling_train_like_one_device():
    keras.distribution.set_distribution(None)
    probe = _negatives_model()
    probe.embed_queries(np.arange(2))
    probe.embed_candidates(np.arange(2))
    initial = probe.get_weights()
    single, single_loss = _train_with_negatives(None, initial)
    parallel, parallel_loss = _train_with_negatives(
        keras.distribution.DataParallel(devices=_devices()), initial
    )
    np.testing.assert_allclose(parallel_loss, single_loss, atol=1e-5, rtol=0)
    # Every weight: the towers, the estimator's counts, the cache's rows.
    for actual, expected in zip(parallel.get_weights(), single.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    cache = parallel.negative_cache
    assert int(keras.ops.convert_to_numpy(cache.step.value)) == 2 * ROWS // 64
    assert len(cache.embeddings.value.sharding.device_set) == DEVICES  # one global cache
