"""Serving latency of the exported artefacts against Python `recommend`, side by side.

A model of 10,000 users and dim 64 (`TwoTowerRetrieval.from_ids`, random
weights: latency does not depend on training) indexes 10^4, 10^5 and 10^6
candidates and is exported as a SavedModel and an ONNX file (`TwoTowerRetrieval.
export`, max_k = 100). Each runtime then serves the same requests in a fresh
process, so that its peak RSS is its own:

- python: `keras.saving.load_model` + `recommend(users, k=10, exclude=...)` on
  the backend given (`--backend`);
- saved_model: `tf.saved_model.load(...).signatures["serving_default"]`;
- onnx: `onnxruntime.InferenceSession` (default options, all cores).

A request is 1 user or a batch of 32, with k = 10 and 10 excluded ids per user
(random; Python gets them as lists, the artefacts as a padded array). Each
runtime answers 3 warm-up requests, then --requests timed ones (one at a time,
as a server thread would); the table gives the p50 and p99 latency, the
throughput in users per second (users over the summed latency), and the peak RSS
of the serving process (after loading and serving; the artefact's catalogue
included). The exports' times and sizes are printed too.

    python benchmarks/export.py --backend jax
    python benchmarks/export.py --backend tensorflow --sizes 10000000 --requests 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USERS, DIM, K, EXCLUDED, MAX_K = 10_000, 64, 10, 10, 100

SERVE = r"""
import json, sys, time
import numpy as np


def peak_mb():
    # VmHWM: this process's own peak (ru_maxrss would keep the parent's across exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

c = json.loads(sys.argv[1])
rng = np.random.default_rng(7)
count = c["requests"] + 3
users = [rng.integers(0, c["users"], c["batch"]) for _ in range(count)]
excluded = [rng.integers(0, c["candidates"], (c["batch"], c["excluded"])) for _ in range(count)]
k = c["k"]
if c["runtime"] == "python":
    import keras, two_tower
    model = keras.saving.load_model(c["path"])
    serve = lambda u, e: model.recommend(u, k=k, exclude=e.tolist())
elif c["runtime"] == "saved_model":
    import tensorflow as tf
    signature = tf.saved_model.load(c["path"]).signatures["serving_default"]
    dtype = signature.structured_input_signature[1]["query"].dtype
    serve = lambda u, e: signature(query=tf.constant(u, dtype), k=tf.constant(k),
                                   exclude=tf.constant(e, tf.int64))["ids"].numpy()
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(c["path"])
    dtype = {"tensor(int32)": "int32", "tensor(int64)": "int64"}[session.get_inputs()[0].type]
    serve = lambda u, e: session.run(["ids"], {"query": u.astype(dtype),
                                               "k": np.array(k, "int32"),
                                               "exclude": e.astype("int64")})[0]
times = []
for i in range(count):
    start = time.perf_counter()
    ids = serve(users[i], excluded[i])
    if i >= 3:
        times.append(time.perf_counter() - start)
    assert ids.shape == (c["batch"], k), ids.shape
times = np.array(times)
print(json.dumps({"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)),
                  "per_second": c["batch"] * len(times) / float(times.sum()),
                  "peak_mb": peak_mb()}))
"""


def build(num_candidates: int, folder: Path) -> dict[str, float]:
    """Saves, and exports in both formats, a model over `num_candidates`; returns timings."""
    import keras
    import numpy as np

    import two_tower

    keras.utils.set_random_seed(0)
    model = two_tower.TwoTowerRetrieval.from_ids(USERS, num_candidates, DIM)
    model.index_candidates(np.arange(num_candidates), batch_size=65536)
    model.recommend(np.arange(2), k=K)
    model.save(folder / "model.keras")
    found = {}
    for format, name in (("tf_saved_model", "saved_model"), ("onnx", "model.onnx")):
        start = time.perf_counter()
        model.export(folder / name, format=format, max_k=MAX_K, verbose=False)
        found[f"{format} export s"] = time.perf_counter() - start
        path = folder / name
        files = path.rglob("*") if path.is_dir() else path.parent.glob(name + "*")
        found[f"{format} MB"] = sum(f.stat().st_size for f in files if f.is_file()) / 2**20
    return found


def serve(
    runtime: str, path: Path, batch: int, requests: int, num_candidates: int, backend: str
) -> dict[str, float]:
    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    config = {
        "runtime": runtime,
        "path": str(path),
        "batch": batch,
        "requests": requests,
        "candidates": num_candidates,
        "users": USERS,
        "excluded": EXCLUDED,
        "k": K,
    }
    completed = subprocess.run(
        [sys.executable, "-c", SERVE, json.dumps(config)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode:
        raise RuntimeError(f"{runtime} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"backend {args.backend}; users {USERS}, dim {DIM}, k {K}, {EXCLUDED} excluded ids "
        f"per user, {args.requests} timed requests per cell"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder = Path(tmp) / str(size)
            folder.mkdir()
            built = build(size, folder)
            print(f"\n{size:,} candidates: " + ", ".join(f"{k} {v:.1f}" for k, v in built.items()))
            paths = {
                "python": folder / "model.keras",
                "saved_model": folder / "saved_model",
                "onnx": folder / "model.onnx",
            }
            for batch in (1, 32):
                cells = {}
                for runtime, path in paths.items():
                    cells[runtime] = serve(runtime, path, batch, args.requests, size, args.backend)
                base = cells["python"]["p50"]
                for runtime, cell in cells.items():
                    rows.append((size, batch, runtime, cell, base / cell["p50"]))
                    print(
                        f"  batch {batch:>2} {runtime:<12} p50 {cell['p50'] * 1e3:8.2f} ms  "
                        f"p99 {cell['p99'] * 1e3:8.2f} ms  {cell['per_second']:9.0f} users/s  "
                        f"peak {cell['peak_mb']:7.0f} MB  python p50 / this p50 "
                        f"{base / cell['p50']:5.2f}x"
                    )
    print(
        "\n| candidates | batch | runtime | p50 ms | p99 ms | users/s | peak RSS MB | "
        "python p50 / p50 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, batch, runtime, cell, ratio in rows:
        print(
            f"| {size:,} | {batch} | {runtime} | {cell['p50'] * 1e3:.2f} | "
            f"{cell['p99'] * 1e3:.2f} | {cell['per_second']:,.0f} | {cell['peak_mb']:,.0f} | "
            f"{ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
