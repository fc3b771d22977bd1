"""Every `Examples:` section in the library's docstrings runs as written, on every backend."""

import doctest
import importlib
import pkgutil

import keras
import pytest

import two_tower

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(two_tower.__path__, prefix="two_tower.")
)
OTHER_BACKENDS = {
    f"two_tower.backends.{name}"
    for name in ("jax", "tensorflow", "torch")
    if name != keras.backend.backend()
}
if keras.backend.backend() != "tensorflow":  # the export's graphs import TensorFlow
    OTHER_BACKENDS.add("two_tower.backends.tensorflow_export")
if keras.backend.backend() != "torch":  # the collectives of torch's steps import torch
    OTHER_BACKENDS.add("two_tower.backends.torch_distributed")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name in OTHER_BACKENDS:
        pytest.skip(f"{name} imports its backend; this session runs {keras.backend.backend()}")
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        extraglobs={"two_tower": two_tower},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_the_public_classes_have_examples():
    for name in (
        "BruteForceIndex",
        "FaissIndex",
        "FactorizedTopK",
        "IdEmbeddingTower",
        "TwoTowerRetrieval",
        "Vocabulary",
        "FeatureTower",
        "SequenceTower",
    ):
        assert ">>> " in getattr(two_tower, name).__doc__, name
