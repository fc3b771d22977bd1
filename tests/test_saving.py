"""`two_tower.saving`: atomic `.keras` saves, and clear errors on damaged files."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest

import two_tower
from two_tower import saving

NUM_USERS, NUM_ITEMS, DIM, K = 9, 40, 4, 5
posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals and permissions")


def build_model(seed=0):
    """An indexed id model with random float tables (no ties), and those tables."""
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(NUM_USERS, DIM), keras.layers.Embedding(NUM_ITEMS, DIM)
    )
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(NUM_USERS, DIM)).astype("float32")
    items = rng.normal(size=(NUM_ITEMS, DIM)).astype("float32")
    model.query_tower.embeddings.assign(users)
    model.candidate_tower.embeddings.assign(items)
    model.index_candidates(np.arange(NUM_ITEMS))
    return model, users, items


def numpy_top_k(users, items, k=K):
    scores = users.astype("float64") @ items.astype("float64").T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def temporaries(folder):
    return sorted(name for name in os.listdir(folder) if ".tmp-" in name)


def test_save_then_load_recommends_the_same(tmp_path):
    model, users, items = build_model()
    path = tmp_path / "model.keras"
    model.save(path)
    restored = saving.load_model(path)
    queries = np.arange(NUM_USERS)
    np.testing.assert_array_equal(restored.recommend(queries, k=K), numpy_top_k(users, items))
    np.testing.assert_array_equal(restored.recommend(queries, k=K), model.recommend(queries, k=K))
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]


def test_save_replaces_an_existing_file(tmp_path):
    path = str(tmp_path / "model.keras")
    build_model(seed=0)[0].save(path)
    model, users, items = build_model(seed=1)
    model.save(path)
    restored = saving.load_model(path)
    np.testing.assert_array_equal(
        restored.recommend(np.arange(NUM_USERS), k=K), numpy_top_k(users, items)
    )
    assert os.listdir(tmp_path) == ["model.keras"]


KILLED_SAVE = textwrap.dedent(
    """
    import json, os, signal, sys, zipfile
    import keras, numpy as np
    import two_tower

    path = sys.argv[1]
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(9, 4), keras.layers.Embedding(40, 4)
    )
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    model.index_candidates(np.arange(40))
    model.save(path)  # version 1
    print(json.dumps(model.recommend(np.arange(9), k=5).tolist()), flush=True)

    write = zipfile.ZipFile.writestr

    def write_then_die(self, *args, **kwargs):
        # The weights are now in the archive, its central directory is not.
        write(self, *args, **kwargs)
        self.fp.flush()
        info = {"file": self.fp.name, "bytes": os.path.getsize(self.fp.name)}
        print(json.dumps(info), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    zipfile.ZipFile.writestr = write_then_die
    rng = np.random.default_rng(7)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    model.index_candidates(np.arange(40), candidate_ids=np.arange(40) + 1000)
    model.save(path)  # version 2, killed half-way
    print("the save was not interrupted", flush=True)
    """
)


@pytest.mark.slow
@posix_only
def test_a_save_killed_half_way_leaves_the_previous_file(tmp_path):
    path = tmp_path / "model.keras"
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    child = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    lines = child.stdout.splitlines()
    assert len(lines) == 2, child.stdout + child.stderr
    version_1_ids = json.loads(lines[0])
    killed_in = json.loads(lines[1])
    # The kill came in the middle of writing the hidden temporary file, not the target.
    temporary = killed_in["file"]
    assert os.path.dirname(temporary) == str(tmp_path)
    assert re.fullmatch(r"\.model\.keras\.tmp-\w+\.keras", os.path.basename(temporary))
    assert temporaries(tmp_path) == [os.path.basename(temporary)]
    assert killed_in["bytes"] > 0 and os.path.getsize(temporary) == killed_in["bytes"]
    # The target still holds version 1, and the half-written file is reported as such.
    restored = saving.load_model(path)
    assert restored.recommend(np.arange(NUM_USERS), k=K).tolist() == version_1_ids
    with pytest.raises(ValueError, match="truncated or corrupt"):
        saving.load_model(temporary)
    # The next save of the same path removes the killed save's leftover.
    model, users, items = build_model(seed=3)
    model.save(path)
    assert temporaries(tmp_path) == [] and os.listdir(tmp_path) == ["model.keras"]
    np.testing.assert_array_equal(
        saving.load_model(path).recommend(np.arange(NUM_USERS), k=K), numpy_top_k(users, items)
    )


@pytest.mark.parametrize("had_a_file", [True, False])
def test_an_exception_during_save_changes_nothing(tmp_path, monkeypatch, had_a_file):
    model, _, _ = build_model()
    path = tmp_path / "model.keras"
    if had_a_file:
        model.save(path)
        before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save(path)
    if had_a_file:
        assert path.read_bytes() == before
        assert os.listdir(tmp_path) == ["model.keras"]
    else:
        assert os.listdir(tmp_path) == []


@pytest.fixture
def saved_file(tmp_path):
    path = tmp_path / "model.keras"
    build_model()[0].save(path)
    return path


def test_a_truncated_file_is_named_as_truncated(saved_file, tmp_path):
    data = saved_file.read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated)) + ".*truncated or corrupt"):
        saving.load_model(truncated)


def test_flipped_bytes_are_caught_by_the_crc(saved_file, tmp_path):
    data = bytearray(saved_file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(damaged)) + ".*truncated or corrupt"):
        saving.load_model(damaged)


def test_a_zip_without_a_keras_config_is_rejected(tmp_path):
    path = tmp_path / "notes.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*lacks 'config.json'"):
        saving.load_model(path)


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "missing.keras"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        saving.load_model(missing)


@pytest.mark.parametrize("answer", ["n", "y"])
def test_overwrite_false_asks_as_keras_does(saved_file, monkeypatch, answer):
    before = saved_file.read_bytes()
    prompts = []

    def reply(prompt=""):
        prompts.append(prompt)
        return answer

    monkeypatch.setattr("builtins.input", reply)
    model, users, items = build_model(seed=1)
    model.save(saved_file, overwrite=False)
    assert len(prompts) == 1 and str(saved_file) in prompts[0]
    if answer == "n":
        assert saved_file.read_bytes() == before
    else:
        restored = saving.load_model(saved_file)
        np.testing.assert_array_equal(
            restored.recommend(np.arange(NUM_USERS), k=K), numpy_top_k(users, items)
        )


def test_overwrite_false_on_a_new_path_saves_without_asking(tmp_path, monkeypatch):
    def no_prompt(prompt=""):
        raise AssertionError(f"asked {prompt!r}")

    monkeypatch.setattr("builtins.input", no_prompt)
    path = tmp_path / "model.keras"
    build_model()[0].save(path, overwrite=False)
    assert zipfile.is_zipfile(path) and os.listdir(tmp_path) == ["model.keras"]


@posix_only
def test_permissions_follow_the_umask_or_the_replaced_file(tmp_path):
    umask = os.umask(0o022)
    try:
        model, _, _ = build_model()
        path = tmp_path / "model.keras"
        model.save(path)
        assert path.stat().st_mode & 0o777 == 0o666 & ~0o022
        path.chmod(0o600)
        model.save(path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


@posix_only
def test_saving_through_a_link_replaces_the_linked_file(tmp_path):
    model, users, items = build_model()
    real = tmp_path / "real.keras"
    link = tmp_path / "link.keras"
    link.symlink_to(real)
    model.save(link)
    assert link.is_symlink() and real.is_file()
    restored = saving.load_model(link)
    np.testing.assert_array_equal(
        restored.recommend(np.arange(NUM_USERS), k=K), numpy_top_k(users, items)
    )


def test_a_missing_folder_is_named(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder)) + " does not exist"):
        build_model()[0].save(folder / "model.keras")


def test_folder_saves_go_to_keras_unchanged(tmp_path):
    model, users, items = build_model()
    folder = tmp_path / "model_folder"
    model.save(folder, zipped=False)
    assert (folder / "config.json").is_file()
    restored = saving.load_model(folder)
    np.testing.assert_array_equal(
        restored.recommend(np.arange(NUM_USERS), k=K), numpy_top_k(users, items)
    )


def test_a_wrong_suffix_is_refused_by_keras(tmp_path):
    with pytest.raises(ValueError, match="Invalid filepath extension"):
        build_model()[0].save(tmp_path / "model.bin")
    assert os.listdir(tmp_path) == []
