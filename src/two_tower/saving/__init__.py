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

import os
import re
from typing import Any

import keras

from two_tower.saving import _checks, _files, _manifest

# Keras' `file_utils.is_remote_path`: paths that are not on the local file system.
_REMOTE_PATH = re.compile(r"^(/cns|/cfs|/gcs|/hdfs|/readahead|/placer|/tfhub|.*://)")


def _local_keras_file(filepath: Any, zipped: bool | None) -> str | None:
    """`filepath` as a str if it names a local `.keras` zip file, else None."""
    if zipped is False or not isinstance(filepath, (str, os.PathLike)):
        return None
    path = os.fspath(filepath)
    if not isinstance(path, str) or not path.endswith(".keras") or _REMOTE_PATH.match(path):
        return None
    return path


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
    with _files.replacing(target) as temporary:
        keras.saving.save_model(model, temporary, overwrite=True, zipped=zipped, **kwargs)
        _manifest.write_manifest(temporary)


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
        if not os.path.isfile(os.path.join(path, _checks.CONFIG_MEMBER)):
            raise ValueError(
                f"Cannot load a model from {path}: it is a folder without {_checks.CONFIG_MEMBER}, "
                "not a model saved with zipped=False. Pass the `.keras` file itself."
            )
    elif path is not None:
        _checks.check_archive(path)
    elif isinstance(filepath, (str, os.PathLike)):
        local = os.fspath(filepath)
        if isinstance(local, str) and not _REMOTE_PATH.match(local) and not os.path.exists(local):
            raise FileNotFoundError(f"Cannot load a model from {local}: no such file.")
    return keras.saving.load_model(filepath, **kwargs)


__all__ = ["load_model", "save_model"]
