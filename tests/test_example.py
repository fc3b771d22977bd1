"""Smoke run of the main example on the real data."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "movielens_retrieval.py"


@pytest.mark.slow
@pytest.mark.real_data
def test_movielens_example_runs(real_data_dir):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2", "--data-dir", str(real_data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert f"backend={keras.backend.backend()}" in out
    titles = out.split("Recommended movies for user 42:\n")[1].split("fit:")[0].splitlines()
    assert len(titles) == 10 and all(t.strip() for t in titles)
    accuracy = float(out.split("test top-100 accuracy:")[1].split()[0])
    assert 0.0 < accuracy <= 1.0


def test_example_rejects_bad_epochs():
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "--epochs must be >= 1, got 0" in completed.stderr


@pytest.mark.slow
@pytest.mark.real_data
def test_movielens_softmax_example_runs(real_data_dir, tmp_path):
    example = EXAMPLE.parent / "movielens_softmax.py"
    plot = tmp_path / "recall.png"
    completed = subprocess.run(
        [
            sys.executable,
            str(example),
            "--epochs",
            "1",
            "--data-dir",
            str(real_data_dir),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "| unseen |" in out and "| all |" in out
    titles = out.split("Top-10 unseen movies for user 42:\n")[1].split("Saved")[0].splitlines()
    assert len(titles) == 10
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.real_data
def test_movielens_features_example_runs(real_data_dir):
    example = EXAMPLE.parent / "movielens_features.py"
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    completed = subprocess.run(
        [
            sys.executable,
            str(example),
            "--epochs",
            "1",
            "--splits",
            "temporal",
            "--data-dir",
            str(real_data_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    table = out.split("temporal split")[1].split("cold start")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == [
        "id-only softmax (default)",
        "features: all",
        "features: id, time, history",
    ]
    for row in rows:
        values = [float(cell) for cell in row.split("|")[2:-1]]
        assert all(0.0 < v <= 1.0 for v in values) and values == sorted(values)
    cold = out.split("cold start")[1]
    assert "| popularity |" in cold and "| features, cold start |" in cold


def test_features_example_rejects_bad_splits():
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE.parent / "movielens_features.py"), "--splits", "daily"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "--splits takes names from ('random', 'temporal'), got ['daily']" in completed.stderr


def _features_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "movielens_features", EXAMPLE.parent / "movielens_features.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_history_never_holds_the_rating_own_movie():
    import numpy as np

    example = _features_example()
    rng = np.random.default_rng(0)
    users = rng.choice(np.array(["7", "12", "3", "40"]), size=60)
    movies = np.arange(60) + 100  # one rating per movie, so a leak would show
    width = 5
    history = example.history_of_rows(users, movies, width)
    assert history.shape == (60, width)
    for row in range(60):
        mine = movies[users == users[row]]
        found = history[row][history[row] >= 0]
        assert movies[row] not in found
        assert set(found) <= set(mine)
        assert len(found) == len(set(found)) == min(width, len(mine) - 1)
    everyone = np.array(["12", "3", "40", "7", "99"])
    table = example.history_of_users(everyone, users, movies, width)
    for i, user in enumerate(everyone):
        found = table[i][table[i] >= 0]
        assert set(found) <= set(movies[users == user])
        assert len(found) == min(width, int(np.sum(users == user)))
