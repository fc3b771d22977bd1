"""Exporting a trained `TwoTowerRetrieval` to serve outside Python: TF SavedModel and ONNX.

`TwoTowerRetrieval.export` gathers the plan (`_plan`), and the backend writes it
(`BackendModule.export_artefact`: TensorFlow traces the query tower, in this
process or a child one). Here: the artefact is written beside its target and
moved into place only once complete, so a failed export leaves the target as it
was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras

from two_tower.backends import backend_module
from two_tower.export._plan import ExportPlan


def _data_files(onnx: Path) -> set[Path]:
    """The external-data files of exports of `onnx` (`<name>.<token>.data`)."""
    return set(onnx.parent.glob(f"{onnx.name}.*.data"))


def _check_target(target: Path, format: str) -> None:
    """Refuses a target whose replacement could destroy something that is not an artefact."""
    if format == "tf_saved_model":
        if target.exists() and not target.is_dir():
            raise ValueError(
                f"A SavedModel is a folder, but {str(target)!r} is a file. Choose another path."
            )
        if target.is_dir() and any(target.iterdir()) and not (target / "saved_model.pb").exists():
            held = sorted(p.name for p in target.iterdir())[:5]
            raise ValueError(
                f"{str(target)!r} exists and is not a SavedModel (it holds {held}): export "
                "replaces the folder it is given, so it refuses this one. Give the version "
                "folder itself, e.g. serving/retrieval/1."
            )
    elif target.suffix != ".onnx" or target.is_dir():
        raise ValueError(
            f"An ONNX model is a file whose name ends in .onnx. Received {str(target)!r}"
        )


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """Yields a path beside `target` to write; moves what was written there over `target`.

    A SavedModel is a folder: the old one is renamed aside, the new one renamed in
    (the old one back if that fails), then the old one removed. An ONNX file's
    external data, when it has some, has a name of its own (`<name>.<token>.data`):
    it is moved in first, the file replaces the old one in one rename, and the data
    of earlier exports is removed last.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staged = folder / target.name
        yield staged
        if staged.is_dir():
            old = folder / "old"
            if target.exists():
                os.replace(target, old)
            try:
                os.replace(staged, target)
            except BaseException:
                if old.exists():
                    os.replace(old, target)
                raise
        else:
            earlier = _data_files(target)
            for data in _data_files(staged):
                os.replace(data, target.parent / data.name)
            os.replace(staged, target)
            for data in earlier:
                data.unlink(missing_ok=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_artefact(model: keras.Model, plan: ExportPlan, filepath: Any, format: str) -> Path:
    """Writes `format`'s artefact of `model` at `filepath`, atomically; returns the path."""
    target = Path(os.fspath(filepath)).absolute()
    _check_target(target, format)
    with _staged(target) as staged:
        backend_module().export_artefact(model, plan, str(staged), format)
    return target
