"""Test, example and lint sessions, one backend per session.

    nox -s tests-jax tests-torch tests-tensorflow   # the test matrix
    nox -s cross-backend                            # save under JAX, load under all
    nox -s example-jax                              # the main example (-- --help for its flags)
    nox -s lint

Each test session installs only its own backend, which proves the package imports
without the other two; tensorflow-datasets goes only into the tensorflow session.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
# pip, not uv: our CI machines serve the CPU torch wheel from a local pip index.
nox.options.default_venv_backend = "venv"
nox.options.sessions = [
    "lint", "tests-jax", "tests-torch", "tests-tensorflow", "tests-multidevice", "cross-backend",
    "docs", "docs-browser", "package",
]  # fmt: skip

ROOT = Path(__file__).parent
README = ROOT / "README.md"
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
# torch 2.13.0 is the CPU wheel on our CI machines; any other version pulls a CUDA
# build of several GB there. Override with e.g. TWO_TOWER_TORCH_SPEC="torch>=2.5".
TORCH_SPEC = os.environ.get("TWO_TOWER_TORCH_SPEC", "torch==2.13.0")
BACKEND_PACKAGES = {
    "jax": ["jax"],
    "torch": [TORCH_SPEC],
    "tensorflow": ["tensorflow-cpu", "tensorflow-datasets", "importlib_resources"],
}
# What `TwoTowerRetrieval.export` needs beside TensorFlow, and ONNX Runtime, which
# tests/test_export.py serves the ONNX artefact with.
EXPORT_PACKAGES = ["tf2onnx>=1.17", "onnx>=1.16", "onnxruntime>=1.18"]
# Offline machines keep MovieLens beside the checkout (see README, "Offline").
SHARED_DATA = ROOT.parent / "shared" / "datasets"


def _environment(backend: str) -> dict[str, str]:
    env = {"KERAS_BACKEND": backend}
    if "TWO_TOWER_DATA_DIR" not in os.environ and (SHARED_DATA / "ml-100k").is_dir():
        env["TWO_TOWER_DATA_DIR"] = str(SHARED_DATA)
    return env


def _install(session: nox.Session, backend: str, *groups: str) -> None:
    # The backend first, so nothing later resolves a different torch.
    session.install(*BACKEND_PACKAGES[backend])
    session.install("-e", ".")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


def _workers() -> list[str]:
    """pytest-xdist arguments: one worker per core, at most 4 (`TWO_TOWER_TEST_WORKERS`).

    Most tests are single-threaded Python (tracing, compiling, small steps), so two
    workers nearly halve the suite on a 2-core machine. Each worker holds its own
    backend runtime (1-2 GB with TensorFlow), hence the cap. `0` runs in one process;
    arguments after `--` come later and win (`nox -s tests-jax -- -n 0 tests/test_x.py`).
    Tests sharing an expensive module fixture say so with `xdist_group` (`loadgroup`).
    """
    workers = os.environ.get("TWO_TOWER_TEST_WORKERS", str(min(4, os.cpu_count() or 1)))
    return ["-n", workers, "--dist", "loadgroup"]


def _test_environment(session: nox.Session, backend: str) -> dict[str, str]:
    """The backend's environment, tuned for several test processes on a few cores.

    torch gets one OpenMP thread per worker unless `OMP_NUM_THREADS` is set: two
    workers with two threads each oversubscribe a 2-core CPU, and torch's parallel
    regions then wait a scheduler slice each (docs/backends.md, "PyTorch on a shared
    CPU"); the torch session took 7 min 22 s so, and had done 4 tests in 3 minutes
    without. JAX keeps its compiled programs in the session's folder (XLA's
    persistent cache, keyed by the program and versions), where tests that compile
    the same small training step, in either worker, can find it; the gain measured
    was small (95 s to 80 s on 129 tests, within this machine's noise).
    """
    env = _environment(backend)
    if backend == "torch" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"
    if backend == "jax" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(session.create_tmp()).resolve() / "xla")
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _tests(session: nox.Session, backend: str) -> None:
    _install(session, backend, "test")
    if backend == "tensorflow":
        session.install(*EXPORT_PACKAGES)
    session.run("pytest", *_workers(), *session.posargs, env=_test_environment(session, backend))


def _example(session: nox.Session, backend: str) -> None:
    # With no arguments: the full example (the softmax default's tuned epochs, and the
    # comparison with popularity and the keras-rs tutorial's model).
    _install(session, backend)
    session.run(
        "python", "examples/movielens_retrieval.py", "--backend", backend, *session.posargs,
        env=_environment(backend),
    )  # fmt: skip


@nox.session(name="tests-jax")
def tests_jax(session: nox.Session) -> None:
    """Runs the test suite on JAX."""
    _tests(session, "jax")


@nox.session(name="tests-torch")
def tests_torch(session: nox.Session) -> None:
    """Runs the test suite on PyTorch."""
    _tests(session, "torch")


@nox.session(name="tests-tensorflow")
def tests_tensorflow(session: nox.Session) -> None:
    """Runs the test suite on TensorFlow, with the tfds parity tests."""
    _tests(session, "tensorflow")


@nox.session(name="example-jax", default=False)
def example_jax(session: nox.Session) -> None:
    """Runs the main example, examples/movielens_retrieval.py, on JAX (args go to it)."""
    _example(session, "jax")


@nox.session(name="example-torch", default=False)
def example_torch(session: nox.Session) -> None:
    """Runs the main example, examples/movielens_retrieval.py, on PyTorch."""
    _example(session, "torch")


@nox.session(name="example-tensorflow", default=False)
def example_tensorflow(session: nox.Session) -> None:
    """Runs the main example, examples/movielens_retrieval.py, on TensorFlow."""
    _example(session, "tensorflow")


@nox.session(name="cross-backend")
def cross_backend(session: nox.Session) -> None:
    """Saves models under JAX (one device; ModelParallel on 8) and checks their top-k
    ids under torch and TensorFlow; exports models trained on JAX and torch (through
    a TensorFlow process) and serves them without Keras (tests/test_export.py)."""
    session.install(*BACKEND_PACKAGES["jax"], *BACKEND_PACKAGES["torch"], "tensorflow-cpu")
    session.install("-e", ".")
    session.install(*nox.project.dependency_groups(PYPROJECT, "test"), *EXPORT_PACKAGES)
    session.run("pytest", *_workers(), "tests/test_cross_backend.py", *session.posargs)
    for backend in ("jax", "torch"):
        env = _test_environment(session, backend)
        session.run("pytest", *_workers(), "tests/test_export.py", *session.posargs, env=env)


@nox.session(name="tests-multidevice")
def tests_multidevice(session: nox.Session) -> None:
    """Runs the distribution tests: 8 simulated JAX devices, 2 and 4 logical TF CPUs,
    and a torch process group of 2 processes on 127.0.0.1 (`torchrun`, gloo)."""
    session.install(*BACKEND_PACKAGES["tensorflow"], *BACKEND_PACKAGES["torch"])
    _install(session, "jax", "test")
    env = _environment("jax")
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", TWO_TOWER_MULTIDEVICE="1")
    session.run("pytest", *_workers(), "tests/test_multidevice_jax.py", *session.posargs, env=env)
    for devices in ("2", "4"):  # one MirroredStrategy per process (see the test module)
        env = _environment("tensorflow")
        env.update(TWO_TOWER_LOGICAL_CPUS=devices, TWO_TOWER_MULTIDEVICE="1")
        session.run("pytest", "tests/test_multidevice_tensorflow.py", *session.posargs, env=env)
    env = _test_environment(session, "torch")  # one OpenMP thread per process
    env.update(TWO_TOWER_MULTIDEVICE="1")
    session.run("pytest", "tests/test_multidevice_torch.py", *session.posargs, env=env)


@nox.session
def docs(session: nox.Session) -> None:
    """Builds the documentation site into site/ (`mkdocs build --strict`: broken links,
    cross-references or docstrings fail), checks that the API reference documents every
    public name and every documented argument exists, and that the built pages show every
    list as a list and no docstring as a blockquote (.ci/check_rendered_docs.py)."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "docs"))
    env = {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its successor
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env=env)
    session.run("python", ".ci/check_api_reference.py")
    # Lists glued to the sentence before them, docstring blockquotes: the built HTML shows
    # them, --strict does not. The self-test builds a broken page that must fail the check.
    session.run("python", ".ci/check_rendered_docs.py", "--self-test", env=env)
    session.run("python", ".ci/check_rendered_docs.py", "site")


@nox.session(name="docs-browser")
def docs_browser(session: nox.Session) -> None:
    """Opens site/ in headless Chromium: screenshots of the home, getting-started, your-data
    and TwoTowerRetrieval pages, a search for "Vocabulary" over http, and index.html browsed
    from disk. Builds site/ unless it is newer than its sources (after `docs`, it is);
    installs Debian's chromium with apt when missing (as root, as CI runs)."""
    index = ROOT / "site" / "index.html"
    sources = [ROOT / "mkdocs.yml", README, ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*")]
    sources += (ROOT / "src").rglob("*.py")
    newest = max(path.stat().st_mtime for path in sources if path.exists())
    if index.exists() and index.stat().st_mtime > newest:
        session.log("site/ is newer than docs/, src/ and mkdocs.yml: using it as built")
    else:
        session.install(*nox.project.dependency_groups(PYPROJECT, "docs"))
        env = {"NO_MKDOCS_2_WARNING": "1"}
        session.run("mkdocs", "build", "--strict", "--site-dir", "site", env=env)
    if shutil.which("chromium") is None:
        if os.geteuid() != 0:
            session.error("chromium is missing: `sudo apt-get install chromium` (Debian)")
        apt = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-qq", env=apt, external=True)
        session.run("apt-get", "install", "-y", "-qq", "chromium", env=apt, external=True)
    screenshots = Path(session.create_tmp()).resolve() / "screenshots"
    shutil.rmtree(screenshots, ignore_errors=True)
    session.run("python", ".ci/docs_browser.py", "site", "--out", str(screenshots))


@nox.session
def package(session: nox.Session) -> None:
    """Builds the sdist and wheel, checks them, and runs the README quickstart from the
    wheel in a fresh venv with only `[jax]`, outside the source tree."""
    session.install("build", "twine", "check-wheel-contents")
    work = Path(session.create_tmp()).resolve()
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist), str(ROOT))
    (wheel,) = dist.glob("*.whl")
    session.run("twine", "check", "--strict", *map(str, dist.iterdir()))
    session.run("check-wheel-contents", str(wheel))
    # Outside the checkout: nothing of the source tree can be imported by accident.
    outside = Path(tempfile.mkdtemp(prefix="two_tower-package-"))
    try:
        venv = outside / "venv"
        session.run("python", "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        session.run(python, "-m", "pip", "install", "--quiet", f"{wheel}[jax]", external=True)
        # The quickstart and its save/load block, as one script (the README's only
        # Python blocks; tests/test_docs.py checks that there are no others).
        blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        assert "TwoTowerRetrieval" in blocks[0], "the README's first block is the quickstart"
        (outside / "quickstart.py").write_text("\n".join(blocks))
        shutil.copy(ROOT / ".ci" / "check_installed.py", outside)
        with session.chdir(outside):
            env = _environment("jax")  # the quickstart reads MovieLens 100K
            session.run(python, "check_installed.py", str(ROOT), env=env, external=True)
            session.run(python, "quickstart.py", env=env, external=True)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on everything, mypy on src/."""
    session.install("jax")
    session.install("-e", ".")
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", env={"KERAS_BACKEND": "jax"})
