"""Test setup shared by every backend session.

The backend is chosen by `KERAS_BACKEND` before Keras is imported (the nox session
sets it); the same files run under each backend.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Keras imports torch first when it is installed, to avoid a known segfault when
# TensorFlow-linked libraries load before it.
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

# The tests-multidevice session splits the CPU into logical TensorFlow devices,
# which must happen before TensorFlow initialises its runtime (Keras' import).
_LOGICAL_CPUS = int(os.environ.get("TWO_TOWER_LOGICAL_CPUS", "0"))
if _LOGICAL_CPUS > 1 and os.environ.get("KERAS_BACKEND") == "tensorflow":
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * _LOGICAL_CPUS,
    )

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Runs the tests marked `slow` first, each group in its collected order.

    The nox sessions spread the suite over workers (pytest-xdist); a test of a minute
    handed out last would leave the other workers idle while it runs.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    # Keras' global state (layer names, the seed) reset for every test. Without
    # `free_memory=False`, clear_session also runs a full `gc.collect()`, 100-170 ms
    # per test with a backend loaded: 2-3 minutes of each session. Python's own
    # collector still runs, and nothing here needs memory freed at once.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1337)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real MovieLens 100K folder, from `TWO_TOWER_DATA_DIR`.

    Skips when the data is absent, except in CI (`CI` set), where it must run.
    """
    root = os.environ.get("TWO_TOWER_DATA_DIR")
    folder = Path(root) / "ml-100k" if root else None
    if folder is None or not (folder / "u.data").is_file():
        message = (
            "the real MovieLens 100K is not available: set TWO_TOWER_DATA_DIR to a "
            f"folder holding ml-100k/ (TWO_TOWER_DATA_DIR={root!r})"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so real-data tests must run, but {message}")
        pytest.skip(message)
    return folder


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty MovieLens cache root (`TWO_TOWER_DATA_DIR`), not yet created."""
    from two_tower.datasets import movielens

    cache = tmp_path / "cache"
    monkeypatch.setenv(movielens.ENV_VAR, str(cache))
    return cache
