"""Finds a MovieLens release on disk or downloads it, and extracts its zip atomically.

See the `two_tower.datasets.movielens` docstring for where it looks, in order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from two_tower.datasets.movielens._releases import (
    OFFICIAL,
    RELEASES,
    Release,
    check_options,
    expected_sha256,
    release_of,
)
from two_tower.saving._files import sha256 as _sha256

ENV_VAR = "TWO_TOWER_DATA_DIR"


def cache_root() -> Path:
    """The cache root: `$TWO_TOWER_DATA_DIR`, or `~/.keras/datasets`."""
    root = os.environ.get(ENV_VAR)
    return Path(root).expanduser() if root else Path("~/.keras/datasets").expanduser()


def has_files(folder: Path, release: Release = RELEASES["100k"]) -> bool:
    return all((folder / name).is_file() for name in release.files)


def _check_archive(
    archive: Path,
    sha256: str | None,
    source: str | None = None,
    release: Release = RELEASES["100k"],
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
    archive: Path, destination: Path, sha256: str | None, release: Release = RELEASES["100k"]
) -> Path:
    """Extracts `archive` to `destination/ml-<variant>/`, complete or not at all.

    An existing complete `ml-<variant>/` is reused; an incomplete one is never
    overwritten (it may hold someone's files), so that case raises.
    """
    _check_archive(archive, sha256, release=release)
    target = destination / release.folder
    if has_files(target, release):
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
        found = [p.parent for p in staging.rglob(release.files[0]) if has_files(p.parent, release)]
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
    release = release_of(variant)
    sha256 = expected_sha256(check_options(data_dir, download, sha256), release)
    looked: list[str] = []
    if data_dir is not None:
        given = Path(data_dir).expanduser()
        if given.is_file() and not zipfile.is_zipfile(given):
            if has_files(given.parent, release):
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
            if has_files(folder, release):
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
    if has_files(folder, release):
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


def _not_found_message(looked: list[str], why: str, release: Release) -> str:
    return (
        f"{release.title} is not available ({why}). Looked in: {', '.join(looked)}. "
        f"To use a local copy, pass data_dir='/path/to/{release.folder}' or set "
        f"{ENV_VAR} to a folder that holds {release.folder}/ (or {release.archive})."
    )
