"""The synthetic interaction log: deterministic, power-law, clustered, sharded atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import two_tower
from two_tower.datasets import ShardDataset, synthetic
from two_tower.evaluation import evaluate_retrieval

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")


def test_same_seed_same_log_and_chunks_are_independent():
    log = synthetic.SyntheticLog(num_users=300, num_items=200, num_clusters=5, seed=3)
    whole = log.to_arrays(1000, chunk_size=128)
    again = synthetic.SyntheticLog(num_users=300, num_items=200, num_clusters=5, seed=3)
    for name in synthetic.COLUMNS:
        np.testing.assert_array_equal(again.to_arrays(1000, chunk_size=128)[name], whole[name])
    other = synthetic.SyntheticLog(num_users=300, num_items=200, num_clusters=5, seed=4)
    assert not np.array_equal(other.to_arrays(1000, chunk_size=128)["item"], whole["item"])
    chunks = list(log.chunks(1000, chunk_size=128))
    assert [len(c["user"]) for c in chunks] == [128] * 7 + [104]
    assert np.all(np.diff(whole["timestamp"]) == 1)
    assert whole["user"].dtype == np.int32 and whole["timestamp"].dtype == np.int64
    assert whole["user"].max() < 300 and whole["item"].max() < 200 and whole["item"].min() >= 0


def test_popularity_follows_the_power_law():
    log = synthetic.SyntheticLog(
        num_users=100, num_items=50, num_clusters=5, popularity_exponent=1.2, affinity=0.0
    )
    items = log.to_arrays(400_000, chunk_size=100_000)["item"]
    frequencies = np.bincount(items, minlength=50) / items.size
    expected = np.arange(1, 51, dtype="float64") ** -1.2
    expected /= expected.sum()
    # Sorted by frequency, the items follow rank ** -1.2 (within sampling error).
    np.testing.assert_allclose(np.sort(frequencies)[::-1], expected, atol=4e-3)
    np.testing.assert_allclose(frequencies, log.popularity, atol=4e-3)


def test_interactions_stay_in_the_users_cluster_at_the_stated_rate():
    log = synthetic.SyntheticLog(num_users=500, num_items=400, num_clusters=8, affinity=0.7)
    data = log.to_arrays(200_000, chunk_size=50_000)
    same = log.item_clusters[data["item"]] == log.user_clusters[data["user"]]
    mass = np.bincount(log.item_clusters, weights=log.popularity, minlength=8)
    expected = np.mean(0.7 + 0.3 * mass[log.user_clusters[data["user"]]])
    assert abs(same.mean() - expected) < 0.01
    scores = log.ideal_scores(np.arange(5))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-9)


def test_write_shards_writes_a_checked_manifest(tmp_path):
    log = synthetic.SyntheticLog(num_users=40, num_items=30, num_clusters=3, seed=1)
    folder = synthetic.write_shards(log, tmp_path / "log", 250, shard_size=100)
    manifest = json.loads((folder / synthetic.MANIFEST).read_text())
    assert manifest["rows"] == 250 and [s["rows"] for s in manifest["shards"]] == [100, 100, 50]
    assert manifest["generator"]["seed"] == 1
    expected = log.to_arrays(250, chunk_size=100)
    for name in synthetic.COLUMNS:
        parts = [
            np.load(folder / shard["name"] / f"{name}.npy", mmap_mode="r")
            for shard in manifest["shards"]
        ]
        np.testing.assert_array_equal(np.concatenate(parts), expected[name])
        for shard in manifest["shards"]:
            path = folder / shard["name"] / f"{name}.npy"
            assert synthetic._sha256(path) == shard["sha256"][name]
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.write_shards(log, folder, 10)
    synthetic.write_shards(log, folder, 10, overwrite=True)
    assert json.loads((folder / synthetic.MANIFEST).read_text())["rows"] == 10


def test_an_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    log = synthetic.SyntheticLog(num_users=40, num_items=30, num_clusters=3)
    saves = []
    real_save = np.save

    def failing_save(path, array):
        saves.append(path)
        if len(saves) == 4:  # inside the second shard
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(synthetic.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        synthetic.write_shards(log, tmp_path / "log", 250, shard_size=100)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_users": 0, "num_items": 5}, "num_users"),
        ({"num_users": 5, "num_items": 3, "num_clusters": 4}, "num_clusters"),
        (
            {"num_users": 5, "num_items": 5, "num_clusters": 1, "popularity_exponent": -1.0},
            "popularity_exponent",
        ),
        ({"num_users": 5, "num_items": 5, "num_clusters": 1, "affinity": 1.5}, "affinity"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.SyntheticLog(**kwargs)
    log = synthetic.SyntheticLog(num_users=5, num_items=5, num_clusters=1)
    with pytest.raises(ValueError, match="num_interactions"):
        next(log.chunks(0))


@pytest.mark.slow
def test_a_model_learns_the_clusters_well_above_popularity():
    log = synthetic.SyntheticLog(
        num_users=2000, num_items=500, num_clusters=20, popularity_exponent=0.8, seed=5
    )
    data = log.to_arrays(120_000, chunk_size=20_000)
    train = {name: values[:100_000] for name, values in data.items()}
    test = {name: values[100_000:] for name, values in data.items()}
    keras.utils.set_random_seed(0)
    model = two_tower.TwoTowerRetrieval.from_ids(2000, 500, loss="softmax")
    model.compile(
        optimizer=two_tower.defaults.optimizer(),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    model.fit(
        {"query": train["user"], "candidate": train["item"]}, batch_size=1024, epochs=5, verbose=0
    )
    queries = keras.ops.convert_to_numpy(model.query_tower(np.arange(2000)))
    catalogue = keras.ops.convert_to_numpy(model.candidate_tower(np.arange(500)))
    learned = evaluate_retrieval(queries, catalogue, test["user"], test["item"], ks=(10,))
    popular = np.tile(np.log(np.bincount(train["item"], minlength=500) + 1.0), (2000, 1))
    baseline = evaluate_retrieval(
        np.eye(2000, 500, dtype="float32") * 0 + 1,
        np.diag(popular[0]).astype("float32"),
        test["user"],
        test["item"],
        ks=(10,),
    )
    ideal_scores = log.ideal_scores(np.arange(2000)).astype("float32")
    ideal = evaluate_retrieval(
        ideal_scores, np.eye(500, dtype="float32"), test["user"], test["item"], ks=(10,)
    )
    learned, baseline, ideal = (r["all"]["accuracy_at_10"] for r in (learned, baseline, ideal))
    # Measured on JAX: learned 0.50, popularity 0.18, the true model 0.59.
    assert learned > 2 * baseline
    # The generator's own probabilities are the ceiling (up to sampling noise).
    assert ideal > learned - 0.02


# ------------------------------------------------------------ atomic replacement
# The child imports only the NumPy/filesystem modules it needs (stub parent packages
# stand in for `two_tower` and `two_tower.datasets`, whose imports load Keras), so
# that each of the many killed runs starts in a fraction of a second.
KILLED_WRITE = textwrap.dedent(
    """
    import shutil, sys, time, types
    from pathlib import Path

    root, folder, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    for name in ("two_tower", "two_tower.datasets", "two_tower.saving"):  # not their Keras
        path = root.joinpath(*name.split(".")[1:])
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    from two_tower.datasets import synthetic

    def log(seed):
        return synthetic.SyntheticLog(num_users=50, num_items=40, num_clusters=4, seed=seed)

    if mode == "overwrite":
        synthetic.write_shards(log(1), folder, {old_rows}, shard_size={shard_size}, overwrite=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    print("start", flush=True)
    synthetic.write_shards(
        log(2), folder, {new_rows}, shard_size={shard_size}, overwrite=mode == "overwrite"
    )
    print("done", time.perf_counter() - start, flush=True)
    """
)
OLD_ROWS, NEW_ROWS, SMALL_SHARDS = 50, 300, 10  # 5 and 30 shards


def _killed_write(folder, mode, delay):
    """Runs the child; kills it `delay` s after its write began (None: lets it finish)."""
    script = KILLED_WRITE.format(old_rows=OLD_ROWS, new_rows=NEW_ROWS, shard_size=SMALL_SHARDS)
    root = Path(two_tower.__file__).parent
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(root), str(folder), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "start\n", child.communicate()
    if delay is not None:
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=60)
    assert child.returncode in (0, -signal.SIGKILL), err
    return out


def _which_log(folder):
    """'old' or 'new', whichever log the folder holds, read back batch by batch."""
    dataset = ShardDataset(
        folder, batch_size=64, shuffle=False, columns={"u": "user", "i": "item", "t": "timestamp"}
    )
    batches = [dataset[i] for i in range(len(dataset))]
    read = {key: np.concatenate([b[key] for b in batches]) for key in ("u", "i", "t")}
    for name, seed, rows in (("old", 1, OLD_ROWS), ("new", 2, NEW_ROWS)):
        log = synthetic.SyntheticLog(num_users=50, num_items=40, num_clusters=4, seed=seed)
        expected = log.to_arrays(rows, chunk_size=SMALL_SHARDS)
        if len(read["t"]) == rows and all(
            np.array_equal(read[key], expected[column])
            for key, column in (("u", "user"), ("i", "item"), ("t", "timestamp"))
        ):
            return name
    raise AssertionError(f"{folder} holds neither log: {len(read['t'])} rows")


def _leftovers(folder):
    beside = sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)
    inside = sorted(p.name for p in folder.iterdir())
    return beside, inside


@posix_only
@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="pure NumPy and filesystem, the same on every backend: run once, in the jax session",
)
def test_a_write_killed_at_any_moment_leaves_the_old_or_the_new_log(tmp_path):
    """SIGKILLs `write_shards` at 24 moments spread over its run (backend-independent).

    20 kills of `overwrite=True` over an existing log find the old log or the new
    one, loadable and whole, every time (never neither, never a mix); 4 kills of a
    write into a new folder find no folder or the new log. Each killed run leaves
    staging folders or generations; the next write removes them.
    """
    folder = tmp_path / "log"
    out = _killed_write(folder, "overwrite", None)  # how long an unkilled write takes
    duration = float(out.split()[-1])
    assert _which_log(folder) == "new"
    outcomes = []
    for step in range(20):
        _killed_write(folder, "overwrite", 1.3 * duration * step / 19)
        outcomes.append(_which_log(folder))
    # On a busy machine the write can take several times its unkilled duration, so
    # all 20 kills may land before its commit: later kills, until one lands after it.
    delay = 2.6 * duration
    while "new" not in outcomes and delay < 10:
        _killed_write(folder, "overwrite", delay)
        outcomes.append(_which_log(folder))
        delay *= 2
    assert "old" in outcomes and "new" in outcomes, (duration, outcomes)
    for step in range(4):
        _killed_write(folder, "new", 1.2 * duration * step / 3)
        if folder.exists():
            assert _which_log(folder) == "new"
    log = synthetic.SyntheticLog(num_users=50, num_items=40, num_clusters=4, seed=1)
    synthetic.write_shards(log, folder, OLD_ROWS, shard_size=SMALL_SHARDS, overwrite=True)
    assert _which_log(folder) == "old"
    beside, inside = _leftovers(folder)
    assert beside == [] and len(inside) == 2 and inside[1] == "manifest.json", (beside, inside)
    assert inside[0].startswith("generation-")


def test_the_next_write_removes_what_killed_writes_left(tmp_path):
    log = synthetic.SyntheticLog(num_users=40, num_items=30, num_clusters=3, seed=1)
    folder = synthetic.write_shards(log, tmp_path / "log", 50, shard_size=20)
    # What killed writes leave: a staging folder beside (this version's and an older
    # version's), a generation the manifest does not name, a manifest never swapped in.
    (tmp_path / ".log.staging-0badf00d" / "generation-1" / "shard-00000").mkdir(parents=True)
    (tmp_path / ".log.k3j_x9a2" / "shard-00000").mkdir(parents=True)
    (folder / "generation-deadbeef" / "shard-00000").mkdir(parents=True)
    (folder / ".manifest.json.0123abcd.tmp").write_text("{")
    # Not leftovers: kept.
    (tmp_path / ".log.notes").write_text("mine")
    (tmp_path / ".log.k3j_x9a3").mkdir()
    (tmp_path / ".log.k3j_x9a3" / "data.csv").write_text("mine")
    (folder / "README").write_text("mine")
    synthetic.write_shards(log, folder, 60, shard_size=20, overwrite=True)
    beside, inside = _leftovers(folder)
    assert beside == [".log.k3j_x9a3", ".log.notes"]
    assert len(inside) == 3 and inside[0] == "README" and inside[2] == "manifest.json"
    assert ShardDataset(folder).num_rows == 60


def test_logs_of_format_1_are_read_and_replaced(tmp_path):
    """Logs written before generation folders (shards under the folder) still work."""
    log = synthetic.SyntheticLog(num_users=40, num_items=30, num_clusters=3, seed=1)
    folder = synthetic.write_shards(log, tmp_path / "log", 50, shard_size=20)
    manifest = json.loads((folder / "manifest.json").read_text())
    generation = manifest["shards"][0]["name"].split("/")[0]
    for shard in manifest["shards"]:
        name = shard["name"].split("/")[1]
        (folder / shard["name"]).rename(folder / name)
        shard["name"] = name
        del shard["bytes"]
    (folder / generation).rmdir()
    manifest["format"] = "two_tower.synthetic/1"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    expected = log.to_arrays(50, chunk_size=20)["item"]
    dataset = ShardDataset(folder, batch_size=50, shuffle=False)
    np.testing.assert_array_equal(dataset[0]["candidate"], expected)
    synthetic.write_shards(log, folder, 70, shard_size=20, overwrite=True)
    assert not any(p.name.startswith("shard-") for p in folder.iterdir())
    assert ShardDataset(folder).num_rows == 70
    # That write killed after its manifest swap: the old shards stay, until the next write.
    (folder / "shard-00000").mkdir()
    (folder / "shard-00000" / "item.npy").write_bytes(b"old")
    synthetic.write_shards(log, folder, 30, shard_size=20, overwrite=True)
    assert not any(p.name.startswith("shard-") for p in folder.iterdir())
    assert ShardDataset(folder).num_rows == 30
