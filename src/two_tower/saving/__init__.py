"""Atomic `.keras` saves, and loads that say clearly when a file is damaged.

`keras.saving.save_model` writes straight into the target file. If the process
dies half-way (killed, out of memory, a full disk), the previous model is gone and
what is left is a truncated archive. `save_model` here writes a hidden temporary
file in the same folder and renames it over the target only once it is complete,
so the target always holds either the previous model or the new one.

`keras.saving.load_model` reports a truncated `.keras` file as "File not found"
although the file exists, and a damaged member (a cut `config.json`, garbage
weights, a truncated index asset) with messages that do not name it. `save_model`
here records a manifest in the archive's comment (every member's size and
SHA-256; Keras ignores the comment), and `load_model` checks the whole archive
against it before Keras reads anything, naming the damaged member.

Only local `.keras` files get this treatment. Other saves and loads (legacy `.h5`,
`zipped=False` folders, remote paths such as `gs://` or `hf://`) go to Keras, after
a check that a local path exists. `TwoTowerRetrieval.save` goes through `save_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np

from two_tower.retrieval import brute_force_index

# Keras' `file_utils.is_remote_path`: paths that are not on the local file system.
_REMOTE_PATH = re.compile(r"^(/cns|/cfs|/gcs|/hdfs|/readahead|/placer|/tfhub|.*://)")
# The member holding the model's config, without which Keras cannot load a `.keras` file.
_CONFIG_MEMBER = "config.json"
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
_ATTEMPTS = 100
# The manifest, in the zip comment: {"two_tower_manifest": 1, "members": {name: [size, sha256]}}.
_MANIFEST_KEY = "two_tower_manifest"
_MAX_COMMENT = 65535  # the zip format's limit
_WEIGHTS_MEMBERS = ("model.weights.h5", "model.weights.npz")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_READ_BLOCK = 2**20
# A zip local file header: signature, versions, flags, method, time, date, CRC,
# sizes, then the lengths of the name and of the extra field that follow it.
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def _local_keras_file(filepath: Any, zipped: bool | None) -> str | None:
    """`filepath` as a str if it names a local `.keras` zip file, else None."""
    if zipped is False or not isinstance(filepath, (str, os.PathLike)):
        return None
    path = os.fspath(filepath)
    if not isinstance(path, str) or not path.endswith(".keras") or _REMOTE_PATH.match(path):
        return None
    return path


def _create_temporary(target: str) -> str:
    """Creates an empty hidden file beside `target`; returns its path.

    Keras checks the suffix, so the name ends with `.keras`:
    `.model.keras.tmp-<random>.keras`. A new file gets the permissions the umask
    gives any new file (`os.open` applies it, unlike `mkstemp`'s 0600); replacing
    a file keeps that file's permissions, as writing it in place would.
    """
    folder, name = os.path.split(target)
    for _ in range(_ATTEMPTS):
        temporary = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(4)}.keras")
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        try:
            if os.path.isfile(target):
                os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        except BaseException:
            os.unlink(temporary)
            raise
        return temporary
    raise FileExistsError(
        f"Could not create a temporary file beside {target}: {_ATTEMPTS} random names "
        f"of the form .{name}.tmp-<random>.keras were all taken."
    )


def _fsync(path: str, flags: int) -> None:
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def save_model(
    model: keras.Model,
    filepath: str | os.PathLike[str],
    overwrite: bool = True,
    zipped: bool | None = None,
    **kwargs: Any,
) -> None:
    """Saves `model` like `keras.saving.save_model`, atomically for `.keras` files.

    The model is written to a hidden temporary file in the folder of `filepath`
    (`.<name>.tmp-<random>.keras`), flushed to disk, then renamed over
    `filepath` with `os.replace`. If saving fails or the process dies on the
    way, `filepath` still holds the previous file, unchanged; on an exception
    the temporary file is removed. A killed process leaves it behind, hidden;
    the next successful save of `filepath` removes it (so one process at a
    time may save to a path).
    Saving through a symbolic link replaces the file it points to, and a
    replaced file keeps its permissions.

    The archive's comment records a manifest: the size and SHA-256 of every
    member, which `load_model` checks (it costs one more read of the new
    file). Only local `.keras` files are saved atomically. Other paths (legacy
    `.h5`, `zipped=False` folders, remote paths) are passed to
    `keras.saving.save_model` unchanged, and so is `overwrite=False` when
    `filepath` exists: Keras then asks whether to overwrite, and writes in
    place if told to.

    Args:
        model: the Keras model to save.
        filepath: where to save it; a `.keras` path for an atomic save.
        overwrite: replace an existing file without asking.
        zipped: as in `keras.saving.save_model`; `False` saves a folder (not
            atomically).
        **kwargs: further arguments of `keras.saving.save_model`.

    Raises:
        FileNotFoundError: the folder of `filepath` does not exist.
        ValueError: as `keras.saving.save_model`, e.g. on an unsupported suffix.

    Examples:
        >>> import os, tempfile, keras, numpy as np
        >>> model = two_tower.TwoTowerRetrieval(
        ...     keras.layers.Embedding(9, 4), keras.layers.Embedding(40, 4)
        ... )
        >>> _ = model.embed_queries(np.arange(2))  # builds the query tower's weights
        >>> model.index_candidates(np.arange(40))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "model.keras")
        ...     two_tower.saving.save_model(model, path)
        ...     restored = two_tower.saving.load_model(path)
        ...     leftovers = sorted(os.listdir(folder))
        >>> leftovers
        ['model.keras']
        >>> users = np.arange(3)
        >>> bool((restored.recommend(users, k=5) == model.recommend(users, k=5)).all())
        True
    """
    target = _local_keras_file(filepath, zipped)
    if target is None or (not overwrite and os.path.exists(target)):
        keras.saving.save_model(model, filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        return
    # Replace the file a link points to, not the link, as writing in place would.
    target = os.path.realpath(target)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot save the model to {os.fspath(filepath)}: the folder {folder} does not "
            "exist. Create it first."
        )
    temporary = _create_temporary(target)
    try:
        keras.saving.save_model(model, temporary, overwrite=True, zipped=zipped, **kwargs)
        _write_manifest(temporary)
        # Flushed before the rename, so that a crash cannot leave a renamed but empty file.
        _fsync(temporary, os.O_RDWR)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if os.name == "posix":  # records the rename itself; folders cannot be opened on Windows
        with contextlib.suppress(OSError):
            _fsync(folder, os.O_RDONLY)
    _remove_temporaries(target)


def _remove_temporaries(target: str) -> None:
    """Removes the hidden temporaries that killed saves of `target` left behind."""
    folder, name = os.path.split(target)
    pattern = re.compile(re.escape(f".{name}.tmp-") + r"[0-9a-f]{8}\.keras")
    for leftover in os.listdir(folder):
        if pattern.fullmatch(leftover):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, leftover))


def _write_manifest(path: str) -> None:
    """Records every member's size and SHA-256 in the zip comment of `path`."""
    members = {}
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            _, digest = _member_digest(handle, archive, info, direct=True)
            members[info.filename] = [info.file_size, digest]
    with zipfile.ZipFile(path, "a") as archive:
        comment = json.dumps({_MANIFEST_KEY: 1, "members": members}, separators=(",", ":")).encode()
        if len(comment) > _MAX_COMMENT:  # about 700 members
            warnings.warn(
                f"{path}: {len(members)} members do not fit a manifest in the zip comment "
                f"({len(comment)} bytes, at most {_MAX_COMMENT}); saved without one, so "
                "load_model cannot check their hashes.",
                stacklevel=3,
            )
            return
        archive.comment = comment


def _read_manifest(
    comment: bytes, damaged: Callable[[str], ValueError]
) -> dict[str, list[Any]] | None:
    """The members recorded at save, or None for a file without a manifest."""
    if not comment.lstrip().startswith(b'{"' + _MANIFEST_KEY.encode()):
        return None  # saved before manifests, or by Keras itself
    try:
        manifest = json.loads(comment)
        members = manifest["members"]
        if not isinstance(members, dict) or not all(
            isinstance(v, list) and len(v) == 2 for v in members.values()
        ):
            raise ValueError("members must map names to [size, sha256]")
    except (ValueError, KeyError, TypeError) as error:
        raise damaged(
            f"its manifest (the zip comment written by save_model) is damaged ({error})"
        ) from error
    return members


def _check_archive(path: str) -> None:
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
            manifest = _read_manifest(archive.comment, damaged)
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
            if _CONFIG_MEMBER not in names:
                raise ValueError(
                    f"Cannot load a model from {path}: it is a zip archive but not a Keras "
                    f"model file: it lacks {_CONFIG_MEMBER!r} (members: {sorted(names)}). It "
                    f"may be truncated or corrupt. {advice}"
                )
            _check_structure(archive, names, hashed=manifest is not None, damaged=damaged)


def _stored_blocks(handle: Any, info: zipfile.ZipInfo) -> Iterator[bytes] | None:
    """The bytes of a stored (uncompressed) member read straight from the file, or None.

    `zipfile` computes each member's CRC-32 as it reads, which costs more than the
    SHA-256 itself (0.24 s against 0.16 s for 300 MB here); where the manifest's
    SHA-256 is checked, the CRC adds nothing. None where the local header is not
    as expected: the caller then reads through `zipfile`.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != b"PK\x03\x04":
        return None
    handle.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])

    def blocks() -> Iterator[bytes]:
        left = info.file_size
        while left > 0 and (block := handle.read(min(_READ_BLOCK, left))):
            left -= len(block)
            yield block

    return blocks()


def _member_digest(
    handle: Any, archive: zipfile.ZipFile, info: zipfile.ZipInfo, direct: bool
) -> tuple[int, str]:
    """(bytes read, SHA-256) of a member: straight from the file where `direct` and it
    is stored, else through `zipfile` (which also checks its CRC)."""
    digest = hashlib.sha256()
    size = 0
    with contextlib.ExitStack() as stack:
        blocks = _stored_blocks(handle, info) if direct else None
        if blocks is None:
            member = stack.enter_context(archive.open(info))
            blocks = iter(lambda: member.read(_READ_BLOCK), b"")
        for block in blocks:
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


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
        size, digest = _member_digest(handle, archive, info, direct=manifest is not None)
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
        config = json.loads(archive.read(_CONFIG_MEMBER))
    except ValueError as error:
        raise damaged(f"its member {_CONFIG_MEMBER!r} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise damaged(
            f"its member {_CONFIG_MEMBER!r} holds a {type(config).__name__}, not a model config"
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
    try:
        brute_force_index._checked_ids(ids, shape[0])
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
        rows_per_block = max(1, _READ_BLOCK // row_bytes)
        while block := member.read(rows_per_block * row_bytes):
            if not np.isfinite(np.frombuffer(block, dtype)).all():
                raise damaged(f"its member {name!r} holds NaN or infinite embeddings")


def load_model(filepath: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Loads a model like `keras.saving.load_model`, checking `.keras` files first.

    A local `.keras` file is checked as a whole before Keras reads it, and a
    `ValueError` names the file and the damaged member:

    - the file is not a complete zip archive, or a member fails its CRC;
    - (files saved by `save_model`, which records a manifest) a member is
      missing, added, or differs in size or SHA-256 from what was saved;
    - `config.json` is not a JSON object; the weights are not a readable
      HDF5 member; a `.npy` asset is cut, holds objects, or an index's ids
      and embeddings disagree (count, unique integer or string ids, finite
      rows).

    Files saved without a manifest (by `keras.saving.save_model`, or by
    two_tower before manifests) still load, with every check but the
    manifest's. Other paths go to `keras.saving.load_model` once a local one
    is known to exist. The check reads the whole file once more (the load
    then takes about 1.35 times Keras' own: "Integrity checks" on the
    benchmarks page).

    Args:
        filepath: the saved model: a `.keras` file, or what Keras accepts.
        **kwargs: arguments of `keras.saving.load_model` (`custom_objects`,
            `compile`, `safe_mode`).

    Returns:
        The loaded model.

    Raises:
        FileNotFoundError: a local `filepath` that does not exist.
        ValueError: a `.keras` file that is truncated, corrupt, edited or not
            a Keras archive (the message names the member), or a `.keras`
            folder without `config.json`.

    Examples:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "model.keras")
        ...     with open(path, "wb") as handle:
        ...         _ = handle.write(b"PK\\x03\\x04 cut short")
        ...     two_tower.saving.load_model(path)
        Traceback (most recent call last):
        ...
        ValueError: Cannot load a model from .../model.keras: the file is truncated or corrupt. ...
    """
    path = _local_keras_file(filepath, zipped=None)
    if path is not None and os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, _CONFIG_MEMBER)):
            raise ValueError(
                f"Cannot load a model from {path}: it is a folder without {_CONFIG_MEMBER}, "
                "not a model saved with zipped=False. Pass the `.keras` file itself."
            )
    elif path is not None:
        _check_archive(path)
    elif isinstance(filepath, (str, os.PathLike)):
        local = os.fspath(filepath)
        if isinstance(local, str) and not _REMOTE_PATH.match(local) and not os.path.exists(local):
            raise FileNotFoundError(f"Cannot load a model from {local}: no such file.")
    return keras.saving.load_model(filepath, **kwargs)


__all__ = ["load_model", "save_model"]


def _loadable_compile_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved `TwoTowerRetrieval` compile config, deserialized for this backend.

    Used by `TwoTowerRetrieval.compile_from_config`; warns about what it changes.
    """
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("module", "")).startswith(
        "keras.src.backend."
    ):
        # Keras on torch swaps `keras.optimizers.Adam` (and others) for a class of
        # its own torch backend, and saves that class's module. Loaded on JAX or
        # TensorFlow, that class runs torch ops on their arrays; resolve the
        # public optimizer of the same name instead.
        config = {**config, "optimizer": {**optimizer, "module": "keras.optimizers"}}
    config = keras.saving.deserialize_keras_object(config)
    metric_names = config.pop("retrieval_metric_names", None)
    if metric_names:
        warnings.warn(
            f"This model was compiled with FactorizedTopK metrics {metric_names}, which "
            "are not saved with it (their exclusion tables can be as large as the "
            "training data). It is compiled without them; to evaluate, compile again "
            "with the metrics.",
            stacklevel=4,
        )
    steps = config.get("steps_per_execution", 1)
    if keras.backend.backend() == "torch" and steps != 1:
        # Saved on JAX or TensorFlow with defaults.steps_per_execution() (16);
        # Keras on torch rejects anything but 1, which would make the file
        # unloadable here. Training semantics do not depend on it.
        warnings.warn(
            f"This model was compiled with steps_per_execution={steps}, which Keras "
            "does not support on torch; it is compiled with steps_per_execution=1 "
            "here (two_tower.defaults.steps_per_execution() gives 1 on torch).",
            stacklevel=4,
        )
        config["steps_per_execution"] = 1
    return config
