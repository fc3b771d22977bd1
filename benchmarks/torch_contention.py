"""PyTorch on a shared CPU: ms/step quiet and under load, by torch thread setting.

Ways to train the README quickstart's model (`Embedding(1000, 64)` and
`Embedding(5000, 64)` towers each followed by `Dense(32)`, in-batch softmax at
temperature 0.1, Adam(1e-3), batch 256, 10,000 random pairs, so 40 steps an
epoch, the last of 16 rows):
- two_tower: `two_tower.TwoTowerRetrieval.fit` on NumPy arrays;
- keras: the same towers in a small `keras.Model` subclass whose `compute_loss`
  is the in-batch softmax in `keras.ops`, trained with `keras.Model.fit` on the
  same arrays (Keras' own array adapter and train step);
- torch: a hand-written loop (`torch.nn.Embedding`, `torch.nn.Linear`,
  `torch.optim.Adam`, a `torch.randperm` per epoch, `F.cross_entropy`);
- two_tower_sparse (only when named in `--paths`): two_tower with
  `two_tower.SparseEmbedding` tables, whose optimizer updates only the rows a
  batch looks up (Adam becomes lazy Adam, a different algorithm);
- two_tower_default (only when named in `--paths`): the README quickstart's own
  model, `TwoTowerRetrieval.from_ids` with its defaults (id tables of dim 32 with
  an L2 penalty and an item bias, a softmax over the whole catalogue at
  temperature 1, `two_tower.defaults.optimizer()`), at these sizes and batch.

Settings: torch's default (one OpenMP thread per core), `torch.set_num_threads(1)`,
and the default thread count with `OMP_WAIT_POLICY=PASSIVE` (OpenMP threads
sleep at once after each parallel region instead of spinning; the variable is
read when torch loads, so that setting runs in its own process).

Each repeat runs one child process per OpenMP wait policy; a child times every
path and thread setting quiet, then under load (`--load-processes` busy-looping
Python processes, one per core by default), back to back. The table gives the
median over the repeats and the ratio loaded/quiet. ms/step is the mean time
between consecutive steps over `--epochs` epochs: every step counts, since under
load the slow steps are the point. Machines shared with other work are never
quiet: compare the ratios of one run, not absolute times, and read the load
average printed with them.

    KERAS_BACKEND=torch python benchmarks/torch_contention.py
    KERAS_BACKEND=torch python benchmarks/torch_contention.py --repeats 5 --count

`--count` also prints, per training step of each path, the torch operators run
(a `TorchDispatchMode`, backward included) and the OpenMP parallel regions
started (`GOMP_parallel` calls, counted by a small library preloaded into a
child process; needs a C compiler), with the operators that start them. Every
parallel region ends in a barrier that waits for all of torch's threads: on a
busy CPU, for one descheduled thread, a whole scheduler slice.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import _common

_common.default_backend("torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import two_tower  # noqa: E402

NUM_QUERIES, NUM_CANDIDATES, ROWS = 1000, 5000, 10_000
EMBEDDING_DIM, OUTPUT_DIM = 64, 32
BATCH_SIZE, TEMPERATURE, LEARNING_RATE = 256, 0.1, 1e-3
STEPS_PER_EPOCH = -(-ROWS // BATCH_SIZE)
PATHS = ("two_tower", "keras", "torch", "two_tower_sparse", "two_tower_default")
DEFAULT_PATHS = PATHS[:3]
WAIT_POLICIES = ("default", "PASSIVE")

# Counts GOMP_parallel calls (libgomp's entry for `#pragma omp parallel`, which
# ATen's `parallel_for` and MKL use) and passes them on to torch's libgomp.
_REGION_COUNTER_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
static atomic_long regions = 0;
typedef void (*parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
void GOMP_parallel(void (*fn)(void *), void *data, unsigned threads, unsigned flags) {
  static parallel_fn real = 0;
  if (!real) real = (parallel_fn)dlvsym(RTLD_NEXT, "GOMP_parallel", "GOMP_4.0");
  atomic_fetch_add(&regions, 1);
  real(fn, data, threads, flags);
}
long parallel_regions(void) { return atomic_load(&regions); }
"""


def quickstart_towers() -> tuple[keras.Model, keras.Model]:
    """The README quickstart's query and candidate towers."""
    query_tower = keras.Sequential(
        [keras.layers.Embedding(NUM_QUERIES, EMBEDDING_DIM), keras.layers.Dense(OUTPUT_DIM)]
    )
    candidate_tower = keras.Sequential(
        [keras.layers.Embedding(NUM_CANDIDATES, EMBEDDING_DIM), keras.layers.Dense(OUTPUT_DIM)]
    )
    return query_tower, candidate_tower


def sparse_towers() -> tuple[keras.Model, keras.Model]:
    """The same towers with `two_tower.SparseEmbedding` tables (Adam becomes lazy Adam)."""
    query_tower = keras.Sequential(
        [two_tower.SparseEmbedding(NUM_QUERIES, EMBEDDING_DIM), keras.layers.Dense(OUTPUT_DIM)]
    )
    candidate_tower = keras.Sequential(
        [
            two_tower.SparseEmbedding(NUM_CANDIDATES, EMBEDDING_DIM),
            keras.layers.Dense(OUTPUT_DIM),
        ]
    )
    return query_tower, candidate_tower


class PlainKerasRetrieval(keras.Model):
    """The quickstart's towers and in-batch softmax as a plain `keras.Model`."""

    def __init__(self) -> None:
        super().__init__()
        self.query_tower, self.candidate_tower = quickstart_towers()

    def call(self, inputs: dict[str, Any], training: bool = False) -> dict[str, Any]:
        return {
            "query": self.query_tower(inputs["query"], training=training),
            "candidate": self.candidate_tower(inputs["candidate"], training=training),
        }

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        ops = keras.ops
        logits = ops.matmul(y_pred["query"], ops.transpose(y_pred["candidate"])) / TEMPERATURE
        return ops.mean(ops.logsumexp(logits, axis=1) - ops.diagonal(logits))


class _StepClock(keras.callbacks.Callback):
    """Records the time at the end of every training step.

    Declared `async_safe`, so that Keras dispatches the batch ends as it would
    without it (to its thread pool where every callback allows it): the clock
    must not change what it measures.
    """

    async_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.times.append(time.perf_counter())


def _mean_interval_ms(times: list[float]) -> float:
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def keras_trainer(
    model: keras.Model,
    data: dict[str, np.ndarray],
    optimizer: keras.optimizers.Optimizer | None = None,
) -> Callable[[int], float]:
    """A function that fits `model` for some epochs and returns its ms/step (Adam at
    `LEARNING_RATE` unless `optimizer` is given)."""
    model.compile(optimizer=optimizer or keras.optimizers.Adam(LEARNING_RATE))

    def train(epochs: int) -> float:
        clock = _StepClock()
        model.fit(data, batch_size=BATCH_SIZE, epochs=epochs, verbose=0, callbacks=[clock])
        return _mean_interval_ms(clock.times)

    return train


def torch_trainer(data: dict[str, np.ndarray]) -> Callable[[int], float]:
    """The same training written directly in torch; returns a function like `keras_trainer`'s."""
    query_tower = torch.nn.Sequential(
        torch.nn.Embedding(NUM_QUERIES, EMBEDDING_DIM), torch.nn.Linear(EMBEDDING_DIM, OUTPUT_DIM)
    )
    candidate_tower = torch.nn.Sequential(
        torch.nn.Embedding(NUM_CANDIDATES, EMBEDDING_DIM),
        torch.nn.Linear(EMBEDDING_DIM, OUTPUT_DIM),
    )
    parameters = [*query_tower.parameters(), *candidate_tower.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    queries = torch.from_numpy(data["query"])
    candidates = torch.from_numpy(data["candidate"])

    def train(epochs: int) -> float:
        times = []
        for _ in range(epochs):
            order = torch.randperm(ROWS)
            for start in range(0, ROWS, BATCH_SIZE):
                rows = order[start : start + BATCH_SIZE]
                logits = query_tower(queries[rows]) @ candidate_tower(candidates[rows]).T
                loss = torch.nn.functional.cross_entropy(
                    logits / TEMPERATURE, torch.arange(len(rows))
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss.item()  # as Keras' loss tracker reads it back
                times.append(time.perf_counter())
        return _mean_interval_ms(times)

    return train


def make_trainers(paths: list[str]) -> dict[str, Callable[[int], float]]:
    """The chosen paths, each on the same data, built and warmed up once."""
    keras.utils.set_random_seed(0)
    data = {
        "query": np.random.randint(0, NUM_QUERIES, ROWS),
        "candidate": np.random.randint(0, NUM_CANDIDATES, ROWS),
    }
    makers: dict[str, Callable[[], Callable[[int], float]]] = {
        "two_tower": lambda: keras_trainer(
            two_tower.TwoTowerRetrieval(
                *quickstart_towers(), loss="softmax", temperature=TEMPERATURE
            ),
            data,
        ),
        "two_tower_sparse": lambda: keras_trainer(
            two_tower.TwoTowerRetrieval(*sparse_towers(), loss="softmax", temperature=TEMPERATURE),
            data,
        ),
        "two_tower_default": lambda: keras_trainer(
            two_tower.TwoTowerRetrieval.from_ids(NUM_QUERIES, NUM_CANDIDATES),
            data,
            two_tower.defaults.optimizer(),
        ),
        "keras": lambda: keras_trainer(PlainKerasRetrieval(), data),
        "torch": lambda: torch_trainer(data),
    }
    trainers = {path: makers[path]() for path in paths}
    for train in trainers.values():
        train(1)  # build, compile, first allocations
    return trainers


@contextlib.contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """`processes` busy-looping Python processes for the duration of the block."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)
    ]
    try:
        time.sleep(0.5)  # let the scheduler see them
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def time_once(paths: list[str], epochs: int, load_processes: int, all_threads: bool) -> None:
    """Child: one repeat of every path quiet then loaded; prints JSON rows."""
    default_threads = torch.get_num_threads()
    thread_settings = sorted({default_threads, 1} if all_threads else {default_threads})[::-1]
    trainers = make_trainers(paths)
    rows = []
    for loaded in (False, True):
        with cpu_load(load_processes) if loaded else contextlib.nullcontext():
            for threads in thread_settings:
                torch.set_num_threads(threads)
                for path, train in trainers.items():
                    rows.append([path, threads, loaded, train(epochs)])
        torch.set_num_threads(default_threads)
    _common.report(rows)


def count_once(paths: list[str]) -> None:
    """Child, with the region counter preloaded: operators and regions per step."""
    import ctypes

    from torch.utils._python_dispatch import TorchDispatchMode

    counter = ctypes.CDLL(None).parallel_regions
    counter.restype = ctypes.c_long

    class Operators(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.operators = 0
            self.regions: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            before = counter()
            result = func(*args, **(kwargs or {}))
            self.operators += 1
            if counter() > before:
                tensors = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]
                tensors = [a for a in tensors if isinstance(a, torch.Tensor)]
                largest = sorted(tensors, key=lambda tensor: -tensor.numel())[:2]
                shapes = [list(tensor.shape) for tensor in largest]
                self.regions[f"{func}{shapes}"] += counter() - before
            return result

    results = {}
    for path, train in make_trainers(paths).items():
        mode = Operators()
        before = counter()
        with mode:
            train(1)
        results[path] = {
            "operators": mode.operators / STEPS_PER_EPOCH,
            "regions": (counter() - before) / STEPS_PER_EPOCH,
            "top": [[name, n / STEPS_PER_EPOCH] for name, n in mode.regions.most_common(12)],
        }
    _common.report(results)


def _child(arguments: list[str], env: dict[str, str]) -> Any:
    """Runs this script with `arguments` in a child process; returns its reported result."""
    return _common.worker_result(__file__, arguments, f"child {arguments}", env)


def print_counts(paths: list[str]) -> None:
    """Builds the region counter, runs the counting child and prints its table."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("\n--count needs a C compiler (cc or gcc) to count OpenMP parallel regions.")
        return
    with tempfile.TemporaryDirectory() as folder:
        source, library = os.path.join(folder, "count.c"), os.path.join(folder, "count.so")
        with open(source, "w") as file:
            file.write(_REGION_COUNTER_C)
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", library, source, "-ldl"], check=True
        )
        counts = _child(["--count-child", "--paths", ",".join(paths)], {"LD_PRELOAD": library})
    print(f"\nPer training step (quiet, default threads, mean of {STEPS_PER_EPOCH} steps):")
    print(f"{'path':16} {'torch ops':>9} {'parallel regions':>17}")
    for path, count in counts.items():
        print(f"{path:16} {count['operators']:9.0f} {count['regions']:17.1f}")
    for path, count in counts.items():
        print(f"  {path}: regions per step by operator")
        for name, regions in count["top"]:
            print(f"    {regions:5.2f}  {name}")


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs (40 steps each)")
    parser.add_argument(
        "--load-processes", type=int, default=os.cpu_count() or 2, help="busy loops under load"
    )
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"some of {PATHS}")
    parser.add_argument("--count", action="store_true", help="also count ops and regions")
    parser.add_argument("--time-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--all-threads", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = [path for path in args.paths.split(",") if path]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"--paths takes names from {PATHS}. Received unknown names {unknown}")
    if args.time_child:
        time_once(paths, args.epochs, args.load_processes, args.all_threads)
        return
    if args.count_child:
        count_once(paths)
        return

    print(
        f"two_tower from {os.path.dirname(two_tower.__file__)}, torch {torch.__version__}, "
        f"keras {keras.__version__}, {os.cpu_count()} CPUs, default torch threads "
        f"{torch.get_num_threads()}; load: {args.load_processes} busy loops; {args.repeats} "
        f"repeats of {args.epochs} epoch(s) of {STEPS_PER_EPOCH} steps; load average before: "
        + " ".join(f"{load:.1f}" for load in os.getloadavg())
    )
    results: dict[tuple[str, str, int, bool], list[float]] = collections.defaultdict(list)
    for repeat in range(args.repeats):
        for policy in WAIT_POLICIES:
            env = {} if policy == "default" else {"OMP_WAIT_POLICY": policy}
            arguments = ["--time-child", "--paths", args.paths, "--epochs", str(args.epochs)]
            arguments += ["--load-processes", str(args.load_processes)]
            # Threads 1 start no parallel region, so the wait policy cannot matter there.
            arguments += ["--all-threads"] if policy == "default" else []
            for path, threads, loaded, ms_per_step in _child(arguments, env):
                results[policy, path, threads, loaded].append(ms_per_step)
        print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    print(f"\n{'OMP_WAIT_POLICY':15} {'threads':>7} {'path':16} {'quiet ms/step':>14} ", end="")
    print(f"{'loaded ms/step':>15} {'loaded/quiet':>12}")
    for policy in WAIT_POLICIES:
        for threads in sorted({key[2] for key in results if key[0] == policy}, reverse=True):
            for path in paths:
                quiet = statistics.median(results[policy, path, threads, False])
                loaded = statistics.median(results[policy, path, threads, True])
                print(f"{policy:15} {threads:7d} {path:16} {quiet:14.2f} {loaded:15.2f} ", end="")
                print(f"{loaded / quiet:12.1f}")
    print("load average after: " + " ".join(f"{load:.1f}" for load in os.getloadavg()))
    if args.count:
        print_counts(paths)


if __name__ == "__main__":
    main()
