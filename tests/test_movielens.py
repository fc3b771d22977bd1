"""The MovieLens loader, on tiny synthetic GroupLens fixtures and on the real data."""

import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from testing import (
    MOVIES,
    RATINGS,
    USERS,
    serve_release,
    sha256_of,
    write_movielens,
    zip_folder,
)
from two_tower.datasets import movielens


@pytest.fixture
def fixture_dir(tmp_path):
    return write_movielens(tmp_path / "ml-100k")


def test_ratings_match_the_tfds_feature_layout(fixture_dir):
    ratings = movielens.load_ratings(fixture_dir)
    assert sorted(ratings) == sorted(movielens.RATING_FEATURES)
    assert {len(v) for v in ratings.values()} == {len(RATINGS)}
    # Row 0: user 1 (24, M, technician, 85711) rated movie 4 (Star Wars) 5 stars.
    row = {key: values[0] for key, values in ratings.items()}
    assert row["user_id"] == "1" and row["movie_id"] == "4"
    assert row["movie_title"] == "Star Wars (1977)"
    assert row["user_rating"] == np.float32(5.0) and ratings["user_rating"].dtype == np.float32
    assert row["timestamp"] == 881250949 and ratings["timestamp"].dtype == np.int64
    assert row["raw_user_age"] == 24.0 and row["bucketized_user_age"] == 18.0
    assert row["user_gender"] is np.True_ or row["user_gender"] == True  # noqa: E712
    assert row["user_occupation_text"] == "technician"
    assert movielens.OCCUPATIONS[row["user_occupation_label"]] == "technician/engineer"
    assert row["user_zip_code"] == "85711"
    # u.item flag columns 1, 2, 14, 15, 17 are Action, Adventure, Romance, Sci-Fi, War.
    assert [movielens.GENRES[g] for g in row["movie_genres"]] == [
        "Action", "Adventure", "Romance", "Sci-Fi", "War",
    ]  # fmt: skip
    # User 3 is 17: the "Under 18" bucket is 1. User 2 is a woman, "other" occupation.
    assert ratings["bucketized_user_age"][2] == 1.0
    assert not ratings["user_gender"][1]
    assert movielens.OCCUPATIONS[ratings["user_occupation_label"][1]] == "other/not specified"


def test_movies_and_latin1_titles(fixture_dir):
    movies = movielens.load_movies(fixture_dir)
    assert movies["movie_id"].tolist() == [m[0] for m in MOVIES]
    assert movies["movie_title"][1] == "Café (1996)"
    assert [movielens.GENRES[g] for g in movies["movie_genres"][0]] == [
        "Animation", "Children", "Comedy",
    ]  # fmt: skip
    assert [movielens.GENRES[g] for g in movies["movie_genres"][2]] == ["Unknown"]


def test_parent_folder_and_zip_sources_agree(fixture_dir, tmp_path, empty_cache):
    from_folder = movielens.load_ratings(fixture_dir)
    from_parent = movielens.load_ratings(fixture_dir.parent)
    (tmp_path / "zipped").mkdir()
    archive = zip_folder(fixture_dir, tmp_path / "zipped" / "custom.zip")
    from_zip = movielens.load_ratings(archive, sha256=sha256_of(archive))
    assert (tmp_path / "zipped" / "ml-100k" / "u.data").is_file()
    for other in (from_parent, from_zip):
        for key in movielens.RATING_FEATURES:
            assert len(other[key]) == len(from_folder[key])
            for a, b in zip(other[key], from_folder[key], strict=True):
                np.testing.assert_array_equal(a, b)


def test_zip_checksum_mismatch_names_the_file(fixture_dir, tmp_path):
    (tmp_path / "zipped").mkdir()
    archive = zip_folder(fixture_dir, tmp_path / "zipped" / "custom.zip")
    with pytest.raises(ValueError, match=r"Checksum mismatch for .*custom\.zip"):
        movielens.load_ratings(archive)  # checked against the official sha256
    assert sorted(p.name for p in archive.parent.iterdir()) == ["custom.zip"]


def test_incomplete_folder_is_never_overwritten(fixture_dir, tmp_path, empty_cache):
    archive = zip_folder(fixture_dir, empty_cache.parent / "ml-100k.zip")
    (empty_cache / "ml-100k").mkdir(parents=True)
    (empty_cache / "ml-100k" / "notes.txt").write_text("mine")
    os.replace(archive, empty_cache / "ml-100k.zip")
    with pytest.raises(FileExistsError, match=r"ml-100k exists but lacks"):
        movielens.load_ratings(sha256=None)
    assert (empty_cache / "ml-100k" / "notes.txt").read_text() == "mine"


def test_corrupt_zip_names_the_file(tmp_path):
    archive = tmp_path / "ml-100k.zip"
    archive.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ValueError, match=r"ml-100k\.zip is not a valid zip"):
        movielens.load_ratings(archive, sha256=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k.zip"]


def test_truncated_line_names_the_file_and_line(fixture_dir):
    data = fixture_dir / "u.data"
    data.write_text(data.read_text()[:-12])  # cut the last line mid-way
    with pytest.raises(ValueError, match=r"u\.data, line 5: expected 4 fields"):
        movielens.load_ratings(fixture_dir)


def test_missing_rows_are_caught_by_u_info(fixture_dir):
    data = fixture_dir / "u.data"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match=r"u\.data: u\.info declares 5 ratings, the file holds 3"):
        movielens.load_ratings(fixture_dir)


def test_without_u_info_the_official_counts_are_checked(fixture_dir):
    (fixture_dir / "u.info").unlink()
    with pytest.raises(ValueError) as error:
        movielens.load_ratings(fixture_dir)
    message = str(error.value)
    assert message.startswith(f"Corrupt or truncated MovieLens file {fixture_dir / 'u.data'}: ")
    assert f"has exactly 100000 ratings, the file holds {len(RATINGS)}" in message
    assert f"{fixture_dir / 'u.info'} is missing" in message
    with pytest.raises(
        ValueError, match=rf"u\.item: .*exactly 1682 items, the file holds {len(MOVIES)}"
    ):
        movielens.load_movies(fixture_dir)


def test_counts_u_info_leaves_out_are_the_official_ones(fixture_dir):
    (fixture_dir / "u.info").write_text(f"{len(USERS)} users\n{len(MOVIES)} items\n")
    with pytest.raises(ValueError, match=r"u\.data: .*exactly 100000 ratings.*declares no ratings"):
        movielens.load_ratings(fixture_dir)


def test_a_truncated_copy_never_primes_tfds(fixture_dir, tmp_path):
    (fixture_dir / "u.info").unlink()
    with pytest.raises(ValueError, match=r"u\.data: .*exactly 100000 ratings"):
        movielens.prime_tfds_cache(tmp_path / "tfds", fixture_dir)
    assert not (tmp_path / "tfds").exists()


class FakeDataset:
    """What the tfds source uses of a `tf.data.Dataset`: `map`, then `padded_batch`."""

    def __init__(self, records):
        self.records = records

    def map(self, function):
        return FakeDataset([function(record) for record in self.records])

    def padded_batch(self, size):
        """Batches as tfds.as_numpy gives them: bytes as objects, lists padded with 0."""
        batches = []
        for start in range(0, len(self.records), size):
            rows = self.records[start : start + size]
            batch = {}
            for key in rows[0]:
                values = [row[key] for row in rows]
                if values[0].dtype.kind == "S":
                    batch[key] = np.asarray([bytes(v) for v in values], dtype=object)
                else:
                    width = max(np.size(v) for v in values)
                    padded = np.zeros((len(values), width), values[0].dtype)
                    for i, value in enumerate(values):
                        padded[i, : np.size(value)] = value
                    batch[key] = padded if values[0].ndim else padded[:, 0]
            batches.append(batch)
        return batches


def test_tfds_records_are_counted(empty_cache, monkeypatch):
    # A stand-in for tensorflow-datasets whose cache was built from a cut copy.
    records = [
        {"movie_id": b"1", "movie_title": b"Toy Story (1995)", "movie_genres": [2, 3, 4]},
        {"movie_id": b"2", "movie_title": b"GoldenEye (1995)", "movie_genres": [0]},
    ]
    dataset = FakeDataset([{k: np.asarray(v) for k, v in r.items()} for r in records])
    fake = types.SimpleNamespace(load=lambda *args, **kwargs: dataset, as_numpy=lambda d: d)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(ValueError) as error:
        movielens.load_movies(source="tfds", download=False)
    message = str(error.value)
    assert f"tfds movielens/100k-movies in {empty_cache / 'tfds'} holds 2 records" in message
    assert "MovieLens 100K has exactly 1682 items" in message


def test_rating_of_unknown_movie_is_corrupt(tmp_path):
    folder = write_movielens(tmp_path / "ml-100k", RATINGS + [("1", "99", "4", "1")])
    with pytest.raises(ValueError, match=r"u\.data, rating 6: .*'99'"):
        movielens.load_ratings(folder)


def test_download_is_verified_then_extracted(fixture_dir, tmp_path, empty_cache, monkeypatch):
    archive = zip_folder(fixture_dir, tmp_path / "served.zip")
    serve_release(monkeypatch, archive.as_uri(), sha256=sha256_of(archive))
    ratings = movielens.load_ratings(sha256=sha256_of(archive))
    assert ratings["user_id"].tolist() == [r[0] for r in RATINGS]
    assert (empty_cache / "ml-100k.zip").is_file()
    assert sorted(p.name for p in empty_cache.iterdir()) == ["ml-100k", "ml-100k.zip"]


def test_corrupt_download_is_never_left_behind(fixture_dir, tmp_path, empty_cache, monkeypatch):
    archive = zip_folder(fixture_dir, tmp_path / "served.zip")
    expected = sha256_of(archive)
    archive.write_bytes(archive.read_bytes()[:-40])  # a truncated transfer
    serve_release(monkeypatch, archive.as_uri())
    with pytest.raises(ValueError, match="Checksum mismatch"):
        movielens.load_ratings(sha256=expected)
    assert list(empty_cache.iterdir()) == []


def test_no_data_and_no_network_says_where_it_looked(empty_cache, monkeypatch):
    serve_release(monkeypatch, "http://127.0.0.1:9/ml-100k.zip")
    with pytest.raises(FileNotFoundError) as error:
        movielens.load_ratings()
    message = str(error.value)
    assert str(empty_cache / "ml-100k") in message and "TWO_TOWER_DATA_DIR" in message
    assert "data_dir=" in message
    assert list(empty_cache.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="download=False"):
        movielens.load_ratings(download=False)


def test_missing_data_dir_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*u\.data"):
        movielens.load_ratings(tmp_path / "nowhere")


def test_bad_source_raises(fixture_dir):
    with pytest.raises(ValueError, match="`source` must be one of"):
        movielens.load_ratings(fixture_dir, source="kaggle")


def test_random_split_is_seeded_and_disjoint():
    records = {"row": np.arange(100), "value": np.arange(100) * 2}
    train, test = movielens.random_split(records, test_fraction=0.2, seed=42)
    again, _ = movielens.random_split(records, test_fraction=0.2, seed=42)
    expected = np.random.default_rng(42).permutation(100)
    np.testing.assert_array_equal(train["row"], expected[:80])
    np.testing.assert_array_equal(test["row"], expected[80:])
    np.testing.assert_array_equal(train["value"], train["row"] * 2)
    np.testing.assert_array_equal(again["row"], train["row"])


def test_temporal_split_puts_the_latest_in_test():
    records = {"timestamp": np.array([50, 10, 40, 20, 30, 30]), "row": np.arange(6)}
    train, test = movielens.temporal_split(records, test_fraction=0.5)
    assert train["timestamp"].max() <= test["timestamp"].min()
    assert train["row"].tolist() == [1, 3, 4] and test["row"].tolist() == [5, 2, 0]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_split_fraction_raises(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        movielens.random_split({"a": np.arange(4)}, test_fraction=fraction)


def test_uneven_records_raise():
    with pytest.raises(ValueError, match="same length"):
        movielens.random_split({"a": np.arange(4), "b": np.arange(3)})


@pytest.mark.real_data
def test_real_movielens_100k(real_data_dir):
    ratings = movielens.load_ratings(real_data_dir)
    movies = movielens.load_movies(real_data_dir)
    assert len(ratings["user_id"]) == 100_000
    assert len(np.unique(ratings["user_id"])) == 943
    assert len(np.unique(ratings["movie_id"])) == 1682
    assert len(movies["movie_id"]) == 1682
    first = (
        ratings["user_id"][0],
        ratings["movie_id"][0],
        ratings["user_rating"][0],
        ratings["timestamp"][0],
    )
    assert first == ("196", "242", 3.0, 881250949)
    # The record the seed tutorial prints from tfds.
    row = np.flatnonzero((ratings["user_id"] == "138") & (ratings["movie_id"] == "357"))[0]
    assert ratings["movie_title"][row] == "One Flew Over the Cuckoo's Nest (1975)"
    assert ratings["user_occupation_label"][row] == 4
    assert ratings["raw_user_age"][row] == 46.0 and ratings["bucketized_user_age"][row] == 45.0
    assert ratings["movie_genres"][row].tolist() == [7]


def copy_without_u_info(real_data_dir, folder):
    folder.mkdir()
    for name in ("u.data", "u.item", "u.user"):
        shutil.copyfile(real_data_dir / name, folder / name)
    return folder


@pytest.mark.real_data
def test_real_copy_without_u_info_loads_in_full(real_data_dir, tmp_path):
    folder = copy_without_u_info(real_data_dir, tmp_path / "ml-100k")
    ratings = movielens.load_ratings(folder)
    with open(real_data_dir / "u.data", "rb") as handle:
        assert len(ratings["user_id"]) == sum(1 for _ in handle) == 100_000
    assert len(movielens.load_movies(folder)["movie_id"]) == 1682


@pytest.mark.real_data
def test_real_u_data_cut_at_a_line_end_is_caught_without_u_info(real_data_dir, tmp_path):
    folder = copy_without_u_info(real_data_dir, tmp_path / "ml-100k")
    data = folder / "u.data"
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:50_000]))
    with pytest.raises(ValueError) as error:
        movielens.load_ratings(folder)
    message = str(error.value)
    assert message.startswith(f"Corrupt or truncated MovieLens file {data}: ")
    assert "MovieLens 100K has exactly 100000 ratings, the file holds 50000" in message
    assert f"{folder / 'u.info'} is missing" in message


@pytest.mark.real_data
def test_real_data_through_the_cache_root(real_data_dir, monkeypatch):
    monkeypatch.setenv(movielens.ENV_VAR, str(real_data_dir.parent))
    assert movielens.locate() == real_data_dir


def test_env_var_sets_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(movielens.ENV_VAR, str(tmp_path))
    assert movielens.cache_root() == tmp_path
    monkeypatch.delenv(movielens.ENV_VAR)
    assert movielens.cache_root() == Path(os.path.expanduser("~/.keras/datasets"))


def test_a_grouplens_file_as_data_dir_uses_its_folder(fixture_dir):
    ratings = movielens.load_ratings(fixture_dir / "u.data")
    assert len(ratings["user_id"]) == len(RATINGS)


@pytest.mark.parametrize(
    ("file", "edit", "match"),
    [
        ("u.item", lambda t: t + t.splitlines()[0] + "\n", r"movie id 1 appears twice"),
        ("u.user", lambda t: t.replace("|M|", "|X|", 1), r"gender of user 1 must be"),
        ("u.data", lambda t: t.replace("\t5\t", "\t9\t", 1), r"ratings run from 1 to 5"),
        ("u.data", lambda t: t.replace("\t5\t", "\tfive\t", 1), r"rating must be an integer"),
    ],
)
def test_corrupt_values_name_the_file(fixture_dir, file, edit, match):
    path = fixture_dir / file
    path.write_bytes(edit(path.read_bytes().decode("ISO-8859-1")).encode("ISO-8859-1"))
    if file == "u.item":  # keep u.info consistent so the duplicate itself is caught
        info = fixture_dir / "u.info"
        info.write_text(
            info.read_text().replace(f"{len(MOVIES)} items", f"{len(MOVIES) + 1} items")
        )
    with pytest.raises(ValueError, match=match) as error:
        movielens.load_ratings(fixture_dir)
    assert file in str(error.value)


def test_duplicate_user_ids_are_rejected(fixture_dir):
    path = fixture_dir / "u.user"
    path.write_text(path.read_text() + "|".join(USERS[0]) + "\n")
    info = fixture_dir / "u.info"
    info.write_text(info.read_text().replace(f"{len(USERS)} users", f"{len(USERS) + 1} users"))
    with pytest.raises(ValueError, match=r"u\.user: user id 1 appears twice"):
        movielens.load_ratings(fixture_dir)


def test_download_checksum_error_names_the_url(fixture_dir, tmp_path, empty_cache, monkeypatch):
    archive = zip_folder(fixture_dir, tmp_path / "served.zip")
    serve_release(monkeypatch, archive.as_uri())
    with pytest.raises(ValueError, match=r"download from file://.*served\.zip.*nothing was kept"):
        movielens.load_ratings(sha256=None)  # downloads are checked even so
    assert list(empty_cache.iterdir()) == []
