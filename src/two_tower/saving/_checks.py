"""The checks `load_model` runs on a local `.keras` archive before Keras reads it.

Each check raises a `ValueError` naming the file and the damaged member, where
Keras would report a truncated file as "File not found" or a damaged member with
a message that does not name it.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from two_tower.saving import _manifest

# The member holding the model's config, without which Keras cannot load a `.keras` file.
CONFIG_MEMBER = "config.json"
# Errors `zipfile` raises on damaged data besides BadZipFile: a flipped compression
# method, a bad deflate stream, a header cut short, an "encrypted" flag bit, and
# OSError(EINVAL) when a damaged offset makes it seek before the start of the file.
_ZIP_DATA_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OverflowError,
)
_WEIGHTS_MEMBERS = ("model.weights.h5", "model.weights.npz")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_archive(path: str) -> None:
    """Raises unless `path` is a complete, undamaged `.keras` archive.

    Every member is read once (its CRC checked by `zipfile`) and hashed; with a
    manifest (files saved by `save_model`), the members must be exactly those
    recorded, with the recorded sizes and SHA-256. In every case `config.json`
    must be a JSON object, the weights a readable HDF5 (or npz) member, each
    `.npy` asset a complete non-object array, and each index asset pair (the
    embeddings and ids of a `BruteForceIndex`) must agree: one unique integer
    or string id per finite embedding row.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Cannot load a model from {path}: no such file.")
    advice = "Save the model again, or restore the file from a copy."

    def damaged(reason: str) -> ValueError:
        return ValueError(
            f"Cannot load a model from {path}: the file is truncated or corrupt (or was "
            f"edited): {reason}. {advice}"
        )

    # Opened first, so that an unreadable file (permissions, a folder) raises as itself.
    with open(path, "rb") as handle:
        try:
            archive = zipfile.ZipFile(handle)
        except _ZIP_DATA_ERRORS as error:
            raise ValueError(
                f"Cannot load a model from {path}: the file is truncated or corrupt. A "
                f"`.keras` file is a zip archive, and this is not a valid one ({error}). "
                f"{advice}"
            ) from error
        with archive:
            manifest = _manifest.read_manifest(archive.comment, damaged)
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                twice = sorted({name for name in names if names.count(name) > 1})
                raise damaged(f"it holds the members {twice} twice")
            if manifest is not None:
                missing = sorted(set(manifest) - set(names))
                if missing:
                    raise damaged(f"its member {missing[0]!r} is missing")
                extra = sorted(set(names) - set(manifest))
                if extra:
                    raise damaged(
                        f"its member {extra[0]!r} was not written by save_model (added later)"
                    )
            for info in infos:
                _check_member(handle, archive, info, manifest, damaged)
            if CONFIG_MEMBER not in names:
                raise ValueError(
                    f"Cannot load a model from {path}: it is a zip archive but not a Keras "
                    f"model file: it lacks {CONFIG_MEMBER!r} (members: {sorted(names)}). It "
                    f"may be truncated or corrupt. {advice}"
                )
            _check_structure(archive, names, hashed=manifest is not None, damaged=damaged)


def _check_member(
    handle: Any,
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    manifest: dict[str, Any] | None,
    damaged: Callable[[str], ValueError],
) -> None:
    """Reads one member whole and compares it with the manifest (without a manifest,
    through `zipfile`, which checks its CRC)."""
    try:
        size, digest = _manifest.member_digest(handle, archive, info, direct=manifest is not None)
    except _ZIP_DATA_ERRORS as error:
        raise damaged(f"its member {info.filename!r} cannot be read whole ({error})") from error
    if manifest is None:
        return
    recorded_size, recorded_hash = manifest[info.filename]
    if size != recorded_size:
        raise damaged(
            f"its member {info.filename!r} holds {size} bytes, {recorded_size} recorded at save"
        )
    if digest != recorded_hash:
        raise damaged(
            f"its member {info.filename!r} differs from what was saved (SHA-256 mismatch)"
        )


def _check_structure(
    archive: zipfile.ZipFile, names: list[str], hashed: bool, damaged: Callable[[str], ValueError]
) -> None:
    """Checks that Keras can read the config, the weights and the `.npy` assets."""
    try:
        config = json.loads(archive.read(CONFIG_MEMBER))
    except ValueError as error:
        raise damaged(f"its member {CONFIG_MEMBER!r} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise damaged(
            f"its member {CONFIG_MEMBER!r} holds a {type(config).__name__}, not a model config"
        )
    weights = [name for name in _WEIGHTS_MEMBERS if name in names]
    if not weights:
        raise damaged(f"it has no weights member (one of {list(_WEIGHTS_MEMBERS)})")
    if weights[0].endswith(".h5"):
        # With a manifest the SHA-256 already matched the bytes Keras wrote: the
        # signature suffices (opening it with h5py reads the member through once more).
        _check_hdf5(archive, weights[0], damaged, open_it=not hashed)
    arrays = {}
    for name in names:
        if name.endswith(".npy"):
            arrays[name] = _npy_header(archive, name, damaged)
    # Imported here, not with the module, so that `two_tower.saving` (whose file
    # helpers the datasets use) does not depend on the retrieval package at import.
    from two_tower.retrieval import brute_force_index

    embeddings_suffix = "/" + brute_force_index._EMBEDDINGS_FILE
    ids_suffix = "/" + brute_force_index._IDS_FILE
    folders = {
        name[: -len(suffix)]
        for name in arrays
        for suffix in (embeddings_suffix, ids_suffix)
        if name.endswith(suffix)
    }
    for folder in sorted(folders):
        _check_index_assets(
            archive, folder + embeddings_suffix, folder + ids_suffix, arrays, hashed, damaged
        )


def _check_hdf5(
    archive: zipfile.ZipFile, name: str, damaged: Callable[[str], ValueError], open_it: bool
) -> None:
    with archive.open(name) as member:
        if member.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
            raise damaged(f"its weights member {name!r} is not an HDF5 file")
    if not open_it:
        return
    try:
        import h5py
    except ImportError:  # pragma: no cover - Keras depends on h5py
        return
    try:
        with archive.open(name) as member, h5py.File(member, "r"):
            pass  # opening reads the superblock, which records the file's length
    except (OSError, ValueError) as error:
        raise damaged(
            f"its weights member {name!r} is not a readable HDF5 file ({error})"
        ) from error


def _npy_header(
    archive: zipfile.ZipFile, name: str, damaged: Callable[[str], ValueError]
) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a `.npy` member, after checking its length matches them."""
    info = archive.getinfo(name)
    try:
        with archive.open(name) as member:
            shape, _, dtype = _read_npy_header(member)
            header_bytes = member.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        raise damaged(f"its member {name!r} is not a NumPy array file ({error})") from error
    if dtype.hasobject:
        raise damaged(f"its member {name!r} holds Python objects, not numbers or strings")
    expected = header_bytes + int(np.prod(shape, dtype="int64")) * dtype.itemsize
    if info.file_size != expected:
        raise damaged(
            f"its member {name!r} holds {info.file_size} bytes but its header, an array of "
            f"shape {shape} and dtype {dtype}, needs {expected}"
        )
    return tuple(shape), dtype


def _check_index_assets(
    archive: zipfile.ZipFile,
    embeddings_name: str,
    ids_name: str,
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
    hashed: bool,
    damaged: Callable[[str], ValueError],
) -> None:
    """The saved catalogue of a `BruteForceIndex`: rows and ids that agree."""
    for name, other in ((embeddings_name, ids_name), (ids_name, embeddings_name)):
        if name not in arrays:
            raise damaged(f"its member {name!r} is missing (its pair {other!r} is there)")
    shape, dtype = arrays[embeddings_name]
    if len(shape) != 2 or dtype.kind not in "iuf" or shape[1] == 0:
        raise damaged(
            f"its member {embeddings_name!r} must hold a numeric [candidates, dim] array; it "
            f"holds shape {shape}, dtype {dtype}"
        )
    with archive.open(ids_name) as member:
        ids = np.load(member, allow_pickle=False)
    if ids.ndim != 1 or len(ids) != shape[0]:
        raise damaged(
            f"its member {ids_name!r} holds ids of shape {ids.shape} for the {shape[0]} rows "
            f"of {embeddings_name!r} (one id per row expected)"
        )
    from two_tower.retrieval import _candidate_ids

    try:
        _candidate_ids.checked_ids(ids, shape[0])
    except ValueError as error:
        raise damaged(f"its member {ids_name!r} is not a valid id list: {error}") from error
    if not hashed:  # with a manifest, the rows are those saved, which were finite
        _check_finite(archive, embeddings_name, shape, dtype, damaged)


def _read_npy_header(member: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the header of an open `.npy` stream."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f".npy format version {version} is not one NumPy writes for numbers")


def _check_finite(
    archive: zipfile.ZipFile,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    damaged: Callable[[str], ValueError],
) -> None:
    """Streams the rows of a `.npy` member, a block at a time, for NaN or infinity."""
    with archive.open(name) as member:
        _read_npy_header(member)
        row_bytes = shape[1] * dtype.itemsize
        rows_per_block = max(1, _manifest.READ_BLOCK // row_bytes)
        while block := member.read(rows_per_block * row_bytes):
            if not np.isfinite(np.frombuffer(block, dtype)).all():
                raise damaged(f"its member {name!r} holds NaN or infinite embeddings")
