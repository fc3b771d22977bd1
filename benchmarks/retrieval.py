"""Retrieval at catalogue scale: exact and approximate top-k, side by side.

Workload: 1024 queries, dim 64, k = 100, over 10k to 10M candidates drawn from a
Gaussian mixture of 1,000 components (unit-norm centres plus noise); the queries
come from the same mixture. Isotropic random vectors have no neighbourhoods, so
no approximate index could help on them; clustered embeddings are what a trained
two-tower model produces.

Methods, each in a fresh process so that its peak RSS (whole process, catalogue
included) is its own:
- two_tower: `two_tower.BruteForceIndex`, streaming exact top-k in keras.ops,
  indexed from the catalogue file read block by block (as from a dataset): the
  index is the only full copy;
- two_tower array: the same index given the whole catalogue as one array, which
  the caller holds too (two copies);
- keras-rs: `keras_rs.layers.BruteForceRetrieval`, which scores the whole
  [queries, candidates] matrix at once (skipped at 10M: it would need about
  1024 × 10M × 4 bytes = 41 GB for the scores alone);
- faiss flat: `faiss.IndexFlatIP`, exact, faiss' own BLAS kernels;
- ann: `two_tower.FaissIndex` with its defaults (IVF-Flat, nlist ≈ sqrt(n),
  nprobe from the size and k), with its recall@100 against our exact results;
- ann pq: `two_tower.FaissIndex(pq_subquantizers=16)`, IVF-PQ with 16-byte
  codes (16x smaller than the float32 vectors), same defaults otherwise.

Search times are the best of --repeats identical calls (3 by default, 1 at 10M;
these machines are shared and noisy), after one warm-up call that compiles;
index building is timed apart. The ratio is keras-rs's time over the
method's. Memory is reported as peak RSS and as (peak RSS - baseline) /
catalogue bytes, where the baseline is the same process's RSS after importing
NumPy, Keras, the backend and the method's library, before any catalogue. A
plot of time and memory against catalogue size is written to
docs/retrieval_benchmark.png.

    python benchmarks/retrieval.py --backend jax
    python benchmarks/retrieval.py --backend torch --sizes 10000,100000,1000000

`--concurrency` measures serving instead: `TwoTowerRetrieval.recommend` of one
user (k = 100) over a 100,000-candidate catalogue of the same mixture, called
from 1, 2, 4 and 8 threads at once, as a web server's workers would. It reports
calls per second for the library as it is (on JAX and TensorFlow nothing is
serialised; on torch two calls run at once, see `two_tower/backends/torch.py`),
for the same calls behind one global lock (the fallback design), and on torch for
every call at once, in the same run:

    python benchmarks/retrieval.py --concurrency --backend jax

`--exact` measures exact search against the machine's limit instead: 1,024
queries × `--exact-size` candidates (10^6) × dim 64, top 100, on every backend
of `--backends`, each path in a fresh process, all in one run:
- limit: a 4096 × 4096 × 4096 float32 GEMM (compute-bound), in NumPy and in
  the backend; the faster of all of them is the machine's limit;
- numpy gemm: NumPy's `Q @ C.T` of the same shapes, 2^18 candidates at a time,
  the scores written to memory (no top-k);
- gemm + max: the backend's compiled `Q @ C.T` then `max` over 2^18-candidate
  chunks (XLA on JAX), no top-k;
- faiss flat: `faiss.IndexFlatIP`, exact;
- tiles only: the tiled search's first pass alone (the block maxima of every
  tile, `_tiled_top_k._block_maxima`), without its top k and second pass;
- whole chunks: `BruteForceIndex` as before tiling (chunks of 2^18 scored
  whole, 128 queries at a time);
- tiled: `BruteForceIndex` with its defaults (`two_tower.retrieval._tiled_top_k`),
  its ids checked against the whole-chunk path's.
Rates count 2 × queries × candidates × dim floating-point operations; "of limit"
is the path's rate over the machine's limit, and "× whole" the whole-chunk
path's time over the tiled one's, on the same backend. `--exclude N` leaves N
random ids out of each query's results (`search(exclude=...)`) on both index paths:

    python benchmarks/retrieval.py --exact --backends jax,tensorflow,torch
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np

QUERIES, DIM, K, COMPONENTS = 1024, 64, 100, 1000
NOISE = 0.6  # norm of the per-vector noise around its unit-norm centre
METHODS = ("two_tower", "two_tower array", "keras-rs", "faiss flat", "ann", "ann pq")
KERAS_RS_LIMIT = 1_000_000  # above this, keras-rs's score matrix exceeds the machine
ROOT = Path(__file__).resolve().parents[1]


def make_data(folder: Path, n: int) -> tuple[Path, Path]:
    """Writes the catalogue (memory-mapped, 1M rows at a time) and the queries."""
    catalogue_path = folder / f"catalogue_{n}.npy"
    queries_path = folder / "queries.npy"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(COMPONENTS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = NOISE / np.sqrt(DIM)
    if not queries_path.exists():
        labels = rng.integers(0, COMPONENTS, QUERIES)
        queries = centres[labels] + rng.normal(scale=scale, size=(QUERIES, DIM))
        np.save(queries_path, queries.astype("float32"))
    if not catalogue_path.exists():
        partial = catalogue_path.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype="float32", shape=(n, DIM))
        rows = np.random.default_rng(n)
        for start in range(0, n, 1_000_000):
            m = min(1_000_000, n - start)
            labels = rows.integers(0, COMPONENTS, m)
            block = centres[labels] + rows.normal(scale=scale, size=(m, DIM))
            out[start : start + m] = block.astype("float32")
        out.flush()
        del out
        partial.rename(catalogue_path)  # only complete files carry the final name
    return catalogue_path, queries_path


def run_method(
    method: str, catalogue_path: Path, queries_path: Path, folder: Path, repeats: int
) -> dict:
    """Builds one index, warms it up, and times the best of `repeats` searches."""
    import keras  # noqa: F401  (the baseline includes Keras and the backend)

    import two_tower

    if method == "keras-rs":
        import keras_rs  # noqa: F401
    if method in ("faiss flat", "ann", "ann pq"):
        import faiss  # noqa: F401
    baseline = _current_rss_gb()
    queries = np.load(queries_path)
    n = _rows_of(catalogue_path)
    started = time.perf_counter()
    if method == "two_tower":
        from two_tower.retrieval._catalogue_store import npy_blocks

        index = two_tower.BruteForceIndex()
        index.index(npy_blocks(catalogue_path))  # plain reads: never whole outside the index
        search = lambda: index.search(queries, k=K)[0]  # noqa: E731
        catalogue = None
    else:
        catalogue = np.load(catalogue_path)  # in memory, as a served catalogue would be
    if method == "two_tower array":
        index = two_tower.BruteForceIndex()
        index.index(catalogue)
        del catalogue
        search = lambda: index.search(queries, k=K)[0]  # noqa: E731
    elif method == "keras-rs":
        import keras_rs

        layer = keras_rs.layers.BruteForceRetrieval(k=K, return_scores=True)
        layer.update_candidates(catalogue)
        del catalogue
        search = lambda: keras.ops.convert_to_numpy(layer(queries)[1])  # noqa: E731
    elif method == "faiss flat":
        import faiss

        flat = faiss.IndexFlatIP(DIM)
        flat.add(catalogue)
        del catalogue
        search = lambda: flat.search(queries, K)[1]  # noqa: E731  (faiss: (D, I))
    elif method in ("ann", "ann pq"):
        ann = two_tower.FaissIndex(pq_subquantizers=16 if method == "ann pq" else None)
        ann.index(catalogue)
        del catalogue
        search = lambda: ann.search(queries, k=K)[0]  # noqa: E731
    build = time.perf_counter() - started
    search()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        ids = search()
        seconds.append(time.perf_counter() - started)
    result = {
        "build_s": build,
        "search_s": min(seconds),
        "baseline_gb": baseline,
        "catalogue_gb": n * DIM * 4 / 2**30,
    }
    exact_path = folder / f"exact_ids_{n}.npy"
    if method == "two_tower":
        np.save(exact_path, ids)
    elif exact_path.exists():
        from two_tower.evaluation import recall_against_exact

        result["recall"] = recall_against_exact(ids, np.load(exact_path))
    result["peak_rss_gb"] = _common.peak_rss_kib() / 2**20
    return result


EXACT_PATHS = (
    "limit", "numpy gemm", "gemm + max", "faiss flat", "tiles only", "whole chunks", "tiled"
)  # fmt: skip
OLD_CHUNK, OLD_QUERY_BATCH = 2**18, 128  # BruteForceIndex's defaults before tiling


def run_exact(
    path: str,
    catalogue_path: Path,
    queries_path: Path,
    folder: Path,
    repeats: int,
    exclude_count: int = 0,
) -> dict:
    """Times one path of `--exact` (see the module docstring) in this process."""
    import keras

    import two_tower
    from two_tower.backends import backend_module
    from two_tower.retrieval.top_k import BLOCK

    queries = np.load(queries_path)
    n = _rows_of(catalogue_path)
    result: dict[str, Any] = {}
    if path == "limit":
        square = np.random.default_rng(0).normal(size=(4096, 4096)).astype("float32")
        result["numpy_s"] = _best(lambda: square @ square, repeats)
        tensor = keras.ops.convert_to_tensor(square)
        product = _compiled(lambda x: keras.ops.matmul(x, x))
        result["search_s"] = _best(lambda: keras.ops.convert_to_numpy(product(tensor)), repeats)
        result["flops"] = result["numpy_flops"] = 2 * 4096**3
        return result
    result["flops"] = 2 * len(queries) * n * DIM
    if path in ("numpy gemm", "gemm + max", "faiss flat", "tiles only"):
        catalogue = np.load(catalogue_path)
    if path == "numpy gemm":
        out = np.empty((len(queries), 2**18), "float32")

        def search() -> None:
            for start in range(0, n, 2**18):
                part = catalogue[start : start + 2**18]
                np.matmul(queries, part.T, out=out[:, : len(part)])

    elif path == "gemm + max":
        chunks = [keras.ops.convert_to_tensor(catalogue[i : i + 2**18]) for i in range(0, n, 2**18)]
        query_tensor = keras.ops.convert_to_tensor(queries)
        best = _compiled(lambda q, c: keras.ops.max(keras.ops.matmul(q, keras.ops.transpose(c)), 1))

        def search() -> None:
            for chunk in chunks:
                keras.ops.convert_to_numpy(best(query_tensor, chunk))

    elif path == "tiles only":
        from two_tower.retrieval import _tiled_top_k
        from two_tower.retrieval.top_k import dot_similarities

        width = 2**20
        layout = _tiled_top_k._Layout(width, backend_module().search_tile)
        rows = 256  # BruteForceIndex's default query_batch_size
        padded = np.zeros((-(-n // width) * width, DIM), "float32")
        padded[:n] = catalogue
        chunks = [keras.ops.convert_to_tensor(padded[i : i + width]) for i in range(0, n, width)]
        batches = [
            keras.ops.convert_to_tensor(queries[i : i + rows]) for i in range(0, len(queries), rows)
        ]
        maxima = backend_module().compile_inference(
            lambda x: _tiled_top_k._block_maxima(
                x["queries"], x["chunk"], dot_similarities, layout, True, None
            ),
            list,
        )

        def search() -> None:
            for batch in batches:
                for chunk in chunks:
                    keras.ops.convert_to_numpy(maxima({"queries": batch, "chunk": chunk}))

    elif path == "faiss flat":
        import faiss

        flat = faiss.IndexFlatIP(DIM)
        flat.add(catalogue)
        search = lambda: flat.search(queries, K)  # noqa: E731
    else:
        from two_tower.retrieval._catalogue_store import npy_blocks

        if path == "whole chunks":
            backend_module().search_tile = 0  # type: ignore[misc]  # the path before tiles
            # Chunks scored whole take 1/BLOCK of `query_batch_size` (the same memory
            # as tiles): 128 queries at a time, as before.
            index = two_tower.BruteForceIndex(
                chunk_size=OLD_CHUNK, query_batch_size=OLD_QUERY_BATCH * BLOCK
            )
        else:
            index = two_tower.BruteForceIndex()
        index.index(npy_blocks(catalogue_path))
        found: list[Any] = []
        exclude = None
        if exclude_count:  # the same random ids for both paths
            rng = np.random.default_rng(0)
            exclude = [rng.choice(n, exclude_count, replace=False) for _ in queries]
        search = lambda: found.append(index.search(queries, k=K, exclude=exclude))  # noqa: E731
    baseline = _current_rss_gb()
    result["search_s"] = _best(search, repeats)
    result["peak_rss_gb"] = _common.peak_rss_kib() / 2**20
    result["baseline_gb"] = baseline
    if path in ("whole chunks", "tiled"):
        ids, scores = found[-1]
        reference = folder / f"whole_{n}_{keras.backend.backend()}_{exclude_count}.npz"
        if path == "whole chunks":
            np.savez(reference, ids=ids, scores=scores)
        elif reference.exists():
            whole = np.load(reference)
            result["ids_equal"] = float(np.mean(whole["ids"] == ids))
            result["score_difference"] = float(np.max(np.abs(whole["scores"] - scores)))
    return result


def _best(function: Any, repeats: int) -> float:
    function()  # warm-up: compiles
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def _compiled(function: Any) -> Any:
    """`function` compiled by the backend Keras runs on (eager under no_grad on torch)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function)
    import torch

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return function(*args)

    return run


def exact(args: argparse.Namespace, folder: Path) -> None:
    """`--exact`: every path on every backend, each in a fresh process, then the table."""
    catalogue_path, queries_path = make_data(folder, args.exact_size)
    n = args.exact_size
    print(f"Exact top {K}: {QUERIES} queries x {n:,} candidates x dim {DIM}; best of "
          f"{args.repeats} warm calls; {args.exclude} ids excluded per query")  # fmt: skip
    results: dict[tuple[str, str], dict] = {}
    for stale in folder.glob(f"whole_{n}_*.npz"):  # the whole-chunk ids of an earlier run
        stale.unlink()
    for backend in args.backends.split(","):
        for path in EXACT_PATHS:
            if path == "faiss flat" and backend != args.backends.split(",")[0]:
                continue  # no backend in it: once
            if args.exclude and path not in ("whole chunks", "tiled"):
                continue  # only the index paths take exclusions
            arguments = ["--data-dir", str(folder), "--repeats", str(args.repeats)]
            arguments += ["--exclude", str(args.exclude)]
            arguments += ["--exact-worker", path, str(catalogue_path), str(queries_path)]
            done, result = _common.run_worker(__file__, arguments, env={"KERAS_BACKEND": backend})
            if result is None:
                print(f"{backend} {path} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            results[(backend, path)] = result
    rates = {key: r["flops"] / r["search_s"] / 1e9 for key, r in results.items()}
    limits = [rate for (_, path), rate in rates.items() if path == "limit"]
    limits += [
        r["numpy_flops"] / r["numpy_s"] / 1e9 for (_, p), r in results.items() if p == "limit"
    ]
    limit = max(limits) if limits else float("nan")
    print(f"machine limit: {limit:.0f} GFLOP/s (the fastest 4096^3 GEMM below)")
    print(
        "| backend | path | time (s) | GFLOP/s | of limit | peak RSS (GB) | x whole | ids equal "
        "| max score difference |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (backend, path), result in results.items():
        rate = rates[(backend, path)]
        name = "faiss" if path == "faiss flat" else backend
        if path == "limit":
            numpy_rate = result["numpy_flops"] / result["numpy_s"] / 1e9
            print(f"| numpy | limit: 4096^3 GEMM | {result['numpy_s']:.3f} | {numpy_rate:.0f} | "
                  f"{numpy_rate / limit:.0%} | | | | |")  # fmt: skip
        whole = results.get((backend, "whole chunks"))
        speedup = (
            f"{whole['search_s'] / result['search_s']:.2f}" if path == "tiled" and whole else ""
        )
        peak = f"{result['peak_rss_gb']:.2f}" if "peak_rss_gb" in result else ""
        equal = (
            f"{result['ids_equal']:.4f} | {result['score_difference']:.1e}"
            if ("ids_equal" in result)
            else " | "
        )
        label = "limit: 4096^3 GEMM" if path == "limit" else path
        print(f"| {name} | {label} | {result['search_s']:.3f} | {rate:.0f} | {rate / limit:.0%} "
              f"| {peak} | {speedup} | {equal} |", flush=True)  # fmt: skip


def _current_rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _rows_of(path: Path) -> int:
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        shape, _, _ = np.lib.format.read_array_header_1_0(handle)
    return int(shape[0])


def main(argv: list[str] | None = None) -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backend", default="jax", choices=["jax", "tensorflow", "torch"])
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "tt_retrieval"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "retrieval_benchmark.png"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", action="store_true", help="threads benchmark")
    parser.add_argument("--calls", type=int, default=800, help="calls per concurrency trial")
    parser.add_argument("--exact", action="store_true", help="exact search against the limit")
    parser.add_argument("--exact-size", type=int, default=1_000_000)
    parser.add_argument("--exclude", type=int, default=0, help="ids excluded per query")
    _common.add_backends_argument(parser)
    parser.add_argument("--exact-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = Path(args.data_dir)
    if args.exact_worker:
        path, catalogue, queries = args.exact_worker
        _common.report(
            run_exact(path, Path(catalogue), Path(queries), folder, args.repeats, args.exclude)
        )
        return
    if args.exact:
        folder.mkdir(parents=True, exist_ok=True)
        exact(args, folder)
        return
    if args.concurrency:
        folder.mkdir(parents=True, exist_ok=True)
        concurrency(args.backend, *make_data(folder, CONCURRENCY_CATALOGUE), args.calls)
        return
    if args.worker:
        method, catalogue, queries = args.worker
        result = run_method(method, Path(catalogue), Path(queries), folder, args.repeats)
        _common.report(result)
        return

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if {"ann", "ann pq"} & set(methods) and "two_tower" not in methods:
        print("note: recall is measured against two_tower's exact ids from an earlier run "
              f"in {folder}, if any")  # fmt: skip
    print(f"{QUERIES} queries, dim {DIM}, k={K}, backend {args.backend}; search time (warm)")
    print(
        "| candidates | method | build | search | vs keras-rs | peak RSS "
        "| (peak - baseline) / catalogue | recall@100 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for n in sizes:
        catalogue_path, queries_path = make_data(folder, n)
        for method in methods:
            if method == "keras-rs" and n > KERAS_RS_LIMIT:
                print(f"| {n:,} | keras-rs | - | skipped: needs ~{QUERIES * n * 4 / 1e9:.0f} GB "
                      "of scores | | | | |", flush=True)  # fmt: skip
                continue
            arguments = ["--data-dir", str(folder)]
            repeats = args.repeats if n < 10_000_000 else 1  # one 10M search takes a minute
            arguments += ["--repeats", str(repeats), "--worker", method]
            arguments += [str(catalogue_path), str(queries_path)]
            done, result = _common.run_worker(
                __file__, arguments, env={"KERAS_BACKEND": args.backend}
            )
            if result is None:
                error = done.stderr.strip().splitlines()[-1:]
                print(f"| {n:,} | {method} | failed (exit {done.returncode}): {error} "
                      "| | | | | |", flush=True)  # fmt: skip
                continue
            results[method][n] = result
        for method in methods:  # after all of them, so every row has its ratio
            if n in results[method]:
                _print_row(n, method, results)
    if args.plot:
        _plot(results, args.backend, Path(args.plot))


CONCURRENCY_CATALOGUE = 100_000
THREADS = (1, 2, 4, 8)


def concurrency(backend: str, catalogue_path: Path, queries_path: Path, calls: int) -> None:
    """Calls/s of `recommend` from 1-8 threads: the library as it is, against one lock.

    On torch, whose backend lets `SERVING_SLOTS` calls run at once, it also
    measures every call running at once (the slots lifted).
    """
    import contextlib
    import threading
    from concurrent.futures import ThreadPoolExecutor

    _common.use_backend(backend)
    import keras

    import two_tower
    from two_tower.backends import backend_module

    catalogue = np.load(catalogue_path)
    queries = np.load(queries_path)
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(len(queries), DIM), keras.layers.Embedding(1, DIM)
    )
    model.embed_queries(np.arange(2))
    model.query_tower.embeddings.assign(queries)  # user i's embedding is query i
    model.candidate_index.index(catalogue)
    users = np.random.default_rng(0).integers(0, len(queries), calls)
    lock = threading.Lock()
    module = backend_module()
    library_slot = module.serving_slot
    designs = {"two_tower": (library_slot, contextlib.nullcontext)}
    if backend == "torch":
        designs["all at once"] = (contextlib.nullcontext, contextlib.nullcontext)
    designs["global lock"] = (library_slot, lambda: lock)

    def serve(user: int, outer: Any) -> np.ndarray:
        with outer():
            return model.recommend(np.array([user]), k=K)

    serial = [serve(int(u), contextlib.nullcontext) for u in users[:50]]  # warm-up, reference
    print(f"recommend (1 user, k={K}) over {len(catalogue):,} candidates, dim {DIM}, "
          f"backend {backend}; {calls} calls per trial; calls/s")  # fmt: skip
    names = list(designs)
    print("| threads | " + " | ".join(names) + " | two_tower / global lock |")
    print("|---" * (len(names) + 2) + "|")
    for threads in THREADS:
        rates = {}
        for name, (slot, outer) in designs.items():
            module.serving_slot = slot  # the library's own slots, or none
            try:
                with ThreadPoolExecutor(threads) as pool:
                    started = time.perf_counter()
                    found = list(pool.map(lambda u, o=outer: serve(int(u), o), users))
                    rates[name] = calls / (time.perf_counter() - started)
            finally:
                module.serving_slot = library_slot
            for expected, got in zip(serial, found, strict=False):
                assert np.array_equal(expected, got), "a threaded call differs from serial"
        cells = " | ".join(f"{rates[name]:.0f}" for name in names)
        ratio = rates["two_tower"] / rates["global lock"]
        print(f"| {threads} | {cells} | {ratio:.2f}x |", flush=True)


def _print_row(n: int, method: str, results: dict[str, dict[int, dict]]) -> None:
    row = results[method][n]
    reference = results.get("keras-rs", {}).get(n)
    ratio = f"{reference['search_s'] / row['search_s']:.1f}x" if reference else "-"
    recall = f"{row['recall']:.3f}" if "recall" in row else "-"
    over = (row["peak_rss_gb"] - row["baseline_gb"]) / row["catalogue_gb"]
    print(
        f"| {n:,} | {method} | {row['build_s']:.2f} s | {row['search_s']:.3f} s | {ratio} | "
        f"{row['peak_rss_gb']:.2f} GB | {over:.2f}x | {recall} |",
        flush=True,
    )


def _plot(results: dict[str, dict[int, dict]], backend: str, path: Path) -> None:
    plt = _common.pyplot()
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, rows in results.items():
        sizes = sorted(rows)
        if not sizes:
            continue
        time_axis.plot(sizes, [rows[n]["search_s"] for n in sizes], marker="o", label=method)
        memory_axis.plot(sizes, [rows[n]["peak_rss_gb"] for n in sizes], marker="o", label=method)
    for axis, label in (
        (time_axis, "search time, 1024 queries (s)"),
        (memory_axis, "peak RSS (GB)"),
    ):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("candidates")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    memory_axis.axhline(2.0, color="grey", linestyle="--", linewidth=1)
    time_axis.legend()
    figure.suptitle(f"Top-100 retrieval, dim 64, {backend} backend, 2-core CPU")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
