"""MovieLens 100K through tensorflow-datasets, which is imported only when used.

`prime_tfds_cache` lets tfds build offline from a local GroupLens copy;
`tfds_records` reads tfds `movielens/100k-*` into the same arrays as the
GroupLens parser, and counts them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from two_tower.datasets.movielens._download import cache_root, has_files, locate
from two_tower.datasets.movielens._grouplens import check_folder, declared_counts
from two_tower.datasets.movielens._releases import (
    ARCHIVE,
    FOLDER,
    MOVIE_FEATURES,
    RATING_FEATURES,
    SHA256,
    SIZE,
    URL,
)


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
    check_folder(folder)  # before anything is written for tfds
    tfds_data_dir = Path(tfds_data_dir).expanduser()
    from tensorflow_datasets.core.download import resource

    downloads = tfds_data_dir / "downloads"
    name = resource.get_dl_fname(URL, SHA256)
    extracted = downloads / "extracted" / f"ZIP.{name}" / FOLDER
    if has_files(extracted):
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


_READ_BATCH = 8192
"""Records per batch read from tfds."""


def tfds_records(
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
    declared = declared_counts(folder)
    dataset = tfds.load(
        f"movielens/100k-{table}", split="train", data_dir=str(root), download=download
    )
    features = RATING_FEATURES if table == "ratings" else MOVIE_FEATURES
    # Whole batches, not one record at a time: a Python step per record took 41 s
    # to read the 100K ratings, batches take a few seconds. Genre lists vary in
    # length: shifted by one (labels start at 0), padded with 0, and cut again below.
    batches = tfds.as_numpy(
        dataset.map(
            lambda record: {
                key: record[key] + 1 if key == "movie_genres" else record[key] for key in features
            }
        ).padded_batch(_READ_BATCH)
    )
    columns: dict[str, list[Any]] = {key: [] for key in features}
    for batch in batches:
        for key in features:
            values = batch[key]
            if key == "movie_genres":
                columns[key].extend(row[row > 0] - 1 for row in values)
            elif values.dtype == object:  # tfds strings are bytes
                columns[key].append(np.asarray([value.decode("utf-8") for value in values]))
            else:
                columns[key].append(values)
    arrays = {
        key: np.concatenate(values) if values else np.asarray(values)
        for key, values in columns.items()
        if key != "movie_genres"
    }
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
