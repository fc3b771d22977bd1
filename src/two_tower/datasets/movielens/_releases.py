"""The MovieLens releases, the `sha256=` option, and the tfds layout of their records.

A release is where GroupLens serves it, its zip's size and sha256, and the files
it holds. The tfds layout is the feature names and label vocabularies of tfds
`movielens/<variant>-ratings` and `-movies`, which every loader's records follow.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from two_tower import _arguments
from two_tower.datasets.movielens.tables import VARIANTS

URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
SIZE = 4_924_029
FOLDER = "ml-100k"
ARCHIVE = "ml-100k.zip"

# Label vocabularies of tfds `movielens/100k-*` (ClassLabel names, in order).
GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "Unknown", "War", "Western",
    "(no genres listed)",
)  # fmt: skip
OCCUPATIONS = (
    "academic/educator", "artist", "clerical/admin", "customer service",
    "doctor/health care", "entertainment", "executive/managerial", "farmer",
    "homemaker", "lawyer", "librarian", "other/not specified", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "student",
    "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
# The lower bounds of the age buckets of tfds's `bucketized_user_age`.
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)

RATING_FEATURES = (
    "bucketized_user_age", "movie_genres", "movie_id", "movie_title",
    "raw_user_age", "timestamp", "user_gender", "user_id",
    "user_occupation_label", "user_occupation_text", "user_rating",
    "user_zip_code",
)  # fmt: skip
MOVIE_FEATURES = ("movie_genres", "movie_id", "movie_title")

# The files each release must hold.
FILES = {
    "100k": ("u.data", "u.item", "u.user"),
    "1m": ("ratings.dat", "movies.dat", "users.dat"),
    "20m": ("ratings.csv", "movies.csv"),
    "25m": ("ratings.csv", "movies.csv"),
}
# `sha256=OFFICIAL` (the default) checks against the official release.
OFFICIAL = "official"


class Release(NamedTuple):
    """One GroupLens MovieLens release: where it is, what it weighs, what it holds."""

    variant: str
    url: str
    sha256: str
    size: int
    files: tuple[str, ...]

    @property
    def folder(self) -> str:
        return f"ml-{self.variant}"

    @property
    def archive(self) -> str:
        return f"ml-{self.variant}.zip"

    @property
    def title(self) -> str:
        return f"MovieLens {self.variant.upper()}"


# Sizes and sha256 of the official zips, as tensorflow-datasets records them.
_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
RELEASES = {
    "100k": Release("100k", URL, SHA256, SIZE, FILES["100k"]),
    "1m": Release(
        "1m", _BASE_URL + "ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        5_917_549, FILES["1m"],
    ),
    "20m": Release(
        "20m", _BASE_URL + "ml-20m.zip",
        "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        198_702_078, FILES["20m"],
    ),
    "25m": Release(
        "25m", _BASE_URL + "ml-25m.zip",
        "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
        261_978_986, FILES["25m"],
    ),
}  # fmt: skip


def release_of(variant: str) -> Release:
    if variant not in RELEASES:
        raise ValueError(f"`variant` must be one of {VARIANTS}. Received: {variant!r}")
    return RELEASES[variant]


def check_options(data_dir: Any, download: Any, sha256: Any) -> str | None:
    """Raises on a mistyped `data_dir`, `download` or `sha256`; returns `sha256` normalized."""
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise ValueError(
            "`data_dir` must be a path (str or pathlib.Path) or None. "
            f"Received: data_dir={data_dir!r} ({type(data_dir).__name__})"
        )
    _arguments.boolean("download", download)
    if sha256 is None or sha256 == OFFICIAL:
        return sha256
    if not isinstance(sha256, str) or len(sha256) != 64 or not _is_hex(sha256):
        raise ValueError(
            f"`sha256` must be {OFFICIAL!r} (the official release's), None (no check, for "
            "files you made yourself) or the 64 hex digits of your archive's sha256. "
            f"Received: sha256={sha256!r}"
        )
    return sha256.lower()


def _is_hex(text: str) -> bool:
    return all(character in "0123456789abcdefABCDEF" for character in text)


def expected_sha256(sha256: str | None, release: Release) -> str | None:
    return release.sha256 if sha256 == OFFICIAL else sha256
