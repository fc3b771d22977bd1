"""Importing two_tower with a configured but missing backend fails clearly."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from two_tower.backends import _installed

MISSING = [
    name for name in ("jax", "tensorflow", "torch") if importlib.util.find_spec(name) is None
]


@pytest.mark.skipif(
    not MISSING, reason="all three backends are installed here; each nox session has only one"
)
def test_missing_backend_raises_a_clear_import_error():
    env = dict(os.environ, KERAS_BACKEND=MISSING[0])
    completed = subprocess.run(
        [sys.executable, "-c", "import two_tower"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    assert f"configured to use the '{MISSING[0]}' backend" in completed.stderr
    assert "KERAS_BACKEND" in completed.stderr


def test_configured_backend_reads_env_then_keras_json(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert _installed.configured_backend() == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert _installed.configured_backend() == "tensorflow"  # Keras' own default
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    assert _installed.configured_backend() == "jax"
