"""Reads MovieLens 1M, 20M and 25M into `MovieLensTables`, with pyarrow's CSV reader.

Every file is read whole by pyarrow (C++), never line by line in Python, and
checked as the 100K files are: every row has all its fields with values of the
right type, every rating points at a known user and movie, values are in their
ranges, and (for the official release) the row counts are the official ones.
A failed check raises a ValueError naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from two_tower.datasets.movielens._grouplens import check_last_line
from two_tower.datasets.movielens._releases import FILES
from two_tower.datasets.movielens.tables import MovieLensTables

# The official row counts (the GroupLens READMEs): ratings, movies (rows of the
# movies file) and users (rows of users.dat, or distinct raters without one).
OFFICIAL_COUNTS = {
    "1m": {"ratings": 1_000_209, "movies": 3_883, "users": 6_040},
    "20m": {"ratings": 20_000_263, "movies": 27_278, "users": 138_493},
    "25m": {"ratings": 25_000_095, "movies": 62_423, "users": 162_541},
}
# ml-1m's users.dat occupation codes, as its README lists them (tfds's texts).
OCCUPATIONS_1M = (
    "other/not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care",
    "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed",
    "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
_DAT_ENCODING = "ISO-8859-1"
_CSV_COLUMNS = {
    "ratings.csv": ("userId", "movieId", "rating", "timestamp"),
    "movies.csv": ("movieId", "title", "genres"),
}
_DAT_COLUMNS = {
    "ratings.dat": ("userId", "movieId", "rating", "timestamp"),
    "movies.dat": ("movieId", "title", "genres"),
    "users.dat": ("userId", "gender", "age", "occupation", "zip"),
}


def _types() -> dict[str, Any]:
    import pyarrow as pa

    return {
        "userId": pa.int32(),
        "movieId": pa.int32(),
        "rating": pa.float32(),
        "timestamp": pa.int64(),
        "title": pa.string(),
        "genres": pa.string(),
        "gender": pa.string(),
        "age": pa.int64(),
        "occupation": pa.int64(),
        "zip": pa.string(),
    }


def read_file(path: Path) -> dict[str, np.ndarray]:
    """The columns of one GroupLens file, as NumPy arrays, checked for shape and type.

    `.dat` files (ml-1m) are `::`-separated ISO-8859-1 without a header and
    without quoting; `.csv` files (ml-20m, ml-25m) are UTF-8 with a header and
    quoted titles.
    """
    import pyarrow as pa  # a dependency of two-tower, imported only when parsing
    import pyarrow.csv as csv

    dat = path.suffix == ".dat"
    names = _DAT_COLUMNS[path.name] if dat else _CSV_COLUMNS[path.name]
    if not path.is_file():
        raise FileNotFoundError(f"Missing MovieLens file: {path}")
    source: Any = str(path)  # pyarrow reads a path in blocks, in parallel
    if dat:
        # pyarrow splits on one character; `::` never occurs inside a field. ml-1m's
        # files are small (24 MB at most), so they are rewritten in memory.
        text = path.read_bytes().decode(_DAT_ENCODING).replace("::", "\t")
        source = pa.BufferReader(text.encode("utf-8"))
        read = csv.ReadOptions(column_names=list(names))
        parse = csv.ParseOptions(delimiter="\t", quote_char=False)
    else:
        with open(path, "rb") as file:
            header = file.readline().decode("utf-8", "replace").strip()
        if header.split(",") != list(names):
            raise ValueError(
                f"MovieLens file {path} has the header {header!r}; expected the columns "
                f"{','.join(names)!r}. It is not a MovieLens {path.parent.name} file, or "
                "it is corrupt."
            )
        read = csv.ReadOptions()
        parse = csv.ParseOptions()
    types = _types()
    convert = csv.ConvertOptions(
        column_types={name: types[name] for name in names},
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        table = csv.read_csv(
            source, read_options=read, parse_options=parse, convert_options=convert
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise ValueError(f"Corrupt or truncated MovieLens file {path}: {error}") from None
    # A last line cut after its last separator parses, as shorter numbers.
    check_last_line(path, "MovieLens")
    columns = {}
    for name in names:
        column = table.column(name)
        if pa.types.is_string(column.type):
            columns[name] = np.asarray(column.to_pylist(), dtype=str)
        else:
            columns[name] = column.to_numpy()
    if not len(columns[names[0]]):
        raise ValueError(f"MovieLens file {path} holds no rows.")
    return columns


def _genre_labels(genres: np.ndarray, path: Path, genre_names: tuple[str, ...]) -> np.ndarray:
    """`Action|Drama` strings -> an object array of int64 arrays of GENRES labels."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pc.split_pattern(pa.array(genres), "|")
    flat = lists.flatten()
    # ml-1m says "Children's" where the others (and tfds's labels) say "Children".
    flat = pc.replace_substring_regex(flat, "^Children's$", "Children")
    codes = pc.index_in(flat, value_set=pa.array(list(genre_names)))
    if codes.null_count:
        unknown = flat.filter(pc.is_null(codes)).to_pylist()
        raise ValueError(
            f"Corrupt MovieLens file {path}: unknown genres {sorted(set(unknown))[:5]}; "
            f"expected names among {list(genre_names)}."
        )
    labels = codes.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = lists.offsets.to_numpy()
    out = np.empty(len(genres), dtype=object)
    out[:] = np.split(labels, offsets[1:-1])
    return out


def _positions(ids: np.ndarray, known: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Row of each of `ids` in `known` (unique ids); raises naming the first unknown."""
    order = np.argsort(known, kind="stable")
    ordered = known[order]
    found = np.minimum(np.searchsorted(ordered, ids), len(known) - 1)
    missing = ordered[found] != ids
    if missing.any():
        row = int(np.argmax(missing))
        raise ValueError(
            f"Corrupt MovieLens file {path}, rating {row + 1}: {what} {ids[row]} is not in "
            f"the {what}s file."
        )
    return order[found].astype(np.int32)


def _id_strings(ids: np.ndarray) -> np.ndarray:
    """Integer ids as the shortest fixed-width strings (`<U6`, not NumPy's `<U21`)."""
    text = ids.astype(str)
    return text.astype(f"<U{max(int(np.char.str_len(text).max()), 1)}")


def _raters(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids in increasing order, and each id's position among them.

    Ids are small positive integers in every MovieLens release, so a table over
    `[0, max id]` maps them in O(n + max id), without `np.unique`'s sort of n
    values and its int64 inverse; other ids fall back to `np.unique`.
    """
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high > 4 * len(ids) + 1_000_000:
        distinct, inverse = np.unique(ids, return_inverse=True)
        return distinct, inverse.astype(np.int32)
    present = np.zeros(high + 1, dtype=bool)
    present[ids] = True
    position = np.cumsum(present, dtype=np.int32) - 1
    return np.flatnonzero(present), position[ids]


def _unique(ids: np.ndarray, path: Path, what: str) -> None:
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"Corrupt MovieLens file {path}: {what} id {values[counts > 1][0]} appears twice."
        )


def _check_counts(folder: Path, variant: str, counts: dict[str, int]) -> None:
    official = OFFICIAL_COUNTS[variant]
    for what, name in (("ratings", FILES[variant][0]), ("movies", FILES[variant][1])):
        if counts[what] != official[what]:
            raise ValueError(
                f"MovieLens file {folder / name}: the official MovieLens {variant.upper()} "
                f"has exactly {official[what]} {what}, the file holds {counts[what]}. It "
                "is truncated or not the official file; pass sha256=None to load files "
                "you made yourself."
            )
    if counts["users"] != official["users"]:
        where = folder / FILES[variant][-1]
        raise ValueError(
            f"MovieLens file {where}: the official MovieLens {variant.upper()} has "
            f"{official['users']} users, these files hold {counts['users']}. A file is "
            "truncated or not the official one; pass sha256=None to load files you made "
            "yourself."
        )


def read_tables(
    folder: Path,
    variant: str,
    *,
    official: bool,
    genre_names: tuple[str, ...],
    occupation_labels: tuple[str, ...],
    age_buckets: tuple[int, ...],
) -> MovieLensTables:
    """Reads and checks the files of `variant` in `folder` into `MovieLensTables`."""
    ratings_path, movies_path = (folder / name for name in FILES[variant][:2])
    raw = read_file(ratings_path)
    movie_file = read_file(movies_path)
    _unique(movie_file["movieId"], movies_path, "movie")
    movies = {
        "movie_genres": _genre_labels(movie_file["genres"], movies_path, genre_names),
        "movie_id": _id_strings(movie_file["movieId"]),
        "movie_title": movie_file["title"],
    }
    low, high = (1.0, 5.0) if variant == "1m" else (0.5, 5.0)
    bad = (raw["rating"] < low) | (raw["rating"] > high) | (raw["rating"] * 2 % 1 != 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"Corrupt MovieLens file {ratings_path}, rating {row + 1}: ratings run from "
            f"{low} to {high} in steps of {'1' if variant == '1m' else '0.5'}, found "
            f"{raw['rating'][row]}."
        )
    movie_index = _positions(raw["movieId"], movie_file["movieId"], ratings_path, "movie")
    if variant == "1m":
        users_path = folder / "users.dat"
        user_file = read_file(users_path)
        _unique(user_file["userId"], users_path, "user")
        users = _users_1m(user_file, users_path, occupation_labels, age_buckets)
        user_index = _positions(raw["userId"], user_file["userId"], ratings_path, "user")
    else:
        user_ids, user_index = _raters(raw["userId"])
        users = {"user_id": _id_strings(user_ids)}
    if official:
        counts = {
            "ratings": len(movie_index),
            "movies": len(movies["movie_id"]),
            "users": len(users["user_id"]),
        }
        _check_counts(folder, variant, counts)
    ratings = {
        "user_index": user_index,
        "movie_index": movie_index,
        "user_rating": raw["rating"].astype(np.float32, copy=False),
        "timestamp": raw["timestamp"].astype(np.int64, copy=False),
    }
    return MovieLensTables(variant, ratings, movies, users)


def _users_1m(
    columns: dict[str, np.ndarray],
    path: Path,
    occupation_labels: tuple[str, ...],
    age_buckets: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """users.dat -> the tfds `movielens/1m-ratings` user features."""
    checks = (
        ("gender", ~np.isin(columns["gender"], ["M", "F"]), "'M' or 'F'"),
        ("age", ~np.isin(columns["age"], age_buckets), f"one of {list(age_buckets)}"),
        (
            "occupation",
            (columns["occupation"] < 0) | (columns["occupation"] >= len(OCCUPATIONS_1M)),
            f"a code from 0 to {len(OCCUPATIONS_1M) - 1}",
        ),
    )
    for name, bad, expected in checks:
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"Corrupt MovieLens file {path}, line {row + 1}: {name} must be {expected}, "
                f"found {columns[name][row]!r}."
            )
    texts = np.asarray(OCCUPATIONS_1M)[columns["occupation"]]
    labels = [
        occupation_labels.index("student" if "student" in text else text) for text in OCCUPATIONS_1M
    ]
    return {
        "user_id": _id_strings(columns["userId"]),
        "bucketized_user_age": columns["age"].astype(np.float32),
        "user_gender": columns["gender"] == "M",
        "user_occupation_label": np.asarray(labels, dtype=np.int64)[columns["occupation"]],
        "user_occupation_text": texts,
        "user_zip_code": columns["zip"],
    }
