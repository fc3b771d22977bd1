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

import keras

from two_tower.backends import backend_module
from two_tower.export._plan import ExportPlan


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """Yields a path beside `target` to write; moves what was written there over `target`.

    A SavedModel is a folder: the old one is renamed aside, the new one renamed
    in, the old one removed. An ONNX file (and its `.data`, when it has one)
    replaces the old file(s) one by one, the data first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staged = folder / target.name
        yield staged
        if staged.is_dir():
            old = None
            if target.exists() or target.is_symlink():
                old = folder / "old"
                os.replace(target, old)
            os.replace(staged, target)
        else:
            data = staged.with_name(staged.name + ".data")
            old_data = target.with_name(target.name + ".data")
            has_data = data.exists()
            if has_data:
                os.replace(data, old_data)
            os.replace(staged, target)
            if not has_data and old_data.exists():
                old_data.unlink()  # an earlier export's, which this one does not use
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_artefact(model: keras.Model, plan: ExportPlan, filepath: str, format: str) -> Path:
    """Writes `format`'s artefact of `model` at `filepath`, atomically; returns the path."""
    target = Path(os.fspath(filepath)).absolute()
    if format == "tf_saved_model" and target.exists() and not target.is_dir():
        raise ValueError(
            f"A SavedModel is a folder, but {str(target)!r} is a file. Choose another path."
        )
    if format == "onnx" and target.is_dir():
        raise ValueError(
            f"An ONNX model is a file, but {str(target)!r} is a folder. Choose a file path "
            "(e.g. retrieval.onnx)."
        )
    with _staged(target) as staged:
        backend_module().export_artefact(model, plan, str(staged), format)
    return target
