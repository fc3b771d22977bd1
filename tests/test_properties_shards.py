"""Property-based tests (hypothesis) of `ShardDataset` against the in-memory log.

Hypothesis draws the shard sizes (any positive sizes, in a hand-made log, and the
equal shards of `write_shards`), the batch size, the seed and the columns; the
reference is the concatenated NumPy arrays, cut every `batch_size` rows. Without
shuffle the batches must be exactly those; with shuffle every row (kept whole: its
user, item and time together) comes exactly once per epoch, and the batches have
the sizes of the unshuffled ones. Pure NumPy: no model, fast on every backend.

Locally the exploration is random (and remembered in `.hypothesis/`); with `CI`
set, the "ci" profile derandomizes it, as in `tests/test_properties.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from two_tower.datasets import ShardDataset, synthetic
from two_tower.saving._files import sha256

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile("ci" if os.environ.get("CI") else "dev")

EXAMPLES = 40
SIZES = st.lists(st.integers(1, 40), min_size=1, max_size=6)
BATCH = st.integers(1, 70)


def write_log(folder: Path, sizes: list[int], seed: int) -> dict[str, np.ndarray]:
    """A log with shards of `sizes` rows in the current layout; returns its columns joined."""
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    columns = {
        "user": rng.integers(0, 7, total).astype("int32"),
        "item": rng.integers(0, 11, total).astype("int32"),
        "timestamp": np.arange(total, dtype="int64"),  # each row's identity
    }
    shards, start = [], 0
    for index, rows in enumerate(sizes):
        name = f"generation-0/shard-{index:05d}"
        (folder / name).mkdir(parents=True)
        hashes, sizes_on_disk = {}, {}
        for column, values in columns.items():
            path = folder / name / f"{column}.npy"
            np.save(path, values[start : start + rows])
            hashes[column] = sha256(path)
            sizes_on_disk[column] = path.stat().st_size
        shards.append({"name": name, "rows": rows, "sha256": hashes, "bytes": sizes_on_disk})
        start += rows
    manifest = {
        "format": "two_tower.synthetic/2",
        "rows": total,
        "columns": {column: str(values.dtype) for column, values in columns.items()},
        "generator": {"num_users": 7, "num_items": 11},
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return columns


STREAMED = {"u": "user", "i": "item", "t": "timestamp"}


def epoch(dataset: ShardDataset) -> list[dict[str, np.ndarray]]:
    """One pass, as `fit` reads it: dataset[0], dataset[1], ..."""
    return [dataset[index] for index in range(len(dataset))]


def reference_batches(columns: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    """The in-memory log cut every `batch_size` rows (NumPy only)."""
    total = len(columns["timestamp"])
    return [
        {key: columns[column][start : start + batch_size] for key, column in STREAMED.items()}
        for start in range(0, total, batch_size)
    ]


def check_unshuffled(dataset: ShardDataset, columns: dict[str, np.ndarray], batch_size: int):
    expected = reference_batches(columns, batch_size)
    for _ in range(2):  # the order does not change from one epoch to the next
        got = epoch(dataset)
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            assert sorted(mine) == sorted(theirs)
            for key in theirs:
                np.testing.assert_array_equal(mine[key], theirs[key])


def check_shuffled(dataset: ShardDataset, columns: dict[str, np.ndarray], batch_size: int):
    sizes = [len(batch["t"]) for batch in reference_batches(columns, batch_size)]
    for _ in range(2):
        got = epoch(dataset)
        assert [len(batch["t"]) for batch in got] == sizes
        times = np.concatenate([batch["t"] for batch in got])
        np.testing.assert_array_equal(np.sort(times), columns["timestamp"])  # each row once
        rows = np.searchsorted(columns["timestamp"], times)  # times are unique and sorted
        for key in ("u", "i"):  # rows stay whole
            joined = np.concatenate([batch[key] for batch in got])
            np.testing.assert_array_equal(joined, columns[STREAMED[key]][rows])


@settings(max_examples=EXAMPLES, deadline=None)
@given(sizes=SIZES, batch_size=BATCH, data_seed=st.integers(0, 2**16))
@example(sizes=[1], batch_size=1, data_seed=0)
@example(sizes=[5, 1, 17], batch_size=4, data_seed=1)  # batches straddle shards
@example(sizes=[3, 3], batch_size=70, data_seed=2)  # one batch, larger than the log
def test_unshuffled_batches_are_the_in_memory_order(sizes, batch_size, data_seed):
    with tempfile.TemporaryDirectory() as folder:
        columns = write_log(Path(folder), sizes, data_seed)
        dataset = ShardDataset(folder, batch_size=batch_size, columns=STREAMED, shuffle=False)
        check_unshuffled(dataset, columns, batch_size)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    sizes=SIZES,
    batch_size=BATCH,
    data_seed=st.integers(0, 2**16),
    seed=st.integers(0, 2**31),
)
@example(sizes=[5, 1, 17], batch_size=4, data_seed=1, seed=0)
def test_shuffled_epochs_give_every_row_once(sizes, batch_size, data_seed, seed):
    with tempfile.TemporaryDirectory() as folder:
        columns = write_log(Path(folder), sizes, data_seed)
        dataset = ShardDataset(folder, batch_size=batch_size, columns=STREAMED, seed=seed)
        check_shuffled(dataset, columns, batch_size)


@settings(max_examples=EXAMPLES // 2, deadline=None)
@given(
    rows=st.integers(1, 120),
    shard_size=st.integers(1, 50),
    batch_size=BATCH,
    shuffle=st.booleans(),
)
def test_write_shards_logs_stream_in_the_generators_order(rows, shard_size, batch_size, shuffle):
    log = synthetic.SyntheticLog(num_users=7, num_items=11, num_clusters=2, seed=3)
    columns = log.to_arrays(rows, chunk_size=shard_size)
    with tempfile.TemporaryDirectory() as folder:
        path = synthetic.write_shards(log, Path(folder) / "log", rows, shard_size=shard_size)
        dataset = ShardDataset(path, batch_size=batch_size, columns=STREAMED, shuffle=shuffle)
        (check_shuffled if shuffle else check_unshuffled)(dataset, columns, batch_size)
