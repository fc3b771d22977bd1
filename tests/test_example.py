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
            "--history-epochs",
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
        "popularity",
        "EASE (train profile)",
        "EASE (request time)",
        "id-only softmax (default)",
        "features: all",
        "features: id, history",
        "history tower (recency)",
        "history tower (recency), user id",
    ]
    for row in rows:
        values = [float(cell) for cell in row.split("|")[2:-1]]
        assert all(0.0 < v <= 1.0 for v in values) and values == sorted(values)
    cold = out.split("cold start, 10% of users held out")[1]
    assert "| popularity |" in cold and "| features, cold start |" in cold
    titles = out.split("never seen in training:\n")[1].split("\n\n")[0].splitlines()
    assert len(titles) == 5 and all(t.strip() for t in titles)


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
