"""What the benchmark scripts share: backend choice, command lines, worker processes, memory.

- `default_backend` and `use_backend` set `KERAS_BACKEND`, which Keras reads once, at
  its first import: a script calls one of them before anything imports Keras (at its
  top, above `import keras`, or in a worker before its function-level imports);
- `argument_parser`, `add_backends_argument` and `add_data_dir_argument` build the
  command lines several scripts have in common;
- `report`, `run_worker` and `worker_result` run a script again in a fresh interpreter
  (one backend, size or setting per process, so that neither Keras' backend nor peak
  memory carries over from one measurement to the next) and read back its result;
- `peak_rss_kib` and `pyplot`: peak memory, and Matplotlib without a display.

Standard library only: importing this module imports neither Keras nor NumPy, so
scripts can import it before they choose the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any

BACKENDS = "jax,tensorflow,torch"
RESULTS = "RESULTS "  # the prefix of the line a worker reports its result on


def default_backend(backend: str) -> None:
    """Sets `KERAS_BACKEND` to `backend` unless the environment already names one."""
    os.environ.setdefault("KERAS_BACKEND", backend)


def use_backend(backend: str) -> None:
    """Sets `KERAS_BACKEND` to `backend`, before Keras is first imported.

    Raises:
        RuntimeError: Keras is already imported with another backend (setting the
            variable now would change nothing).
    """
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != backend:
        raise RuntimeError(
            f"Keras is already imported with the {keras.backend.backend()} backend: set "
            f"KERAS_BACKEND={backend} before the first `import keras`."
        )
    os.environ["KERAS_BACKEND"] = backend


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first line of the script's docstring `doc`."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def add_backends_argument(parser: argparse.ArgumentParser) -> None:
    """`--backends`: the comma-separated backends to measure, each in its own process."""
    parser.add_argument("--backends", default=BACKENDS)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """`--data-dir`: the MovieLens folder (None: `two_tower.datasets.movielens`'s lookup)."""
    parser.add_argument("--data-dir", default=None)


def report(result: Any) -> None:
    """Prints a worker's result as the JSON line `run_worker` reads back."""
    print(RESULTS + json.dumps(result))


def run_worker(
    script: str, arguments: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Runs `script` with `arguments` in a fresh interpreter and waits for it.

    Args:
        script: the script's path (the caller's `__file__`).
        arguments: its command-line arguments.
        env: variables to set in its environment, on top of this process'.

    Returns:
        The finished process and the last result it reported with `report`; None
        where it failed or reported none.
    """
    completed = subprocess.run(
        [sys.executable, script, *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULTS)]
    if completed.returncode != 0 or not lines:
        return completed, None
    return completed, json.loads(lines[-1][len(RESULTS) :])


def worker_result(
    script: str, arguments: list[str], what: str, env: dict[str, str] | None = None
) -> Any:
    """`run_worker`'s result; where there is none, exits with `what` and the worker's stderr."""
    completed, result = run_worker(script, arguments, env)
    if result is None:
        sys.exit(f"{what} failed:\n{completed.stderr[-3000:]}")
    return result


def peak_rss_kib() -> int:
    """This process' peak resident memory so far, in KiB (`ru_maxrss`'s unit on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend: plots are written to files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
