"""The examples run on the real data; the main example's default beats both baselines."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from two_tower.datasets import movielens

EXAMPLE = Path(__file__).parents[1] / "examples" / "movielens_retrieval.py"
TUTORIAL = EXAMPLE.parent / "keras_rs_tutorial.py"
ROWS = {
    "popularity": "popularity (most-rated movies)",
    "tutorial": "keras-rs tutorial model (MSE)",
    "default": "two_tower default (softmax)",
}


def _run(script: Path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *arguments],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def main_example(real_data_dir) -> str:
    """The main example's output with its defaults, run once per session."""
    completed = _run(EXAMPLE, "--data-dir", str(real_data_dir))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def _table(out: str) -> dict[str, tuple[float, float, float]]:
    """Row label -> (top-10, top-100, training seconds) from the example's table."""
    lines = out.split("\nmodel ")[1].splitlines()[1:]
    rows = {}
    for line in lines:
        if not line.strip():
            break
        label = next(name for name in ROWS.values() if line.startswith(name))
        top_10, top_100, seconds, unit = line[len(label) :].split()
        assert unit == "s"
        rows[label] = (float(top_10), float(top_100), float(seconds))
    return rows


def _popularity_accuracy(train: dict, test: dict, k: int) -> float:
    """NumPy: share of test ratings whose movie ranks in the top k by training counts,
    each user's training movies left out, ties counted in the movie's favour."""
    counts = np.bincount(train["movie"], minlength=1683).astype("float64")
    counts[0] = -np.inf  # no movie 0
    seen = np.zeros((944, 1683), bool)
    seen[train["user"], train["movie"]] = True
    scores = np.where(seen, -np.inf, counts[None, :])  # [users, movies]
    hits = 0
    for start in range(0, len(test["user"]), 2000):
        users, movies = test["user"][start : start + 2000], test["movie"][start : start + 2000]
        higher = (scores[users] > counts[movies][:, None]).sum(axis=1)
        hits += int((higher < k).sum())
    return hits / len(test["user"])


@pytest.fixture(scope="module")
def split(real_data_dir) -> tuple[dict, dict]:
    """The keras-rs tutorial's 80/20 split, as integer ids."""
    ratings = movielens.load_ratings(real_data_dir)
    records = {"user": ratings["user_id"].astype(int), "movie": ratings["movie_id"].astype(int)}
    return movielens.random_split(records, test_fraction=0.2, seed=42)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.xdist_group("main_example")  # one run of the example for both
def test_main_example_default_beats_popularity_and_the_tutorial(main_example, split):
    out = main_example
    assert out.startswith("This example trains two_tower's default recommender on MovieLens 100K")
    assert f"Keras backend: {keras.backend.backend()}." in out
    assert "seed" not in out.lower()  # the keras-rs tutorial is named, never "the seed"
    rows = _table(out)
    assert list(rows) == [ROWS["popularity"], ROWS["tutorial"], ROWS["default"]]
    default, popularity, tutorial = (
        rows[ROWS[row]] for row in ("default", "popularity", "tutorial")
    )
    assert default[1] >= 0.60
    for k in (0, 1):  # top-10, top-100
        assert default[k] > popularity[k] and default[k] > tutorial[k]
    assert default[2] > 0 and tutorial[2] > 0
    train, test = split
    expected = (_popularity_accuracy(train, test, 10), _popularity_accuracy(train, test, 100))
    assert popularity[:2] == pytest.approx(expected, abs=5e-4)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.xdist_group("main_example")  # one run of the example for both
def test_main_example_prints_ten_unseen_titles(main_example, split, real_data_dir):
    listing = main_example.split("Top 10 movies for user 42, leaving out the ")[1]
    listing = listing.split("\n\n")[0].splitlines()
    train, _ = split
    seen = np.unique(train["movie"][train["user"] == 42])
    assert listing[0] == f"{len(seen)} movies they rated in the training part:"
    ranks, titles = zip(*(line.strip().split(". ", 1) for line in listing[1:]), strict=True)
    assert ranks == tuple(str(rank) for rank in range(1, 11))
    movies = movielens.load_movies(real_data_dir)
    seen_titles = set(movies["movie_title"][np.isin(movies["movie_id"].astype(int), seen)])
    assert all(titles) and not seen_titles & set(titles)


@pytest.mark.slow
@pytest.mark.real_data
def test_keras_rs_tutorial_example_runs(real_data_dir):
    completed = _run(TUTORIAL, "--epochs", "1", "--data-dir", str(real_data_dir))
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert f"backend={keras.backend.backend()}" in out
    titles = out.split("Recommended movies for user 42:\n")[1].split("fit:")[0].splitlines()
    assert len(titles) == 10 and all(t.strip() for t in titles)
    accuracy = float(out.split("test top-100 accuracy:")[1].split()[0])
    assert 0.0 < accuracy <= 1.0


@pytest.mark.real_data
def test_main_example_rejects_an_unknown_user(real_data_dir):
    completed = _run(EXAMPLE, "--user", "u42", "--data-dir", str(real_data_dir), timeout=300)
    assert completed.returncode == 1
    assert "--user must be the MovieLens id of a user with training ratings" in completed.stderr
    assert "got 'u42'" in completed.stderr


@pytest.mark.parametrize("script", [EXAMPLE, TUTORIAL], ids=["main", "tutorial"])
def test_examples_reject_bad_epochs(script):
    completed = _run(script, "--epochs", "0", timeout=120)
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
            # Cold start, and what it prints, is tests/test_cold_start.py's (trained once).
            "--skip-cold-start",
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
    assert "cold start" not in out


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
