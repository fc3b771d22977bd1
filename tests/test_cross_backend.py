"""A model saved on one backend loads, serves and trains on every backend.

One more is saved under JAX `ModelParallel` on 8 simulated devices (padded,
row-sharded tables and a row-sharded index) and loads on one device everywhere.

The model is compiled as the docs show (`two_tower.defaults.steps_per_execution()`,
16 on JAX and TensorFlow, and `FactorizedTopK` metrics) and loaded with its
compile config, as `keras.saving.load_model` does by default. Needs all three
backends in one environment: `nox -s cross-backend`. The single-backend sessions
skip it.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

BACKENDS = ("jax", "torch", "tensorflow")
MISSING = [b for b in BACKENDS if importlib.util.find_spec(b) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs jax, torch and tensorflow together (nox -s cross-backend); missing {MISSING}",
)

NUM_USERS, NUM_ITEMS, DIM, K = 20, 300, 8, 15

SAVE = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import two_tower

    path = sys.argv[1]
    keras.utils.set_random_seed(0)
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding({users}, {dim}),
        keras.layers.Embedding({items}, {dim}),
        loss="full_softmax",
        catalogue_size={items},
    )
    rng = np.random.default_rng(0)
    x = {{"query": rng.integers(0, {users}, 2000), "candidate": rng.integers(0, {items}, 2000)}}
    # Compiled as docs/getting-started.md shows.
    model.compile(
        optimizer=two_tower.defaults.optimizer(),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
        metrics=[
            two_tower.FactorizedTopK(
                ks=(10,),
                num_queries={users},
                catalogue_size={items},
                exclude_query_ids=x["query"][:100],
                exclude_candidate_ids=x["candidate"][:100],
                name="unseen",
            )
        ],
    )
    model.fit(x, batch_size=200, epochs=2, verbose=0)
    # Weights on a 1/8 grid: scores are exact in float32 on every backend, and
    # equal rows make ties, so tie order is compared too.
    for table in (model.query_tower.embeddings, model.candidate_tower.embeddings):
        values = np.round(keras.ops.convert_to_numpy(table) * 8) / 8
        values[1::7] = values[0]
        table.assign(values)
    ids = np.array([f"movie-{{i}}" for i in range({items})])
    model.index_candidates(np.arange({items}), ids)
    model.save(path)
    found = model.recommend(np.arange({users}), k={k}).tolist()

    # A model that carries its vocabularies: raw ids in and out after loading.
    users = two_tower.Vocabulary([f"user-{{i}}" for i in range({users})], num_oov_buckets=2)
    movies = two_tower.Vocabulary(ids.tolist())
    raw = two_tower.TwoTowerRetrieval.from_ids(
        embedding_dim={dim}, query_vocabulary=users, candidate_vocabulary=movies
    )
    raw.compile(optimizer="adam")
    named = {{"query": np.array([f"user-{{i}}" for i in x["query"]]),
             "candidate": ids[x["candidate"]]}}
    raw.fit(named, batch_size=200, epochs=1, verbose=0)
    for tower in (raw.query_tower, raw.candidate_tower):
        for variable in tower.weights:
            variable.assign(np.round(keras.ops.convert_to_numpy(variable) * 8) / 8)
    raw.index_candidates()
    raw.save(path + ".raw.keras")
    requests = ["user-3", "user-0", "someone new"]
    exclude = [["movie-5", "movie-9"], None, ["movie-1"]]
    print(json.dumps({{"found": found,
                      "raw": raw.recommend(requests, k={k}, exclude=exclude).tolist(),
                      "similar": raw.similar_items(["movie-7"], k={k}).tolist()}}))
    """
).format(users=NUM_USERS, items=NUM_ITEMS, dim=DIM, k=K)

LOAD = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import two_tower

    model = keras.saving.load_model(sys.argv[1])  # with its compile config
    found = model.recommend(np.arange({users}), k={k})
    tables = [keras.ops.convert_to_numpy(t).tolist() for t in
              (model.query_tower.embeddings, model.candidate_index.embeddings())]
    # The loaded compile config trains and evaluates here too.
    rng = np.random.default_rng(1)
    x = {{"query": rng.integers(0, {users}, 400), "candidate": rng.integers(0, {items}, 400)}}
    logs = model.evaluate(x, batch_size=200, verbose=0, return_dict=True)
    history = model.fit(x, batch_size=200, epochs=1, verbose=0)
    raw = keras.saving.load_model(sys.argv[1] + ".raw.keras")
    requests = ["user-3", "user-0", "someone new"]
    exclude = [["movie-5", "movie-9"], None, ["movie-1"]]
    print(json.dumps({{"found": found.tolist(), "tables": tables,
                      "raw": raw.recommend(requests, k={k}, exclude=exclude).tolist(),
                      "similar": raw.similar_items(["movie-7"], k={k}).tolist(),
                      "ids": model.candidate_index.candidate_ids.tolist(),
                      "logged": sorted(logs),
                      "loss": history.history["loss"][-1]}}))
    """
).format(users=NUM_USERS, items=NUM_ITEMS, k=K)


def run(backend, script, *args, env=None):
    completed = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=dict(os.environ, KERAS_BACKEND=backend, **(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("saved_on", BACKENDS)
def test_saved_on_one_backend_same_top_k_on_every_backend(tmp_path, saved_on):
    """Also a model with vocabularies: raw ids in and out, the same on every backend."""
    path = str(tmp_path / "model.keras")
    saved = run(saved_on, SAVE, path)
    for backend in BACKENDS:
        loaded = run(backend, LOAD, path)
        assert loaded["found"] == saved["found"], f"{backend} differs from the {saved_on} results"
        # Raw ids: the vocabularies came with the file, and give the same raw ids.
        assert loaded["raw"] == saved["raw"] and loaded["similar"] == saved["similar"], backend
        assert isinstance(loaded["raw"][0][0], str) and "movie-5" not in loaded["raw"][0]
        assert loaded["logged"] == ["loss"]  # the metrics are not saved (a warning says so)
        assert np.isfinite(loaded["loss"])
        # And all equal a NumPy reference: (score desc, position asc).
        users, items = (np.array(t, dtype="float64") for t in loaded["tables"])
        scores = users @ items.T
        ids = np.array(loaded["ids"])
        expected = [ids[np.lexsort((np.arange(len(row)), -row))[:K]].tolist() for row in scores]
        assert loaded["found"] == expected
        assert any(
            len(set(np.round(row[np.lexsort((np.arange(len(row)), -row))[:K]], 6))) < K
            for row in scores
        ), "the fixture should contain ties within the top k"


SPARSE_SAVE = textwrap.dedent(
    """
    import sys
    import keras, numpy as np
    import two_tower

    keras.utils.set_random_seed(0)
    model = two_tower.TwoTowerRetrieval.from_ids(50, 80, 8, sparse=True, loss="softmax")
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  steps_per_execution=two_tower.defaults.steps_per_execution())
    rng = np.random.default_rng(0)
    model.fit({"query": rng.integers(0, 30, 640), "candidate": rng.integers(0, 60, 640)},
              batch_size=64, epochs=1, verbose=0)
    model.save(sys.argv[1])
    print("{}")
    """
)

SPARSE_RESUME = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import two_tower  # registers the classes

    model = keras.saving.load_model(sys.argv[1])
    state = [keras.ops.convert_to_numpy(v.value).tolist() for v in model.optimizer.variables]
    rng = np.random.default_rng(1)
    model.fit({"query": rng.integers(0, 30, 320), "candidate": rng.integers(0, 60, 320)},
              batch_size=64, epochs=1, verbose=0, shuffle=False)
    print(json.dumps({"state": state, "weights": [w.tolist() for w in model.get_weights()]}))
    """
)


@pytest.mark.parametrize("saved_on", BACKENDS)
def test_sparse_model_resumes_training_on_every_backend(tmp_path, saved_on):
    """Row-sparse tables and their lazy-Adam state load and train on every backend alike."""
    path = str(tmp_path / "sparse.keras")
    run(saved_on, SPARSE_SAVE, path)
    results = {backend: run(backend, SPARSE_RESUME, path) for backend in BACKENDS}
    reference = results[saved_on]
    assert int(reference["state"][0]) == 10  # 640 / 64 steps of saved Adam state
    for backend, result in results.items():
        for expected, actual in zip(reference["state"], result["state"], strict=True):
            np.testing.assert_array_equal(np.array(actual), np.array(expected))
        for expected, actual in zip(reference["weights"], result["weights"], strict=True):
            np.testing.assert_allclose(actual, expected, atol=1e-5, err_msg=backend)


MODEL_PARALLEL_SAVE = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import two_tower

    assert len(keras.distribution.list_devices()) == 8
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"])
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=two_tower.distribution.layout_map(mesh), batch_dim_name="batch"))
    keras.utils.set_random_seed(0)
    # Rows that do not divide by the model axis (4): the towers pad their tables.
    model = two_tower.TwoTowerRetrieval.from_ids(43, 83, 8, loss="softmax")
    model.compile(optimizer="adam", steps_per_execution=two_tower.defaults.steps_per_execution())
    rng = np.random.default_rng(0)
    model.fit({"query": rng.integers(0, 43, 512), "candidate": rng.integers(0, 83, 512)},
              batch_size=64, epochs=2, verbose=0)
    table = model.candidate_tower.embedding.embeddings
    assert {shard.data.shape[0] for shard in table.value.addressable_shards} == {21}
    # On a 1/8 grid: exact scores on every backend and device count, with ties.
    for tower in (model.query_tower, model.candidate_tower):
        for variable in tower.weights:
            variable.assign(np.round(np.asarray(variable.value) * 8) / 8)
    model.index_candidates(np.arange(83))  # sharded over the 8 devices
    model.save(sys.argv[1])
    print(json.dumps(model.recommend(np.arange(43), k=10).tolist()))
    """
)

MODEL_PARALLEL_LOAD = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import two_tower

    model = keras.saving.load_model(sys.argv[1])
    print(json.dumps(model.recommend(np.arange(43), k=10).tolist()))
    """
)


def test_saved_under_jax_model_parallel_loads_on_every_backend(tmp_path):
    """Padded, row-sharded tables and a sharded index, saved on 8 devices, load on one."""
    path = str(tmp_path / "model_parallel.keras")
    devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    saved = run("jax", MODEL_PARALLEL_SAVE, path, env=devices)
    for backend in BACKENDS:
        assert run(backend, MODEL_PARALLEL_LOAD, path) == saved, backend


FAISS_SAVE = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import two_tower

    keras.utils.set_random_seed(0)
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding({users}, {dim}),
        keras.layers.Embedding({items}, {dim}),
        candidate_index=two_tower.FaissIndex(nlist=8, target_recall=0.95, calibration_k={k}),
    )
    rng = np.random.default_rng(0)
    model.compile(optimizer="adam")
    x = {{"query": rng.integers(0, {users}, 600), "candidate": rng.integers(0, {items}, 600)}}
    model.fit(x, batch_size=100, epochs=1, verbose=0)
    for variable in model.trainable_variables:  # on a 1/8 grid: exact scores everywhere
        variable.assign(rng.integers(-8, 9, tuple(variable.shape)) / 8)
    model.index_candidates(np.arange({items}), np.arange({items}) * 7 + 1)
    model.save(sys.argv[1])
    index = model.candidate_index
    print(json.dumps({{"found": model.recommend(np.arange({users}), k={k}).tolist(),
                      "calibration": [index.calibrated_nprobe, index.calibrated_recall]}}))
    """
).format(users=NUM_USERS, items=NUM_ITEMS, dim=DIM, k=K)

FAISS_LOAD = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import two_tower

    model = keras.saving.load_model(sys.argv[1])
    index = model.candidate_index
    assert isinstance(index, two_tower.FaissIndex), type(index)
    print(json.dumps({{"found": model.recommend(np.arange({users}), k={k}).tolist(),
                      "calibration": [index.calibrated_nprobe, index.calibrated_recall]}}))
    """
).format(users=NUM_USERS, k=K)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss-cpu")
def test_a_faiss_index_saved_in_the_keras_file_loads_on_every_backend(tmp_path):
    """The approximate index travels inside the `.keras` file with its calibration."""
    path = str(tmp_path / "faiss.keras")
    saved = run("jax", FAISS_SAVE, path)
    assert saved["calibration"][0] is not None and saved["calibration"][1] >= 0.95
    for backend in BACKENDS:
        loaded = run(backend, FAISS_LOAD, path)
        assert loaded == saved, f"{backend} differs from the JAX results"
