"""`export_artefact` on JAX and torch: the artefact is written by a TensorFlow process.

TensorFlow SavedModels and tf2onnx's ONNX need the query tower traced by
TensorFlow. Keras runs one backend per process, so the model is saved to a
`.keras` file (which loads on every backend) and a child process with
`KERAS_BACKEND=tensorflow` loads it and writes the artefact
(`python -m two_tower.export`). The artefact is then the same whichever backend
trained the model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import keras

from two_tower.export._plan import ExportPlan

_STDERR_TAIL = 4000


def _classes(model: keras.Model) -> list[type]:
    """The classes of `model` and of every layer inside it, once each."""
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]  # noqa: SLF001
    return list(dict.fromkeys(type(layer) for layer in layers))


def unimportable_classes(model: keras.Model) -> list[str]:
    """The classes of `model`'s layers (and its own) that a new process cannot import."""
    found = []
    for cls in _classes(model):
        module = cls.__module__
        # A class made inside a function exists (and is registered) only once it runs.
        local = "<locals>" in cls.__qualname__
        if local or module == "__main__" or importlib.util.find_spec(module.split(".")[0]) is None:
            found.append(f"{module}.{cls.__qualname__}")
    return found


def modules_to_import(model: keras.Model) -> list[str]:
    """The modules defining `model`'s classes, other than Keras' and two_tower's.

    Keras' loader imports only its own packages' modules, so the child imports
    these first: that registers the user's classes before the `.keras` file loads.
    """
    modules = {cls.__module__ for cls in _classes(model)}
    return sorted(m for m in modules if m.split(".")[0] not in ("keras", "two_tower"))


def export_artefact(model: keras.Model, plan: ExportPlan, path: str, format: str) -> None:
    """Writes the artefact at `path` from a TensorFlow process (see the module docstring)."""
    classes = unimportable_classes(model)
    if classes:
        raise ValueError(
            f"export runs the model in a TensorFlow process, which must import every layer "
            f"class by its module; these are defined where it cannot: {classes}. Move them "
            "to a module of your project (registered with "
            "`keras.saving.register_keras_serializable`), or export with KERAS_BACKEND="
            "tensorflow, which exports in this process."
        )
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            "export writes TensorFlow graphs (SavedModel, and ONNX through tf2onnx), so it "
            'needs TensorFlow beside this backend: pip install "two-tower[export]".'
        )
    # Beside the artefact being written (not in /tmp, which may be small): the caller
    # removes the whole staging folder afterwards.
    with tempfile.TemporaryDirectory(prefix=".model-", dir=os.path.dirname(path)) as folder:
        saved = os.path.join(folder, "model.keras")
        model.save(saved)
        paths = [p for p in sys.path if p]
        environment = dict(
            os.environ,
            KERAS_BACKEND="tensorflow",
            CUDA_VISIBLE_DEVICES="",  # tracing needs no GPU; the parent may hold it
            PYTHONPATH=os.pathsep.join(paths),
            TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        )
        command = [
            sys.executable,
            "-m",
            "two_tower.export",
            saved,
            path,
            format,
            json.dumps(plan.options()),
            json.dumps(modules_to_import(model)),
        ]
        result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(
            f"The TensorFlow process that writes the {format} artefact failed (exit code "
            f"{result.returncode}). Its error output ends with:\n"
            f"{result.stderr[-_STDERR_TAIL:]}"
        )


def run_child(arguments: list[str]) -> None:
    """The child's side: load the `.keras` file and write the artefact in this process."""
    saved, path, format, options, modules = arguments
    from two_tower import saving  # Keras is imported here, on TensorFlow

    for module in json.loads(modules):  # registers the user's layer classes
        importlib.import_module(module)
    model = saving.load_model(saved)
    model.export(path, format=format, verbose=False, **json.loads(options))
