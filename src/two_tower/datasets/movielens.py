"""MovieLens 100K, 1M, 20M and 25M as plain NumPy dicts of arrays.

`variant=` picks the release: `"100k"` (the default), `"1m"`, `"20m"` or
`"25m"`. Two forms:

- `load_ratings` / `load_movies`: the records have the feature names, dtypes
  and values of tfds `movielens/<variant>-ratings` and `-movies`, with two
  conveniences: strings are `str` (not `bytes`), and `movie_genres` is an
  object array holding one int64 array of genre labels per record (tfds's
  variable-length sequence). This repeats every movie and user feature in
  every rating, so 20M and 25M refuse it (tens of GB).
- `load_tables`: the compact form (`MovieLensTables`), ratings as index
  columns plus one feature table per entity, for every variant.

100K is parsed line by line into NumPy arrays; 1M, 20M and 25M with pyarrow's CSV reader (ml-1m's
`.dat` files are `::`-separated ISO-8859-1, ml-20m/ml-25m's are UTF-8 CSV).

Where the data comes from (`ml-100k` stands for `ml-<variant>`):

1. `data_dir`, if given, and nothing else: a folder holding the GroupLens files
   (`u.data`, ...), a folder holding `ml-100k/` or `ml-100k.zip`, or the zip
   itself. A zip is extracted beside itself, into `ml-100k/`. Not found there
   raises; nothing is downloaded.
2. Otherwise, the cache root, `$TWO_TOWER_DATA_DIR` or else `~/.keras/datasets`: its
   `ml-100k/` folder, or its `ml-100k.zip` (checked against the official
   sha256 and extracted).
3. Then the official GroupLens download into the cache root, checked with sha256.
   It is written to a temporary file and moved into place only once verified,
   so an interrupted or corrupt download is never used by a later run.
   (`keras.utils.get_file` is not used: it writes straight to the final path,
   so a killed process leaves a partial archive there, and it keeps a download
   that fails its checksum; it also extracts in place, not atomically.)

With `source="tfds"` the records come from tensorflow-datasets instead, in
tfds's order; when a local copy is found, the tfds download cache is primed
from it so tfds builds without network.

Every file read is checked, so that a damaged copy raises (naming the file)
instead of loading as fewer records: each line must have all its fields, each
file must end with a line break (a file cut inside its last line would load that
line as shorter numbers, with or without `sha256`), and
u.data, u.user and u.item must have as many lines as `u.info` declares, or,
without `u.info`, as the official MovieLens 100K has (`OFFICIAL_COUNTS`:
100,000 ratings, 943 users, 1,682 movies). A local copy is checked the same way
before it primes tfds, and the tfds records are counted after loading. 1M, 20M
and 25M are checked against their official counts unless `sha256=None` says
the files are your own.

MovieLens' licence forbids redistribution: this module downloads it from
GroupLens or reads a copy you already have; it never ships the data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from two_tower import _arguments
from two_tower.datasets import _movielens_large
from two_tower.datasets._files import check_last_line as _check_last_line
from two_tower.datasets._files import sha256 as _sha256
from two_tower.datasets.movielens_tables import VARIANTS, MovieLensTables

URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
SIZE = 4_924_029
FOLDER = "ml-100k"
ARCHIVE = "ml-100k.zip"
ENV_VAR = "TWO_TOWER_DATA_DIR"
ENCODING = "ISO-8859-1"

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
_AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)

RATING_FEATURES = (
    "bucketized_user_age", "movie_genres", "movie_id", "movie_title",
    "raw_user_age", "timestamp", "user_gender", "user_id",
    "user_occupation_label", "user_occupation_text", "user_rating",
    "user_zip_code",
)  # fmt: skip
MOVIE_FEATURES = ("movie_genres", "movie_id", "movie_title")

_REQUIRED_FILES = ("u.data", "u.item", "u.user")
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
_SOURCES = ("grouplens", "tfds")
# `sha256=OFFICIAL` (the default) checks against the official release.
OFFICIAL = "official"


class _Release(NamedTuple):
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
    "100k": _Release("100k", URL, SHA256, SIZE, _REQUIRED_FILES),
    "1m": _Release(
        "1m", _BASE_URL + "ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        5_917_549, _movielens_large.FILES["1m"],
    ),
    "20m": _Release(
        "20m", _BASE_URL + "ml-20m.zip",
        "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        198_702_078, _movielens_large.FILES["20m"],
    ),
    "25m": _Release(
        "25m", _BASE_URL + "ml-25m.zip",
        "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
        261_978_986, _movielens_large.FILES["25m"],
    ),
}  # fmt: skip


def _release(variant: str) -> _Release:
    if variant not in RELEASES:
        raise ValueError(f"`variant` must be one of {VARIANTS}. Received: {variant!r}")
    return RELEASES[variant]


def _check_options(data_dir: Any, download: Any, sha256: Any) -> str | None:
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


def _expected_sha256(sha256: str | None, release: _Release) -> str | None:
    return release.sha256 if sha256 == OFFICIAL else sha256


# --------------------------------------------------------------------- locate
def cache_root() -> Path:
    """The cache root: `$TWO_TOWER_DATA_DIR`, or `~/.keras/datasets`."""
    root = os.environ.get(ENV_VAR)
    return Path(root).expanduser() if root else Path("~/.keras/datasets").expanduser()


def _has_files(folder: Path, release: _Release = RELEASES["100k"]) -> bool:
    return all((folder / name).is_file() for name in release.files)


def _check_archive(
    archive: Path,
    sha256: str | None,
    source: str | None = None,
    release: _Release = RELEASES["100k"],
) -> None:
    """Raises if `archive` does not hash to `sha256`; `source` names a download."""
    if sha256 is None:
        return
    actual = _sha256(archive)
    if actual != sha256:
        if source is not None:
            raise ValueError(
                f"Checksum mismatch for the download from {source}: sha256 is {actual}, "
                f"expected {sha256}. The transfer was truncated or corrupt; nothing was "
                "kept. Retry, or use a local copy (data_dir= or TWO_TOWER_DATA_DIR)."
            )
        raise ValueError(
            f"Checksum mismatch for {archive}: sha256 is {actual}, expected "
            f"{sha256}. The archive is truncated, corrupt or not the official "
            f"{release.archive}; pass `sha256=None` for an archive you made yourself."
        )


def _extract(
    archive: Path, destination: Path, sha256: str | None, release: _Release = RELEASES["100k"]
) -> Path:
    """Extracts `archive` to `destination/ml-<variant>/`, complete or not at all.

    An existing complete `ml-<variant>/` is reused; an incomplete one is never
    overwritten (it may hold someone's files), so that case raises.
    """
    _check_archive(archive, sha256, release=release)
    target = destination / release.folder
    if _has_files(target, release):
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but lacks some of {list(release.files)}, so {archive} "
            "was not extracted over it. Remove or complete that folder."
        )
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{release.folder}-", dir=destination))
    try:
        try:
            with zipfile.ZipFile(archive) as zipped:
                bad = zipped.testzip()
                if bad is not None:
                    raise ValueError(f"Corrupt member {bad!r} in archive {archive}.")
                zipped.extractall(staging)
        except zipfile.BadZipFile as error:
            raise ValueError(f"{archive} is not a valid zip archive: {error}") from error
        found = [p.parent for p in staging.rglob(release.files[0]) if _has_files(p.parent, release)]
        if not found:
            raise ValueError(
                f"Archive {archive} does not contain the {release.title} files "
                f"{list(release.files)}."
            )
        os.replace(found[0], target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(url: str, destination: Path, sha256: str) -> Path:
    """Downloads to a temporary file; moves it to `destination` once verified."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".part", dir=destination.parent
    )
    partial = Path(partial_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        _check_archive(partial, sha256, source=url)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def locate(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    variant: str = "100k",
    download: bool = True,
    sha256: str | None = OFFICIAL,
) -> Path:
    """Returns the folder holding the MovieLens files, fetching them if needed.

    Args:
        data_dir: the only place looked when given (see the module docstring):
            nothing is downloaded then. When it is not given, the cache root,
            then a download.
        variant: `"100k"`, `"1m"`, `"20m"` or `"25m"`.
        download: download from GroupLens when no local copy is found.
        sha256: the expected sha256 of a zip archive read from disk: `"official"`
            (the default) for the official release's, or None to skip the check
            (for archives you made yourself). A download is always checked,
            against the official sha256 when this is None.

    Returns:
        The folder containing the release's files (`u.data`, `u.item` and
        `u.user` for 100K; `ratings.dat`, `movies.dat`, `users.dat` for 1M;
        `ratings.csv` and `movies.csv` for 20M and 25M).

    Raises:
        FileNotFoundError: nothing found (at `data_dir`, or in the cache root
            with `download` off or failing); the message lists where it looked.
        FileExistsError: an extraction folder exists but lacks some files, so
            the archive is not extracted over it.
        ValueError: an unknown `variant`; an archive that fails its checksum,
            is not a valid zip or lacks the release's files; a mistyped
            `data_dir`, `download` or `sha256` (see `load_tables`).

    Examples:
        >>> folder = two_tower.datasets.movielens.locate()  # doctest: +SKIP
    """
    release = _release(variant)
    sha256 = _expected_sha256(_check_options(data_dir, download, sha256), release)
    looked: list[str] = []
    if data_dir is not None:
        given = Path(data_dir).expanduser()
        if given.is_file() and not zipfile.is_zipfile(given):
            if _has_files(given.parent, release):
                return given.parent  # e.g. data_dir=".../ml-100k/u.data"
            raise ValueError(
                f"{given} is not a valid zip archive, nor a file of a folder holding "
                f"{list(release.files)}. Pass that folder, its parent, or "
                f"{release.archive}."
            )
        if given.is_file():
            return _extract(given, given.parent, sha256, release)
        for folder in (given, given / release.folder):
            looked.append(str(folder))
            if _has_files(folder, release):
                return folder
        if (given / release.archive).is_file():
            return _extract(given / release.archive, given, sha256, release)
        looked.append(str(given / release.archive))
        raise FileNotFoundError(
            f"{release.title} not found at data_dir={str(data_dir)!r}. Looked for "
            f"{list(release.files)} in: {', '.join(looked)}. Pass the folder "
            f"holding {release.files[0]} (or its parent, or {release.archive})."
        )
    root = cache_root()
    folder = root / release.folder
    looked.append(str(folder))
    if _has_files(folder, release):
        return folder
    archive = root / release.archive
    looked.append(str(archive))
    if not archive.is_file():
        if not download:
            raise FileNotFoundError(_not_found_message(looked, "download=False", release))
        try:
            # A download is always verified: against `sha256`, or the official one.
            _download(release.url, archive, release.sha256 if sha256 is None else sha256)
        except (urllib.error.URLError, OSError) as error:
            why = f"downloading {release.url} failed: {error}"
            raise FileNotFoundError(_not_found_message(looked, why, release)) from error
    return _extract(archive, root, sha256, release)


def _not_found_message(looked: list[str], why: str, release: _Release) -> str:
    return (
        f"{release.title} is not available ({why}). Looked in: {', '.join(looked)}. "
        f"To use a local copy, pass data_dir='/path/to/{release.folder}' or set "
        f"{ENV_VAR} to a folder that holds {release.folder}/ (or {release.archive})."
    )


# ---------------------------------------------------------------------- parse
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
    _check_last_line(path, "MovieLens")
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


def _declared_counts(folder: Path | None) -> _Counts:
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


def _check_folder(folder: Path) -> None:
    """Raises unless u.data, u.user and u.item hold whole rows, as many as declared."""
    declared = _declared_counts(folder)
    for name in _LAYOUT:
        _read_counted(folder, name, declared)


def _parse_movies(folder: Path, declared: _Counts) -> dict[str, dict[str, Any]]:
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
            "bucketized_user_age": max(b for b in _AGE_BUCKETS if age >= b or b == 1),
            "raw_user_age": age,
            "user_gender": gender == "M",
            "user_occupation_label": OCCUPATIONS.index(_OCCUPATION_LABELS[occupation]),
            "user_occupation_text": occupation,
            "user_zip_code": zip_code,
        }
    return users


def _movie_arrays(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    genres = np.empty(len(records), dtype=object)
    genres[:] = [r["movie_genres"] for r in records]
    return {
        "movie_genres": genres,
        "movie_id": np.asarray([r["movie_id"] for r in records], dtype=str),
        "movie_title": np.asarray([r["movie_title"] for r in records], dtype=str),
    }


def _tables_100k(folder: Path) -> MovieLensTables:
    declared = _declared_counts(folder)
    # The ratings first: a cut u.data is the likeliest damage, so name it first.
    path = folder / "u.data"
    rows = _read_counted(folder, "u.data", declared)
    movies = _parse_movies(folder, declared)
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
    return MovieLensTables("100k", ratings, _movie_arrays(list(movies.values())), user_table)


# ----------------------------------------------------------------------- tfds
def prime_tfds_cache(
    tfds_data_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Lets tfds build `movielens/100k-*` offline, from a local GroupLens copy.

    tfds looks for a download named `get_dl_fname(url, sha256)` with a `.INFO`
    sidecar, and for its extraction under `downloads/extracted/ZIP.<name>/`;
    this writes both into `tfds_data_dir/downloads`, from the copy `locate`
    finds (it never downloads). Then `tfds.load("movielens/100k-ratings",
    data_dir=tfds_data_dir)` works without network.

    tfds trusts a primed copy (it checks only the sha256 written here) and
    keeps what it builds from it, so the copy's files are checked first, as
    `load_ratings` checks them: whole rows, as many as `u.info` declares (the
    official 100,000 ratings, 943 users and 1,682 movies without `u.info`).

    Args:
        tfds_data_dir: the `data_dir` you will give `tfds.load`.
        data_dir: where the local copy is; see `locate`.

    Returns:
        `tfds_data_dir` as a Path.

    Raises:
        FileNotFoundError: no local copy is found.
        ValueError: a file of the local copy is truncated or corrupt.

    Examples:
        >>> two_tower.datasets.movielens.prime_tfds_cache("/tmp/tfds")  # doctest: +SKIP
    """
    folder = locate(data_dir, download=False)
    _check_folder(folder)  # before anything is written for tfds
    tfds_data_dir = Path(tfds_data_dir).expanduser()
    from tensorflow_datasets.core.download import resource

    downloads = tfds_data_dir / "downloads"
    name = resource.get_dl_fname(URL, SHA256)
    extracted = downloads / "extracted" / f"ZIP.{name}" / FOLDER
    if _has_files(extracted):
        return tfds_data_dir
    extracted.parent.mkdir(parents=True, exist_ok=True)
    (downloads / name).touch()
    info = {
        "dataset_names": ["movielens"],
        "original_fname": ARCHIVE,
        "url_info": {"checksum": SHA256, "filename": ARCHIVE, "size": SIZE},
        "urls": [URL],
    }
    (downloads / f"{name}.INFO").write_text(json.dumps(info, sort_keys=True))
    staging = Path(tempfile.mkdtemp(dir=extracted.parent))
    shutil.copytree(folder, staging / FOLDER)
    os.replace(staging / FOLDER, extracted)
    staging.rmdir()
    return tfds_data_dir


def _tfds_records(
    table: str,
    data_dir: str | os.PathLike[str] | None,
    tfds_data_dir: str | None,
    download: bool,
) -> dict[str, np.ndarray]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "source='tfds' needs tensorflow-datasets: pip install tensorflow-datasets "
            "(the two_tower `tfds` extra)"
        ) from error
    root = Path(tfds_data_dir).expanduser() if tfds_data_dir else cache_root() / "tfds"
    try:
        folder: Path | None = locate(data_dir, download=False)
    except FileNotFoundError:
        if data_dir is not None:
            raise  # the given copy is absent
        folder = None  # without a local copy, tfds downloads by itself (if allowed)
    if folder is not None:
        prime_tfds_cache(root, folder)
    declared = _declared_counts(folder)
    dataset = tfds.load(
        f"movielens/100k-{table}", split="train", data_dir=str(root), download=download
    )
    features = RATING_FEATURES if table == "ratings" else MOVIE_FEATURES
    columns: dict[str, list[Any]] = {key: [] for key in features}
    for record in tfds.as_numpy(dataset):
        for key in features:
            value = record[key]
            columns[key].append(value.decode("utf-8") if isinstance(value, bytes) else value)
    arrays = {key: np.asarray(values) for key, values in columns.items() if key != "movie_genres"}
    genres = np.empty(len(columns["movie_genres"]), dtype=object)
    genres[:] = [np.asarray(g, dtype="int64") for g in columns["movie_genres"]]
    arrays["movie_genres"] = genres
    # tfds keeps what it built, so a copy primed before its files were checked
    # (or a half-built cache) would be read silently every time after.
    expected = declared["ratings" if table == "ratings" else "items"]
    if len(genres) != expected.rows:
        raise ValueError(
            f"tfds movielens/100k-{table} in {root} holds {len(genres)} records, but "
            f"{expected.source}{expected.why}. That tfds cache was built from a truncated "
            f"or corrupt copy: delete {root / 'movielens'} and {root / 'downloads'}, then "
            "load again."
        )
    return {key: arrays[key] for key in features}


# --------------------------------------------------------------------- public
def _check_source(source: str, variant: str) -> None:
    if source not in _SOURCES:
        raise ValueError(f"`source` must be one of {_SOURCES}. Received: {source!r}")
    _release(variant)
    if source == "tfds" and variant != "100k":
        raise ValueError(
            f"source='tfds' reads MovieLens 100K only; for variant={variant!r} use "
            "source='grouplens' (the same records, parsed with pyarrow)."
        )


def load_tables(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    variant: str = "100k",
    download: bool = True,
    sha256: str | None = OFFICIAL,
) -> MovieLensTables:
    """Loads a MovieLens release in compact form: index columns plus entity tables.

    The form for scale: MovieLens 25M's ratings take 0.5 GB as four columns.
    See `MovieLensTables`; its `to_records` gives the tfds layout back.

    Args:
        data_dir: where the files are (the only place looked when given); see `locate`.
        variant: `"100k"`, `"1m"`, `"20m"` or `"25m"`.
        download: download from GroupLens if no local copy is found.
        sha256: `"official"` checks an archive against the official sha256 and
            (1M, 20M, 25M) the files against the official row counts; None
            skips both, for files you made yourself. 100K's counts are checked
            against `u.info` either way (see the module docstring).

    Returns:
        A `MovieLensTables`.

    Raises:
        FileNotFoundError: no data and no way to fetch it.
        FileExistsError: see `locate`.
        ValueError: a corrupt, truncated or mismatching file (a missing or
            mistyped column, a rating of an unknown movie, a last line cut
            short, a checksum mismatch...), named in the message; an unknown
            `variant`; a `data_dir` that is not a path, a `download` that is
            not True or False, or a `sha256` that is not "official", None or
            64 hex digits.

    Examples:
        >>> tables = two_tower.datasets.movielens.load_tables(variant="1m")  # doctest: +SKIP
        >>> model = two_tower.TwoTowerRetrieval.from_ids(
        ...     tables.num_users, tables.num_movies)  # doctest: +SKIP
        >>> x = {"query": tables.ratings["user_index"],
        ...      "candidate": tables.ratings["movie_index"]}  # doctest: +SKIP
    """
    release = _release(variant)
    folder = locate(data_dir, variant=variant, download=download, sha256=sha256)
    if variant == "100k":
        return _tables_100k(folder)
    return _movielens_large.read_tables(
        folder,
        variant,
        official=_expected_sha256(sha256, release) == release.sha256,
        genre_names=GENRES,
        occupation_labels=OCCUPATIONS,
        age_buckets=_AGE_BUCKETS,
    )


def load_ratings(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    variant: str = "100k",
    source: str = "grouplens",
    download: bool = True,
    sha256: str | None = OFFICIAL,
    tfds_data_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Loads the ratings, joined with movie and user features, in the tfds layout.

    The layout repeats every movie and user feature in every rating, so it is
    offered for 100K and 1M only; for 20M and 25M (tens of GB in this layout)
    use `load_tables` and, for a subset of ratings, `MovieLensTables.to_records`.

    Args:
        data_dir: where the files are (the only place looked when given); see `locate`.
        variant: `"100k"` (100,000 ratings) or `"1m"` (1,000,209).
        source: `"grouplens"` parses the GroupLens files (file order);
            `"tfds"` reads tfds `movielens/100k-ratings` (tfds order; 100K only).
        download: download from GroupLens if no local copy is found.
        sha256: see `load_tables`.
        tfds_data_dir: tfds data folder for `source="tfds"`; defaults to
            `<cache root>/tfds`.

    Returns:
        A dict of equal-length NumPy arrays keyed by the tfds feature names:
        `user_id`, `movie_id`, `movie_title`, `user_zip_code` and
        `user_occupation_text` (str); `movie_genres` (object array of int64
        arrays); `user_rating`, `bucketized_user_age`, `raw_user_age` (100K
        only) (float32); `timestamp`, `user_occupation_label` (int64);
        `user_gender` (bool, True is male).

    Raises:
        FileNotFoundError: no data and no way to fetch it.
        FileExistsError: see `locate`.
        ValueError: a corrupt, truncated or mismatching file, named in the
            message; an unknown `source` or `variant`; `source="tfds"` with a
            variant other than 100K; `variant="20m"` or `"25m"`.
        ImportError: `source="tfds"` without tensorflow-datasets installed.

    Examples:
        >>> ratings = two_tower.datasets.movielens.load_ratings()  # doctest: +SKIP
        >>> ratings["user_id"][:3]  # doctest: +SKIP
        array(['196', '186', '22'], dtype='<U3')
    """
    _check_source(source, variant)
    if variant in ("20m", "25m"):
        raise ValueError(
            f"load_ratings(variant={variant!r}) would repeat every movie title, genre "
            "list and user id in each of its 20M+ ratings (tens of GB). Use "
            f"load_tables(variant={variant!r}): ratings as index columns plus movie and "
            "user tables, and its to_records(rows) for the tfds layout of a subset."
        )
    if source == "tfds":
        return _tfds_records("ratings", data_dir, tfds_data_dir, download)
    return load_tables(data_dir, variant=variant, download=download, sha256=sha256).to_records()


def load_movies(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    variant: str = "100k",
    source: str = "grouplens",
    download: bool = True,
    sha256: str | None = OFFICIAL,
    tfds_data_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Loads the movies: `movie_id`, `movie_title`, `movie_genres`.

    Every variant, 20M and 25M included (their movies tables are small).
    Args and Raises are those of `load_ratings`, except that 20M and 25M load.

    Returns:
        A dict of equal-length NumPy arrays: `movie_id`, `movie_title` (str)
        and `movie_genres` (object array of int64 arrays).

    Examples:
        >>> movies = two_tower.datasets.movielens.load_movies()  # doctest: +SKIP
    """
    _check_source(source, variant)
    if source == "tfds":
        return _tfds_records("movies", data_dir, tfds_data_dir, download)
    if variant != "100k":
        return load_tables(data_dir, variant=variant, download=download, sha256=sha256).movies
    folder = locate(data_dir, download=download, sha256=sha256)
    movies = _parse_movies(folder, _declared_counts(folder))
    return _movie_arrays(list(movies.values()))


def _take(records: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {key: values[rows] for key, values in records.items()}


def _check_split(
    records: Any, test_fraction: Any, owner: str
) -> tuple[dict[str, np.ndarray], int, int]:
    """`records` as arrays, their length, and the number of train rows; or a ValueError."""
    if not isinstance(records, Mapping) or not records:
        raise ValueError(
            f"{owner}: `records` must be a non-empty dict of name -> array, as load_ratings "
            f"returns. Received: {type(records).__name__}"
        )
    arrays = {key: np.asarray(values) for key, values in records.items()}
    shapes = {key: values.shape for key, values in arrays.items()}
    if any(len(shape) == 0 for shape in shapes.values()):
        raise ValueError(
            f"{owner}: every value of `records` must be an array of rows (at least 1-D). "
            f"Received shapes {shapes}"
        )
    lengths = {shape[0] for shape in shapes.values()}
    if len(lengths) != 1:
        raise ValueError(
            f"{owner}: all arrays must have the same length. Received lengths "
            f"{ {key: shape[0] for key, shape in shapes.items()} }"
        )
    fraction = _arguments.number("test_fraction", test_fraction, owner=owner)
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"{owner}: `test_fraction` must be in (0, 1). Received: test_fraction={test_fraction!r}"
        )
    n = lengths.pop()
    cut = round(n * (1.0 - fraction))
    if not 0 < cut < n:
        raise ValueError(
            f"{owner}: test_fraction={fraction} of {n} rows leaves {cut} rows to train and "
            f"{n - cut} to test; both parts need at least one row. Pass more rows or "
            "another test_fraction."
        )
    return arrays, n, cut


def random_split(
    records: dict[str, np.ndarray], test_fraction: float = 0.2, seed: int | None = 42
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A seeded random split (by default the 80/20 protocol of the keras-rs tutorial).

    The rows are permuted with `np.random.default_rng(seed)`; the first
    `round(n * (1 - test_fraction))` go to train, the rest to test.

    Args:
        records: name -> array (or list), all of one length (e.g. `load_ratings()`);
            lists come back as arrays.
        test_fraction: share of the rows in the test part, in (0, 1); a Python or
            NumPy number.
        seed: seed of the permutation, an integer >= 0; None draws a fresh one
            (a different split each call).

    Returns:
        `(train, test)`, dicts with the same keys as `records`.

    Raises:
        ValueError: `records` that is not a non-empty dict of arrays of one
            length, `test_fraction` outside (0, 1) or leaving a part empty, or a
            `seed` that is not an integer >= 0.

    Examples:
        >>> import numpy as np
        >>> train, test = two_tower.datasets.movielens.random_split({"a": np.arange(10)})
        >>> len(train["a"]), len(test["a"])
        (8, 2)
    """
    arrays, n, cut = _check_split(records, test_fraction, "random_split")
    order = np.random.default_rng(_arguments.seed("seed", seed, owner="random_split")).permutation(
        n
    )
    return _take(arrays, order[:cut]), _take(arrays, order[cut:])


def temporal_split(
    records: dict[str, np.ndarray], test_fraction: float = 0.2
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train on the earliest ratings, test on the latest, by `timestamp`.

    Ties in time keep file order (a stable sort), so the split is deterministic.

    Args:
        records: name -> array, all of one length, with a `timestamp` array of
            numbers (or `datetime64`), one per row.
        test_fraction: share of the rows (the latest) in the test part.

    Returns:
        `(train, test)`, dicts with the same keys as `records`.

    Raises:
        ValueError: no `timestamp`, or one that is not a 1-D array of numbers
            without NaN (strings would sort as text: "10" before "9"); arrays of
            different lengths; or `test_fraction` outside (0, 1) or leaving a
            part empty.

    Examples:
        >>> import numpy as np
        >>> records = {"timestamp": np.array([5, 1, 4, 2, 3])}
        >>> train, test = two_tower.datasets.movielens.temporal_split(records, 0.4)
        >>> test["timestamp"].tolist()
        [4, 5]
    """
    if isinstance(records, Mapping) and "timestamp" not in records:
        raise ValueError(
            "temporal_split needs a 'timestamp' array in the records. Received the keys "
            f"{sorted(map(str, records))}"
        )
    arrays, _, cut = _check_split(records, test_fraction, "temporal_split")
    timestamp = arrays["timestamp"]
    if timestamp.ndim != 1 or timestamp.dtype.kind not in "iufM":
        raise ValueError(
            "temporal_split: records['timestamp'] must be a 1-D array of numbers (or "
            f"datetime64). Received {timestamp.dtype} of shape {timestamp.shape}; convert "
            "text timestamps with .astype('int64') first (as text, '10' sorts before '9')."
        )
    if timestamp.dtype.kind in "fM" and np.isnan(timestamp).any():
        row = int(np.flatnonzero(np.isnan(timestamp))[0])
        raise ValueError(
            f"temporal_split: records['timestamp'] holds NaN (or NaT) at row {row}; a row "
            "without a time cannot be placed in time. Drop or fill those rows first."
        )
    order = np.argsort(timestamp, kind="stable")
    return _take(arrays, order[:cut]), _take(arrays, order[cut:])


__all__ = [
    "GENRES",
    "OCCUPATIONS",
    "OFFICIAL",
    "OFFICIAL_COUNTS",
    "RELEASES",
    "SHA256",
    "URL",
    "VARIANTS",
    "MovieLensTables",
    "cache_root",
    "load_movies",
    "load_ratings",
    "load_tables",
    "locate",
    "prime_tfds_cache",
    "random_split",
    "temporal_split",
]
