"""Run by `nox -s package` with the interpreter of a fresh venv that holds the wheel.

Imports every public module of the installed package (not the checkout: it runs
from a temporary directory and checks where `two_tower` came from), and checks
the wheel's own metadata: the version, `py.typed` and the LICENSE.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import sys
from pathlib import Path

import two_tower

source = Path(sys.argv[1]).resolve()
installed = Path(two_tower.__file__).resolve().parent
if source in installed.parents or "site-packages" not in installed.parts:
    raise SystemExit(f"two_tower was imported from {installed}, not from the installed wheel")

# The backend modules import their own backend: only the installed one (JAX) loads.
skipped = {
    "two_tower.backends.torch",
    "two_tower.backends.torch_distributed",  # the collectives of torch's train steps
    "two_tower.backends.tensorflow",
    "two_tower.backends.tensorflow_export",  # TensorFlow graphs of `export`
}
names = [
    module.name
    for module in pkgutil.walk_packages(two_tower.__path__, prefix="two_tower.")
    if module.name not in skipped
]
for name in names:
    importlib.import_module(name)
for name in two_tower.__all__:
    getattr(two_tower, name)

version = importlib.metadata.version("two-tower")
if version != two_tower.__version__:
    raise SystemExit(f"metadata version {version} != two_tower.__version__ {two_tower.__version__}")
files = {str(path) for path in importlib.metadata.files("two-tower") or []}
for wanted in ("two_tower/py.typed",):
    if wanted not in files:
        raise SystemExit(f"{wanted} is missing from the wheel")
if not any(path.endswith("LICENSE") for path in files):
    raise SystemExit("the LICENSE is missing from the wheel")
for backend in ("torch", "tensorflow"):
    if backend in sys.modules:
        raise SystemExit(f"importing two_tower[jax] imported {backend}")
print(f"two_tower {version} from {installed}: imported {len(names)} modules")
