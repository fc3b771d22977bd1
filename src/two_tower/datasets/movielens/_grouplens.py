"""Reads the GroupLens files of MovieLens 100K (`u.data`, `u.item`, `u.user`), checked.

Each file is parsed line by line into NumPy arrays; each line must have all its
fields, each file must end with a line break, and each must have as many rows
as `u.info` declares (the official counts without it). A damaged file raises a
`ValueError` naming it. `check_last_line` serves the 1M, 20M and 25M readers too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from two_tower.datasets.movielens._releases import (
    AGE_BUCKETS,
    ARCHIVE,
    GENRES,
    OCCUPATIONS,
)
from two_tower.datasets.movielens.tables import MovieLensTables

ENCODING = "ISO-8859-1"

# The 19 genre flag columns of u.item, in file order, as tfds names them.
_ITEM_GENRE_COLUMNS = (
    "Unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# ML-100K's raw occupation text -> the tfds occupation label.
_OCCUPATION_LABELS = {
    "administrator": "clerical/admin", "artist": "artist",
    "doctor": "doctor/health care", "educator": "academic/educator",
    "engineer": "technician/engineer", "entertainment": "entertainment",
    "executive": "executive/managerial", "healthcare": "doctor/health care",
    "homemaker": "homemaker", "lawyer": "lawyer", "librarian": "librarian",
    "marketing": "sales/marketing", "none": "other/not specified",
    "other": "other/not specified", "programmer": "programmer",
    "retired": "retired", "salesman": "sales/marketing", "scientist": "scientist",
    "student": "student", "technician": "technician/engineer", "writer": "writer",
}  # fmt: skip
# The counts of the official MovieLens 100K, by u.info's names. They are checked
# whenever no u.info beside the files declares other counts, so that a file cut
# cleanly at a line end is caught even then.
OFFICIAL_COUNTS = {"users": 943, "items": 1682, "ratings": 100_000}
# Each counted file: its u.info name, field separator and number of fields.
_LAYOUT = {
    "u.data": ("ratings", "\t", 4),
    "u.user": ("users", "|", 5),
    "u.item": ("items", "|", 5 + len(_ITEM_GENRE_COLUMNS)),
}


def check_last_line(path: Path, what: str) -> None:
    """Raises if the non-empty file at `path` does not end with a line break.

    Every line of a GroupLens file ends with one, so a file that does not was cut
    inside its last line (a partial copy or download). The cut line may still
    parse, as a shorter number: a timestamp `978300760` cut to `9783`, a movie id
    `1097` cut to `10`. Reads one byte.
    """
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return
        handle.seek(-1, 2)
        last = handle.read(1)
    if last not in (b"\n", b"\r"):
        raise ValueError(
            f"Corrupt or truncated {what} file {path}: it does not end with a line break, "
            "so its last line was cut (a partial copy or download) and would load as "
            "wrong values. Replace it with a fresh copy; if the file is whole and only "
            "lacks its final line break, add one."
        )


def _read_rows(path: Path, separator: str, fields: int) -> list[list[str]]:
    try:
        text = path.read_bytes().decode(ENCODING)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Missing MovieLens file: {path}") from error
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        row = line.split(separator)
        if len(row) != fields:
            raise ValueError(
                f"Corrupt or truncated MovieLens file {path}, line {number}: expected "
                f"{fields} fields separated by {separator!r}, found {len(row)}: {line!r}"
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"MovieLens file {path} is empty.")
    # A last line cut after its last separator still has all its fields.
    check_last_line(path, "MovieLens")
    return rows


def _as_int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"Corrupt MovieLens file {path}: {what} must be an integer, found {value!r}."
        ) from None


class _Expected(NamedTuple):
    """A row count a file must have, and how an error should explain it."""

    rows: int
    source: str  # "u.info declares 5 ratings"
    why: str  # why that count applies, "" when u.info declares it
    advice: str


_Counts = dict[str, _Expected]


def declared_counts(folder: Path | None) -> _Counts:
    """The row count each file must have, by u.info's names, and where it comes from.

    The counts come from `folder/u.info` ("943 users"...) when it is there,
    which lets a folder you made yourself declare its own. Counts it lacks, or
    all of them when it is missing, are those of the official MovieLens 100K;
    so are all of them without a folder (tfds downloaded the data itself).
    """
    info = None if folder is None else folder / "u.info"
    declared: _Counts = {}
    if info is not None and info.is_file():
        for line in info.read_text(encoding=ENCODING).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit():
                count, key = int(parts[0]), parts[1]
                declared[key] = _Expected(
                    count, f"u.info declares {count} {key}", "", "Fix the file or u.info."
                )
    for key, count in OFFICIAL_COUNTS.items():
        if key in declared:
            continue
        if info is None:
            why = "tfds downloaded the official data"
        elif info.is_file():
            why = f"{info} declares no {key}, so the official count applies"
        else:
            why = f"{info} is missing, so the official counts apply"
        declared[key] = _Expected(
            count,
            f"MovieLens 100K has exactly {count} {key}",
            f" ({why})",
            f"Replace it with a fresh copy from {ARCHIVE}, or, for a folder you made "
            "yourself, declare its counts in u.info ('943 users', '1682 items', "
            "'100000 ratings', one a line).",
        )
    return declared


def _check_count(path: Path, found: int, declared: _Counts, key: str) -> None:
    expected = declared[key]
    if expected.rows != found:
        raise ValueError(
            f"Corrupt or truncated MovieLens file {path}: {expected.source}, the file "
            f"holds {found}{expected.why}. {expected.advice}"
        )


def _read_counted(folder: Path, name: str, declared: _Counts) -> list[list[str]]:
    """The rows of `folder/name`, checked for their field and row counts."""
    key, separator, fields = _LAYOUT[name]
    path = folder / name
    rows = _read_rows(path, separator, fields)
    _check_count(path, len(rows), declared, key)
    return rows


def check_folder(folder: Path) -> None:
    """Raises unless u.data, u.user and u.item hold whole rows, as many as declared."""
    declared = declared_counts(folder)
    for name in _LAYOUT:
        _read_counted(folder, name, declared)


def parse_movies(folder: Path, declared: _Counts) -> dict[str, dict[str, Any]]:
    path = folder / "u.item"
    rows = _read_counted(folder, "u.item", declared)
    movies: dict[str, dict[str, Any]] = {}
    for row in rows:
        flags = row[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise ValueError(f"Corrupt MovieLens file {path}: bad genre flags in {row!r}")
        genres = [
            GENRES.index(name)
            for name, flag in zip(_ITEM_GENRE_COLUMNS, flags, strict=True)
            if flag == "1"
        ]
        _as_int(row[0], path, "movie id")
        if row[0] in movies:
            raise ValueError(f"Corrupt MovieLens file {path}: movie id {row[0]} appears twice.")
        movies[row[0]] = {
            "movie_id": row[0],
            "movie_title": row[1],
            "movie_genres": np.asarray(genres, dtype="int64"),
        }
    return movies


def _parse_users(folder: Path, declared: _Counts) -> dict[str, dict[str, Any]]:
    path = folder / "u.user"
    rows = _read_counted(folder, "u.user", declared)
    users = {}
    for user_id, age_text, gender, occupation, zip_code in rows:
        age = _as_int(age_text, path, "age")
        if occupation not in _OCCUPATION_LABELS:
            raise ValueError(
                f"Corrupt MovieLens file {path}: unknown occupation {occupation!r} for "
                f"user {user_id}; expected one of {sorted(_OCCUPATION_LABELS)}."
            )
        if user_id in users:
            raise ValueError(f"Corrupt MovieLens file {path}: user id {user_id} appears twice.")
        if gender not in ("M", "F"):
            raise ValueError(
                f"Corrupt MovieLens file {path}: gender of user {user_id} must be 'M' or "
                f"'F', found {gender!r}."
            )
        users[user_id] = {
            "bucketized_user_age": max(b for b in AGE_BUCKETS if age >= b or b == 1),
            "raw_user_age": age,
            "user_gender": gender == "M",
            "user_occupation_label": OCCUPATIONS.index(_OCCUPATION_LABELS[occupation]),
            "user_occupation_text": occupation,
            "user_zip_code": zip_code,
        }
    return users


def movie_arrays(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    genres = np.empty(len(records), dtype=object)
    genres[:] = [r["movie_genres"] for r in records]
    return {
        "movie_genres": genres,
        "movie_id": np.asarray([r["movie_id"] for r in records], dtype=str),
        "movie_title": np.asarray([r["movie_title"] for r in records], dtype=str),
    }


def tables_100k(folder: Path) -> MovieLensTables:
    declared = declared_counts(folder)
    # The ratings first: a cut u.data is the likeliest damage, so name it first.
    path = folder / "u.data"
    rows = _read_counted(folder, "u.data", declared)
    movies = parse_movies(folder, declared)
    users = _parse_users(folder, declared)
    movie_index = {movie_id: index for index, movie_id in enumerate(movies)}
    user_index = {user_id: index for index, user_id in enumerate(users)}
    for number, (user_id, movie_id, rating, timestamp) in enumerate(rows, start=1):
        if user_id not in users or movie_id not in movies:
            raise ValueError(
                f"Corrupt MovieLens file {path}, rating {number}: user {user_id!r} or "
                f"movie {movie_id!r} is not in u.user / u.item."
            )
        if not 1 <= _as_int(rating, path, "rating") <= 5:
            raise ValueError(
                f"Corrupt MovieLens file {path}, rating {number}: ratings run from 1 to 5, "
                f"found {rating!r}."
            )
        _as_int(timestamp, path, "timestamp")
    ratings = {
        "user_index": np.asarray([user_index[row[0]] for row in rows], dtype="int32"),
        "movie_index": np.asarray([movie_index[row[1]] for row in rows], dtype="int32"),
        "user_rating": np.asarray([row[2] for row in rows], dtype="int64").astype("float32"),
        "timestamp": np.asarray([row[3] for row in rows], dtype="int64"),
    }
    user_table = {"user_id": np.asarray(list(users), dtype=str)}
    for key, dtype in (
        ("bucketized_user_age", "float32"),
        ("raw_user_age", "float32"),
        ("user_gender", "bool"),
        ("user_occupation_label", "int64"),
        ("user_occupation_text", "str"),
        ("user_zip_code", "str"),
    ):
        user_table[key] = np.asarray([u[key] for u in users.values()], dtype=dtype)
    return MovieLensTables("100k", ratings, movie_arrays(list(movies.values())), user_table)
