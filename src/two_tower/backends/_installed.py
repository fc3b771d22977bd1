"""Checks, before Keras is imported, that the configured backend is installed.

Keras falls back to TensorFlow when no backend is configured; without TensorFlow
installed that fails deep inside Keras with an unrelated-looking import error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

_MODULES = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch", "numpy": "numpy"}


def configured_backend() -> str:
    """The backend Keras will use: `$KERAS_BACKEND`, then keras.json, then tensorflow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as handle:
            return str(json.load(handle).get("backend", "tensorflow"))
    except (OSError, ValueError):
        return "tensorflow"


def check_backend_installed() -> None:
    """Raises ImportError naming the fix when the configured backend is missing."""
    if "keras" in sys.modules:
        return  # Keras is already imported: its backend is settled.
    backend = configured_backend()
    module = _MODULES.get(backend)
    if module is not None and importlib.util.find_spec(module) is None:
        installed = [
            name for name in ("jax", "tensorflow", "torch") if importlib.util.find_spec(name)
        ]
        raise ImportError(
            f"Keras is configured to use the {backend!r} backend"
            + ("" if os.environ.get("KERAS_BACKEND") else " (its default)")
            + f", but {module} is not installed. Installed backends: {installed or 'none'}. "
            "Set KERAS_BACKEND (e.g. KERAS_BACKEND=jax) before importing two_tower, "
            "or install a backend: pip install jax (or torch, or tensorflow)."
        )
