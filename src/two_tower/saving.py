"""Atomic `.keras` saves, and loads that say clearly when a file is damaged.

`keras.saving.save_model` writes straight into the target file. If the process
dies half-way (killed, out of memory, a full disk), the previous model is gone and
what is left is a truncated archive. `save_model` here writes a hidden temporary
file in the same folder and renames it over the target only once it is complete,
so the target always holds either the previous model or the new one.

`keras.saving.load_model` reports a truncated `.keras` file as "File not found"
although the file exists. `load_model` here checks the archive first and names the
file, saying that it is truncated or corrupt.

Only local `.keras` files get this treatment. Other saves and loads (legacy `.h5`,
`zipped=False` folders, remote paths such as `gs://` or `hf://`) go to Keras, after
a check that a local path exists. `TwoTowerRetrieval.save` goes through `save_model`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import warnings
import zipfile
import zlib
from typing import Any

import keras

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
    the temporary file is removed (a killed process can leave it behind, hidden).
    Saving through a symbolic link replaces the file it points to, and a
    replaced file keeps its permissions.

    Only local `.keras` files are saved atomically. Other paths (legacy
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


def _check_archive(path: str) -> None:
    """Raises unless `path` is a complete zip archive holding a Keras config."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Cannot load a model from {path}: no such file.")
    advice = "Save the model again, or restore the file from a copy."
    # Opened first, so that an unreadable file (permissions, a folder) raises as itself.
    with open(path, "rb") as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                bad_member = archive.testzip()
                members = archive.namelist()
        except _ZIP_DATA_ERRORS as error:
            raise ValueError(
                f"Cannot load a model from {path}: the file is truncated or corrupt. A "
                f"`.keras` file is a zip archive, and this is not a valid one ({error}). "
                f"{advice}"
            ) from error
    if bad_member is not None:
        raise ValueError(
            f"Cannot load a model from {path}: the file is truncated or corrupt. Its member "
            f"{bad_member!r} fails its CRC check. {advice}"
        )
    if _CONFIG_MEMBER not in members:
        raise ValueError(
            f"Cannot load a model from {path}: it is a zip archive but not a Keras model "
            f"file: it lacks {_CONFIG_MEMBER!r} (members: {sorted(members)}). It may be "
            f"truncated or corrupt. {advice}"
        )


def load_model(filepath: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Loads a model like `keras.saving.load_model`, checking `.keras` files first.

    A local `.keras` file is read once through `zipfile` before Keras loads
    it: a truncated file, a damaged one (a member fails its CRC) or one that
    is not a Keras archive raises a `ValueError` that names it. Other paths go
    to `keras.saving.load_model` once a local one is known to exist. The check
    reads the whole file once more; its cost is small beside loading the
    weights.

    Args:
        filepath: the saved model: a `.keras` file, or what Keras accepts.
        **kwargs: arguments of `keras.saving.load_model` (`custom_objects`,
            `compile`, `safe_mode`).

    Returns:
        The loaded model.

    Raises:
        FileNotFoundError: a local `filepath` that does not exist.
        ValueError: a `.keras` file that is truncated, corrupt or not a Keras
            archive, or a `.keras` folder without `config.json`.

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
