# ruff: noqa: E501  (the tables of bad-input cases read best one case per line)
"""MovieLens 1M, 20M and 25M, and the compact form, on tiny files in each real layout.

The real zips are not on these machines (MovieLens may not be redistributed), so
each test writes a few rows in the GroupLens layout of its release: ml-1m's
`::`-separated ISO-8859-1 `.dat` files, ml-20m's and ml-25m's UTF-8 CSVs with
headers and quoted titles, zipped under `ml-<variant>/` like the official zips.
Expected values are joined here in plain Python from the rows written.
"""

import numpy as np
import pytest

from testing import serve_release, sha256_of, zip_folder
from two_tower.datasets import MovieLensTables, movielens

# ml-1m: users.dat is UserID::Gender::Age::Occupation::Zip-code.
USERS_1M = [("1", "F", "1", "10", "48067"), ("2", "M", "56", "16", "70072"),
            ("3", "M", "25", "4", "55117")]  # fmt: skip
MOVIES_1M = [
    ("1", "Toy Story (1995)", "Animation|Children's|Comedy"),
    ("2", "Café au lait (1993)", "Drama"),  # Latin-1 in the file
    ("3", "Star Wars: Episode IV - A New Hope (1977)", "Action|Sci-Fi"),
    ("5", 'Jumanji "x" (1995)', "Adventure"),
]
RATINGS_1M = [("1", "3", "5", "978300760"), ("2", "1", "3", "978302109"),
              ("3", "5", "4", "978301968"), ("1", "2", "1", "978300275")]  # fmt: skip
# ml-20m and ml-25m: movies.csv is movieId,title,genres; ratings.csv has halves.
MOVIES_CSV = [
    ("1", "Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy"),
    ("11", "American President, The (1995)", "Comedy|Drama|Romance"),
    ("26", "Amélie (2001)", "Comedy|Romance"),
    ("40", "Home Movie (2009)", "(no genres listed)"),
    ("7", "Planet Earth (2006)", "Documentary|IMAX"),
]
RATINGS_CSV = [("7", "11", "3.5", "1112486027"), ("3", "1", "0.5", "1112484676"),
               ("7", "26", "5.0", "1094785740"), ("12", "40", "4.0", "1094785734"),
               ("3", "7", "2.5", "1094786000")]  # fmt: skip
OCCUPATIONS_1M = {"10": "K-12 student", "16": "self-employed", "4": "college/grad student"}


def write_1m(folder, ratings=RATINGS_1M, movies=MOVIES_1M, users=USERS_1M):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("ratings.dat", ratings), ("movies.dat", movies), ("users.dat", users)):
        text = "".join("::".join(row) + "\n" for row in rows)
        (folder / name).write_bytes(text.encode("ISO-8859-1"))
    return folder


def csv_field(value):
    return f'"{value}"' if "," in value or '"' in value else value


def write_csv(folder, ratings=RATINGS_CSV, movies=MOVIES_CSV):
    folder.mkdir(parents=True, exist_ok=True)
    for name, header, rows in (
        ("ratings.csv", "userId,movieId,rating,timestamp", ratings),
        ("movies.csv", "movieId,title,genres", movies),
    ):
        lines = [header] + [",".join(csv_field(v) for v in row) for row in rows]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_release(variant, folder):
    return write_1m(folder) if variant == "1m" else write_csv(folder)


def zip_release(variant, folder, archive):
    return zip_folder(folder, archive, f"ml-{variant}")


def genre_names(text):
    return [name.replace("Children's", "Children") for name in text.split("|")]


# ------------------------------------------------------------------------ 1M
def test_1m_tables_join_by_index(tmp_path):
    tables = movielens.load_tables(write_1m(tmp_path / "ml-1m"), variant="1m", sha256=None)
    assert tables.variant == "1m" and tables.num_ratings == len(RATINGS_1M)
    assert tables.movies["movie_id"].tolist() == [m[0] for m in MOVIES_1M]
    assert tables.users["user_id"].tolist() == [u[0] for u in USERS_1M]
    user_rows = {u[0]: i for i, u in enumerate(USERS_1M)}
    movie_rows = {m[0]: i for i, m in enumerate(MOVIES_1M)}
    assert tables.ratings["user_index"].tolist() == [user_rows[r[0]] for r in RATINGS_1M]
    assert tables.ratings["movie_index"].tolist() == [movie_rows[r[1]] for r in RATINGS_1M]
    assert tables.ratings["user_index"].dtype == np.int32
    assert tables.ratings["user_rating"].tolist() == [float(r[2]) for r in RATINGS_1M]
    assert tables.ratings["user_rating"].dtype == np.float32
    assert tables.ratings["timestamp"].tolist() == [int(r[3]) for r in RATINGS_1M]
    assert tables.movies["movie_title"].tolist() == [m[1] for m in MOVIES_1M]  # Latin-1, ':', '"'
    for row, (_, _, genres) in enumerate(MOVIES_1M):
        got = [movielens.GENRES[g] for g in tables.movies["movie_genres"][row]]
        assert got == genre_names(genres)  # "Children's" is tfds's "Children"


def test_1m_users_have_the_tfds_features(tmp_path):
    users = movielens.load_tables(write_1m(tmp_path / "x"), variant="1m", sha256=None).users
    assert users["bucketized_user_age"].tolist() == [float(u[2]) for u in USERS_1M]
    assert users["bucketized_user_age"].dtype == np.float32
    assert users["user_gender"].tolist() == [u[1] == "M" for u in USERS_1M]
    assert users["user_occupation_text"].tolist() == [OCCUPATIONS_1M[u[3]] for u in USERS_1M]
    # tfds folds "K-12 student" and "college/grad student" into the label "student".
    labels = [movielens.OCCUPATIONS[label] for label in users["user_occupation_label"]]
    assert labels == ["student", "self-employed", "student"]
    assert users["user_zip_code"].tolist() == [u[4] for u in USERS_1M]


def test_1m_records_are_the_tfds_layout(tmp_path):
    ratings = movielens.load_ratings(write_1m(tmp_path / "ml-1m"), variant="1m", sha256=None)
    tfds_1m = set(movielens.RATING_FEATURES) - {"raw_user_age"}  # 1M has age buckets only
    assert set(ratings) == tfds_1m
    users = {u[0]: u for u in USERS_1M}
    movies = {m[0]: m for m in MOVIES_1M}
    for row, (user_id, movie_id, rating, timestamp) in enumerate(RATINGS_1M):
        assert ratings["user_id"][row] == user_id and ratings["movie_id"][row] == movie_id
        assert ratings["movie_title"][row] == movies[movie_id][1]
        assert ratings["user_zip_code"][row] == users[user_id][4]
        assert ratings["user_rating"][row] == float(rating)
        assert ratings["timestamp"][row] == int(timestamp)
    movies_only = movielens.load_movies(tmp_path / "ml-1m", variant="1m", sha256=None)
    assert sorted(movies_only) == sorted(movielens.MOVIE_FEATURES)


# ------------------------------------------------------------------- 20M, 25M
@pytest.mark.parametrize("variant", ["20m", "25m"])
def test_csv_releases_parse_quotes_utf8_and_halves(tmp_path, variant):
    folder = write_csv(tmp_path / f"ml-{variant}")
    tables = movielens.load_tables(folder, variant=variant, sha256=None)
    assert tables.movies["movie_title"].tolist() == [m[1] for m in MOVIES_CSV]
    for row, (_, _, genres) in enumerate(MOVIES_CSV):
        got = [movielens.GENRES[g] for g in tables.movies["movie_genres"][row]]
        assert got == genres.split("|")
    # No users file: the users are the raters, ordered by id (numerically).
    raters = sorted({int(r[0]) for r in RATINGS_CSV})
    assert tables.users["user_id"].tolist() == [str(u) for u in raters]
    assert list(tables.users) == ["user_id"]
    records = tables.to_records()
    assert set(records) == {"movie_genres", "movie_id", "movie_title", "timestamp",
                            "user_id", "user_rating"}  # fmt: skip
    assert records["user_id"].tolist() == [r[0] for r in RATINGS_CSV]
    assert records["movie_id"].tolist() == [r[1] for r in RATINGS_CSV]
    assert records["user_rating"].tolist() == [float(r[2]) for r in RATINGS_CSV]
    titles = {m[0]: m[1] for m in MOVIES_CSV}
    assert records["movie_title"].tolist() == [titles[r[1]] for r in RATINGS_CSV]
    movies = movielens.load_movies(folder, variant=variant, sha256=None)
    assert movies["movie_id"].tolist() == [m[0] for m in MOVIES_CSV]


@pytest.mark.parametrize("variant", ["20m", "25m"])
def test_the_joined_layout_is_refused_where_unaffordable(tmp_path, variant):
    folder = write_csv(tmp_path / f"ml-{variant}")
    with pytest.raises(ValueError, match=rf"tens of GB.*load_tables\(variant='{variant}'\)"):
        movielens.load_ratings(folder, variant=variant, sha256=None)
    subset = movielens.load_tables(folder, variant=variant, sha256=None).to_records([1, 3])
    assert subset["movie_id"].tolist() == [RATINGS_CSV[1][1], RATINGS_CSV[3][1]]


# --------------------------------------------------------- zips, cache, checks
@pytest.mark.parametrize("variant", ["1m", "20m", "25m"])
def test_zip_in_the_cache_is_extracted_once(tmp_path, empty_cache, variant):
    source = write_release(variant, tmp_path / "source")
    empty_cache.mkdir()
    zip_release(variant, source, empty_cache / f"ml-{variant}.zip")
    first = movielens.load_tables(variant=variant, sha256=None)
    assert (
        empty_cache / f"ml-{variant}" / ("ratings." + ("dat" if variant == "1m" else "csv"))
    ).is_file()
    assert sorted(p.name for p in empty_cache.iterdir()) == [f"ml-{variant}", f"ml-{variant}.zip"]
    (empty_cache / f"ml-{variant}.zip").unlink()  # the second load reads the folder
    second = movielens.load_tables(variant=variant, sha256=None)
    for key in first.ratings:
        np.testing.assert_array_equal(first.ratings[key], second.ratings[key])


@pytest.mark.parametrize("variant", ["1m", "20m", "25m"])
def test_an_archive_that_is_not_the_official_zip_is_refused(tmp_path, empty_cache, variant):
    empty_cache.mkdir()
    archive = zip_release(variant, write_release(variant, tmp_path / "s"),
                          empty_cache / f"ml-{variant}.zip")  # fmt: skip
    with pytest.raises(
        ValueError,
        match=rf"Checksum mismatch for .*ml-{variant}\.zip.*"
        rf"{movielens.RELEASES[variant].sha256}.*official ml-{variant}\.zip",
    ):
        movielens.load_tables(variant=variant)
    assert sorted(p.name for p in empty_cache.iterdir()) == [archive.name]  # nothing extracted


def test_download_is_verified_then_extracted(tmp_path, empty_cache, monkeypatch):
    archive = zip_release("20m", write_csv(tmp_path / "s"), tmp_path / "served.zip")
    serve_release(monkeypatch, archive.as_uri(), "20m", sha256_of(archive))
    tables = movielens.load_tables(variant="20m", sha256=None)  # our files: no official counts
    assert tables.num_ratings == len(RATINGS_CSV)
    assert sorted(p.name for p in empty_cache.iterdir()) == ["ml-20m", "ml-20m.zip"]


def test_a_corrupt_download_leaves_nothing_behind(tmp_path, empty_cache, monkeypatch):
    archive = zip_release("1m", write_1m(tmp_path / "s"), tmp_path / "served.zip")
    expected = sha256_of(archive)
    archive.write_bytes(archive.read_bytes()[:-30])
    serve_release(monkeypatch, archive.as_uri(), "1m", expected)
    with pytest.raises(ValueError, match=r"download from file://.*served\.zip.*nothing was kept"):
        movielens.load_tables(variant="1m")
    assert not empty_cache.exists() or list(empty_cache.iterdir()) == []


@pytest.mark.parametrize(
    ("variant", "match"),
    [("1m", r"ratings\.dat: the official MovieLens 1M has exactly 1000209 ratings, the file "
            r"holds 4.*sha256=None"),
     ("25m", r"ratings\.csv: the official MovieLens 25M has exactly 25000095 ratings, the "
             r"file holds 5")],
)  # fmt: skip
def test_official_copies_are_counted(tmp_path, variant, match):
    folder = write_release(variant, tmp_path / f"ml-{variant}")
    with pytest.raises(ValueError, match=match):
        movielens.load_tables(folder, variant=variant)


# ------------------------------------------------------------------ bad input
BAD_1M = [
    ("ratings.dat", lambda t: t.rsplit("::", 1)[0], r"ratings\.dat: .*Expected 4 columns"),
    ("ratings.dat", lambda t: t.replace("::3::5::", "::3::x::", 1), r"ratings\.dat: .*'x'"),
    ("ratings.dat", lambda t: t.replace("::3::5::", "::99::5::", 1), r"ratings\.dat, rating 1: movie 99"),
    ("ratings.dat", lambda t: t.replace("1::3::5::", "8::3::5::", 1), r"ratings\.dat, rating 1: user 8"),
    ("ratings.dat", lambda t: t.replace("::3::5::", "::3::6::", 1), r"ratings\.dat, rating 1: ratings run from 1"),
    ("movies.dat", lambda t: t.replace("Drama", "Dramedy"), r"movies\.dat: unknown genres \['Dramedy'\]"),
    ("movies.dat", lambda t: t.replace("5::Jumanji", "1::Jumanji"), r"movies\.dat: movie id 1 appears twice"),
    ("users.dat", lambda t: t.replace("::F::", "::X::"), r"users\.dat, line 1: gender must be 'M' or 'F'"),
    ("users.dat", lambda t: t.replace("::10::", "::21::"), r"users\.dat, line 1: occupation must be"),
    ("users.dat", lambda t: t.replace("::56::", "::57::"), r"users\.dat, line 2: age must be one of"),
    ("users.dat", lambda t: "", r"users\.dat: .*[Ee]mpty"),
]  # fmt: skip


BAD_CSV = [
    ("ratings.csv", lambda t: t.replace("userId,movieId,rating", "userId,rating"),
     r"ratings\.csv has the header 'userId,rating,timestamp'; expected .*'userId,movieId,rating,timestamp'"),
    ("ratings.csv", lambda t: t.replace("7,11,3.5,", "7,eleven,3.5,"), r"ratings\.csv: .*'eleven'"),
    ("ratings.csv", lambda t: t.replace("7,11,3.5,", "7,11,,"), r"ratings\.csv: .*invalid value ''"),
    ("ratings.csv", lambda t: t[: t.rindex(",")], r"ratings\.csv: .*Expected 4 columns"),
    ("ratings.csv", lambda t: t.replace("3.5", "3.25"), r"ratings\.csv, rating 1: .*steps of 0\.5"),
    ("movies.csv", lambda t: t.replace("IMAX", "Imax"), r"movies\.csv: unknown genres \['Imax'\]"),
    ("movies.csv", lambda t: "", r"movies\.csv has the header ''"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("variant", "name", "edit", "match"),
    [("1m", *case) for case in BAD_1M] + [("20m", *case) for case in BAD_CSV],
)
def test_corrupt_files_are_named(tmp_path, variant, name, edit, match):
    folder = write_release(variant, tmp_path / f"ml-{variant}")
    path = folder / name
    encoding = "ISO-8859-1" if variant == "1m" else "utf-8"  # each release's own
    path.write_bytes(edit(path.read_bytes().decode(encoding)).encode(encoding))
    with pytest.raises(ValueError, match=match):
        movielens.load_tables(folder, variant=variant, sha256=None)


def test_a_header_only_file_holds_no_rows(tmp_path):
    folder = write_csv(tmp_path / "ml-25m", ratings=[])
    with pytest.raises(ValueError, match=r"ratings\.csv holds no rows"):
        movielens.load_tables(folder, variant="25m", sha256=None)


def test_unknown_variant_and_tfds_source_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`variant` must be one of .*'100k'.*Received: '10m'"):
        movielens.load_tables(tmp_path, variant="10m")
    with pytest.raises(ValueError, match=r"source='tfds' reads MovieLens 100K only"):
        movielens.load_ratings(tmp_path, variant="1m", source="tfds")


def test_a_folder_of_the_wrong_release_says_what_it_looked_for(tmp_path):
    write_csv(tmp_path / "ml-20m")
    with pytest.raises(FileNotFoundError, match=r"MovieLens 1M not found.*ratings\.dat"):
        movielens.load_tables(tmp_path, variant="1m")


# ------------------------------------------------------------ MovieLensTables
def small_tables(**changes):
    fields = {
        "variant": "20m",
        "ratings": {"user_index": np.array([0, 1, 1]), "movie_index": np.array([2, 0, 1]),
                    "user_rating": np.array([4.5, 1.0, 3.0]), "timestamp": np.array([3, 1, 2])},
        "movies": {"movie_id": np.array(["10", "20", "30"]),
                   "movie_title": np.array(["a", "b", "c"])},
        "users": {"user_id": np.array(["7", "9"])},
    }  # fmt: skip
    fields.update(changes)
    return MovieLensTables(**fields)


def test_tables_join_rows_and_report_their_size():
    tables = small_tables()
    records = tables.to_records(np.array([False, True, True]))
    assert records["movie_title"].tolist() == ["a", "b"]
    assert records["user_id"].tolist() == ["9", "9"]
    assert tables.ratings["user_rating"].dtype == np.float32
    # Per rating: rating 4 + time 8 + movie_id 8 + title 4 + user_id 4 bytes.
    assert tables.records_nbytes() == 3 * (4 + 8 + 8 + 4 + 4)
    assert (tables.num_ratings, tables.num_users, tables.num_movies) == (3, 2, 3)


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"variant": "1b"}, r"`variant` must be one of"),
     ({"users": {"user_id": np.array(["7"])}}, r"ratings\['user_index'\] must index rows of "
                                               r"`users` \(0 to 0\); rating 1 holds 1"),
     ({"movies": {"title": np.array(["a"])}}, r"`movies` lacks the columns \['movie_id'\]"),
     ({"users": {"user_id": np.array(["7", "9"]), "age": np.array([1])}}, r"one length"),
     ({"ratings": {"user_index": np.array([0.0]), "movie_index": np.array([0]),
                   "user_rating": np.array([1.0]), "timestamp": np.array([1])}},
      r"ratings\['user_index'\] must hold integers")],
)  # fmt: skip
def test_inconsistent_tables_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        small_tables(**changes)


def test_rows_that_do_not_index_the_ratings_are_refused():
    with pytest.raises(ValueError, match=r"`rows` must index the 3 ratings"):
        small_tables().to_records([5])


@pytest.mark.real_data
def test_real_100k_tables_against_numpy(real_data_dir):
    tables = movielens.load_tables(real_data_dir)
    raw = np.loadtxt(real_data_dir / "u.data", dtype=np.int64)  # user, item, rating, time
    assert (
        tables.users["user_id"][tables.ratings["user_index"]].astype(int).tolist()
        == raw[:, 0].tolist()
    )
    assert (
        tables.movies["movie_id"][tables.ratings["movie_index"]].astype(int).tolist()
        == raw[:, 1].tolist()
    )
    np.testing.assert_array_equal(tables.ratings["user_rating"], raw[:, 2].astype(np.float32))
    np.testing.assert_array_equal(tables.ratings["timestamp"], raw[:, 3])
    assert (tables.num_users, tables.num_movies) == (943, 1682)


def test_sparse_rater_ids_are_ordered_by_id(tmp_path):
    # Ids far above the number of ratings take np.unique's path instead of a table.
    ratings = [
        ("2000000000", "1", "4.0", "5"),
        ("3", "11", "1.0", "6"),
        ("2000000000", "26", "2.0", "7"),
    ]
    tables = movielens.load_tables(
        write_csv(tmp_path / "ml-20m", ratings=ratings), variant="20m", sha256=None
    )
    assert tables.users["user_id"].tolist() == ["3", "2000000000"]
    assert tables.ratings["user_index"].tolist() == [1, 0, 1]
