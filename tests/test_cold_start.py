"""Cold start: users unseen in training, described by features only, beat popularity.

MovieLens 100K: 10% of the users (seed 42) are held out entirely; the model is
trained on the other 90% and ranks, for each held-out user, from their age
bucket, gender and occupation alone. Popularity ranks by training counts,
computed here with NumPy.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from two_tower.datasets import movielens

EXAMPLE = Path(__file__).parents[1] / "examples" / "movielens_features.py"


@pytest.mark.slow
@pytest.mark.real_data
def test_held_out_users_beat_popularity_at_top_100(real_data_dir, capsys):
    spec = importlib.util.spec_from_file_location("movielens_features", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ratings = movielens.load_ratings(real_data_dir)
    movies = movielens.load_movies(real_data_dir)
    results = example.cold_start(ratings, movies, show=True)
    # What the example prints: five titles for the first held-out user.
    titles = capsys.readouterr().out.split("never seen in training:\n")[1].splitlines()
    assert len(titles) == 5 and all(title.strip() for title in titles)

    users = np.unique(ratings["user_id"])
    held_out = np.random.default_rng(42).permutation(users)[: round(len(users) * 0.1)]
    is_test = np.isin(ratings["user_id"], held_out)
    counts = np.bincount(ratings["movie_id"][~is_test].astype(int), minlength=1683)
    top_100 = np.argsort(-counts, kind="stable")[:100]
    hits = np.isin(ratings["movie_id"][is_test].astype(int), top_100).mean()
    # Popularity's own figure, independently: ties at the cut-off can only help it.
    assert results["popularity"]["accuracy_at_100"] >= hits - 1e-9
    assert (
        results["features, cold start"]["accuracy_at_100"]
        > results["popularity"]["accuracy_at_100"]
    )
