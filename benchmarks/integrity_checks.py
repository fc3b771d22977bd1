"""What the on-disk integrity checks cost, beside the work they guard, at several sizes.

Three files two_tower writes and reads back, each checked as a whole before use
(issue 30):

- `.keras`: `two_tower.saving.load_model` checks every member's size and SHA-256
  against the manifest in the zip comment, then loads with Keras; compared with
  `keras.saving.load_model` on the same file (no checks). An indexed
  `TwoTowerRetrieval.from_ids` model whose catalogue has `rows` candidates of dim 64.
- `FaissIndex`: `FaissIndex.load` (with its hash check) against the time to hash the
  folder's files alone (an IVF-Flat index over `rows` vectors of dim 64).
- shard logs: opening a `ShardDataset` with `verify=False` (manifest, names, counts
  and byte sizes: a stat and a header read per file) and `verify=True` (plus the
  sha256 of every streamed column), against one epoch of batches.

Every file is read from the page cache (just written): disk reads would add the same
time to both sides. Times are medians of `--repeats`, the two loads of a `.keras` file
run alternately; the machine is shared, so read the ratios of one run.

    KERAS_BACKEND=jax python benchmarks/integrity_checks.py
    KERAS_BACKEND=jax python benchmarks/integrity_checks.py --rows 1000000 --log-rows 10000000
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common
import keras
import numpy as np

import two_tower
from two_tower.datasets.shard_dataset import ShardDataset
from two_tower.datasets.synthetic import SyntheticLog, write_shards


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of each, run alternately (a noisy neighbour slows both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, found in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            function()
            found.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _hash_files(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while block := handle.read(2**20):
                    digest.update(block)


def keras_files(rows: int, folder: Path, repeats: int) -> str:
    model = two_tower.TwoTowerRetrieval.from_ids(1000, rows, embedding_dim=64)
    model.compile(optimizer="adam")
    pairs = np.arange(100) % min(1000, rows)
    model.fit({"query": pairs, "candidate": pairs}, batch_size=50, verbose=0)  # builds it
    model.index_candidates(np.arange(rows), batch_size=65_536)
    path = folder / f"model-{rows}.keras"
    model.save(path)
    size = path.stat().st_size / 2**20
    checked, plain = _interleaved(
        lambda: two_tower.saving.load_model(path), lambda: keras.saving.load_model(path), repeats
    )
    return (
        f"| .keras, {rows:,} candidates ({size:,.0f} MiB) | {checked:.2f} s | {plain:.2f} s "
        f"(keras.saving.load_model) | {checked / plain:.2f} |"
    )


def faiss_folders(rows: int, folder: Path, repeats: int) -> str:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(rows, 64)).astype("float32")
    index = two_tower.FaissIndex()
    index.index(vectors, np.arange(rows))
    target = folder / f"faiss-{rows}"
    index.save(target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 2**20
    load = _median_seconds(lambda: two_tower.FaissIndex.load(target), repeats)
    hashing = _median_seconds(lambda: _hash_files(target), repeats)
    return (
        f"| FaissIndex, {rows:,} vectors ({size:,.0f} MiB) | {load:.2f} s | {hashing:.2f} s "
        f"(hashing its files alone) | {hashing / load:.2f} of the load |"
    )


def shard_logs(rows: int, folder: Path, repeats: int) -> list[str]:
    log = SyntheticLog(num_users=100_000, num_items=50_000)
    target = write_shards(log, folder / f"log-{rows}", rows, shard_size=1_000_000)
    size = sum(p.stat().st_size for p in target.rglob("*.npy")) / 2**20
    quick = _median_seconds(lambda: ShardDataset(target, batch_size=4096, verify=False), repeats)
    full = _median_seconds(lambda: ShardDataset(target, batch_size=4096, verify=True), repeats)
    dataset = ShardDataset(target, batch_size=4096, verify=False)

    def epoch() -> None:
        for position in range(dataset.num_batches):
            dataset[position]
        dataset.on_epoch_end()

    one_epoch = _median_seconds(epoch, 1)
    label = f"shard log, {rows:,} rows ({size:,.0f} MiB)"
    return [
        f"| {label}, open with verify=False | {quick:.3f} s | {one_epoch:.2f} s (one epoch "
        f"of batches) | {quick / one_epoch:.3f} |",
        f"| {label}, open with verify=True | {full:.3f} s | {one_epoch:.2f} s (one epoch "
        f"of batches) | {full / one_epoch:.3f} |",
    ]


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--log-rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"Keras backend: {keras.backend.backend()}")
    print("| file | checked load | beside | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for rows in args.rows:
            print(keras_files(rows, folder, args.repeats), flush=True)
        for rows in args.rows:
            print(faiss_folders(rows, folder, args.repeats), flush=True)
        for rows in args.log_rows:
            for line in shard_logs(rows, folder, args.repeats):
                print(line, flush=True)


if __name__ == "__main__":
    main()
