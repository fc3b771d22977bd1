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

import os

import numpy as np

from two_tower.datasets.movielens import _grouplens, _large, _releases, _tfds
from two_tower.datasets.movielens._download import ENV_VAR as ENV_VAR
from two_tower.datasets.movielens._download import cache_root, locate
from two_tower.datasets.movielens._grouplens import ENCODING as ENCODING
from two_tower.datasets.movielens._grouplens import OFFICIAL_COUNTS
from two_tower.datasets.movielens._releases import ARCHIVE as ARCHIVE
from two_tower.datasets.movielens._releases import FOLDER as FOLDER
from two_tower.datasets.movielens._releases import (
    GENRES,
    OCCUPATIONS,
    OFFICIAL,
    RELEASES,
    SHA256,
    URL,
)
from two_tower.datasets.movielens._releases import MOVIE_FEATURES as MOVIE_FEATURES
from two_tower.datasets.movielens._releases import RATING_FEATURES as RATING_FEATURES
from two_tower.datasets.movielens._releases import SIZE as SIZE
from two_tower.datasets.movielens._splits import random_split, temporal_split
from two_tower.datasets.movielens._tfds import prime_tfds_cache
from two_tower.datasets.movielens.tables import VARIANTS, MovieLensTables

_SOURCES = ("grouplens", "tfds")


def _check_source(source: str, variant: str) -> None:
    if source not in _SOURCES:
        raise ValueError(f"`source` must be one of {_SOURCES}. Received: {source!r}")
    _releases.release_of(variant)
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
    release = _releases.release_of(variant)
    folder = locate(data_dir, variant=variant, download=download, sha256=sha256)
    if variant == "100k":
        return _grouplens.tables_100k(folder)
    return _large.read_tables(
        folder,
        variant,
        official=_releases.expected_sha256(sha256, release) == release.sha256,
        genre_names=GENRES,
        occupation_labels=OCCUPATIONS,
        age_buckets=_releases.AGE_BUCKETS,
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
        return _tfds.tfds_records("ratings", data_dir, tfds_data_dir, download)
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
        return _tfds.tfds_records("movies", data_dir, tfds_data_dir, download)
    if variant != "100k":
        return load_tables(data_dir, variant=variant, download=download, sha256=sha256).movies
    folder = locate(data_dir, download=download, sha256=sha256)
    movies = _grouplens.parse_movies(folder, _grouplens.declared_counts(folder))
    return _grouplens.movie_arrays(list(movies.values()))


# In the order the API page lists them (docs/api/datasets.md sorts by `__all__`).
# ENV_VAR, ENCODING, ARCHIVE, FOLDER, SIZE, RATING_FEATURES and MOVIE_FEATURES are
# not in it but stay readable here (imported `as` themselves), as they always were.
__all__ = [
    "MovieLensTables",
    "cache_root",
    "locate",
    "prime_tfds_cache",
    "load_tables",
    "load_ratings",
    "load_movies",
    "random_split",
    "temporal_split",
    "GENRES",
    "OCCUPATIONS",
    "OFFICIAL",
    "OFFICIAL_COUNTS",
    "RELEASES",
    "SHA256",
    "URL",
    "VARIANTS",
]
