"""Record-for-record parity between the NumPy source and the tfds source.

tfds is installed only in the tensorflow session; it builds offline here from the
local copy (the loader primes tfds's download cache from it).
"""

import importlib.util

import numpy as np
import pytest

from two_tower.datasets import movielens

pytestmark = [
    pytest.mark.tfds,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorflow_datasets") is None,
        reason="tensorflow-datasets is installed only in the tensorflow session",
    ),
]


def sort_records(records):
    order = np.lexsort((records["movie_id"].astype(int), records["user_id"].astype(int)))
    return {key: values[order] for key, values in records.items()}


def assert_same_records(ours, theirs, features):
    assert sorted(ours) == sorted(theirs) == sorted(features)
    for key in features:
        assert len(ours[key]) == len(theirs[key]), key
        if key == "movie_genres":
            for a, b in zip(ours[key], theirs[key], strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            assert ours[key].dtype == theirs[key].dtype, key
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.real_data
def test_tfds_and_numpy_sources_give_the_same_records(real_data_dir, tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    theirs = movielens.load_ratings(real_data_dir, source="tfds", tfds_data_dir=tfds_dir)
    # The seed's first printed record: tfds order differs from file order.
    assert (theirs["user_id"][0], theirs["movie_id"][0]) == ("138", "357")
    ours = movielens.load_ratings(real_data_dir)
    assert_same_records(sort_records(ours), sort_records(theirs), movielens.RATING_FEATURES)

    movies_theirs = movielens.load_movies(real_data_dir, source="tfds", tfds_data_dir=tfds_dir)
    movies_ours = movielens.load_movies(real_data_dir)
    order = np.argsort(movies_theirs["movie_id"].astype(int))
    movies_theirs = {key: values[order] for key, values in movies_theirs.items()}
    assert_same_records(movies_ours, movies_theirs, movielens.MOVIE_FEATURES)
