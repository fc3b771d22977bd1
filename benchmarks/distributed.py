"""What `keras.distribution` costs and saves on JAX: table bytes per device, steps/s.

    python benchmarks/distributed.py [--rows 10000000] [--dim 64] [--steps 50]
                                     [--catalogue 1000000]

Starts JAX with 8 simulated CPU devices (`--xla_force_host_platform_device_count`).

1. Bytes per device of a `rows x dim` float32 table, replicated (`DataParallel`)
   against row-sharded over 8 devices (`ModelParallel` with
   `two_tower.distribution.layout_map`), read from the shardings Keras gives the
   variable (`shard_shape`, no 10^7-row table allocated 8 times). The same
   computation is checked against a real 10^5-row table's shards.
2. Training steps/s of the default softmax model (`from_ids`, batch 1024) under
   `DataParallel` on 1, 2, 4 and 8 simulated devices. All 8 "devices" share this
   machine's cores, so this shows the overhead of splitting a step, not a speed-up.
3. The exact index (`BruteForceIndex`) of a `catalogue x dim` catalogue: bytes
   each device holds, read from the indexed arrays' shards, on one device against
   indexed under a distribution of 8 (row-sharded, each device ranking its own
   rows), and the search time of 1,024 queries (k = 100) on both. The ids are
   compared: each device's matrix product sums in its own order, so scores
   differ in float32 rounding and near-equal candidates may swap; the merge
   itself is exact. Same caveat: 8 simulated devices share the cores.
"""

from __future__ import annotations

import os
import time

import _common

_common.default_backend("jax")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import two_tower  # noqa: E402

DEVICES = 8


def _model_parallel() -> keras.distribution.ModelParallel:
    mesh = keras.distribution.DeviceMesh((1, DEVICES), ["batch", "model"], jax.devices())
    return keras.distribution.ModelParallel(
        layout_map=two_tower.distribution.layout_map(mesh), batch_dim_name="batch"
    )


def _bytes_per_device(distribution: keras.distribution.Distribution, rows: int, dim: int) -> int:
    """Largest per-device shard of a `rows x dim` float32 table named like a tower's."""

    class _Table:  # what `get_variable_layout` reads of a variable
        path = "candidate_tower/embedding/embeddings"
        shape = (rows, dim)
        _layout = None

    layout = distribution.get_variable_layout(_Table())
    if layout.device_mesh is None:
        layout.device_mesh = distribution.device_mesh
    shard = layout.backend_layout.shard_shape((rows, dim))
    return int(np.prod(shard)) * 4


def table_bytes(rows: int, dim: int) -> None:
    replicated = keras.distribution.DataParallel(devices=jax.devices())
    sharded = _model_parallel()
    full = rows * dim * 4
    print(f"\n## A {rows:,} x {dim} float32 table ({full / 2**30:.2f} GiB) on {DEVICES} devices")
    print("| layout | bytes per device | fraction of the table |")
    print("|---|---|---|")
    for name, distribution in (
        ("replicated (DataParallel)", replicated),
        ("row-sharded (ModelParallel + layout_map)", sharded),
    ):
        per_device = _bytes_per_device(distribution, rows, dim)
        print(
            f"| {name} | {per_device:,} ({per_device / 2**20:,.1f} MiB) | {per_device / full:.3f} |"
        )
    # The same computation against a real table's shards.
    keras.distribution.set_distribution(sharded)
    tower = two_tower.IdEmbeddingTower(100_000, embedding_dim=dim, name="candidate_tower")
    tower(np.arange(2))
    shards = tower.embedding.embeddings.value.addressable_shards
    real = max(shard.data.nbytes for shard in shards)
    keras.distribution.set_distribution(None)
    expected = _bytes_per_device(sharded, 100_000, dim)
    print(
        f"\nCheck on a real 100,000 x {dim} table: {len(shards)} shards of {real:,} bytes "
        f"(computed from the layout: {expected:,}) -> {'same' if real == expected else 'DIFFERENT'}"
    )


def steps_per_second(steps: int, batch_size: int = 1024) -> None:
    users, items = 100_000, 50_000
    rng = np.random.default_rng(0)
    rows = steps * batch_size
    x = {"query": rng.integers(0, users, rows), "candidate": rng.integers(0, items, rows)}
    print(f"\n## Training steps/s, from_ids({users:,}, {items:,}), batch {batch_size}")
    print("| devices | steps/s (warm) | ms/step | vs 1 device |")
    print("|---|---|---|---|")
    baseline = None
    for count in (1, 2, 4, 8):
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[:count])
        )
        model = two_tower.TwoTowerRetrieval.from_ids(users, items)
        model.compile(optimizer=keras.optimizers.Adagrad(0.1))
        model.fit(x, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)  # compile
        start = time.perf_counter()
        model.fit(x, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        seconds = time.perf_counter() - start
        rate = steps / seconds
        baseline = baseline or rate
        print(f"| {count} | {rate:.1f} | {1000 / rate:.1f} | {rate / baseline:.2f}x |")
    keras.distribution.set_distribution(None)
    print(
        f"\n{os.cpu_count()} CPU cores shared by all simulated devices: the ratio shows the "
        "cost of splitting each step, not what real devices would gain."
    )


def index_bytes_and_search(catalogue: int, dim: int, queries: int = 1024, k: int = 100) -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(catalogue, dim)).astype("float32")
    query_embeddings = rng.normal(size=(queries, dim)).astype("float32")
    print(f"\n## Exact index of {catalogue:,} x {dim} float32 ({catalogue * dim * 4:,} bytes)")
    print(
        "| index | devices holding it | largest bytes per device | fraction | search s "
        "| ids equal to one device | max score difference |"
    )
    print("|---|---|---|---|---|---|---|")
    reference = None
    for name, distribution in (
        ("one device", None),
        (
            "sharded (DataParallel, 8 devices)",
            keras.distribution.DataParallel(devices=jax.devices()),
        ),
    ):
        keras.distribution.set_distribution(distribution)
        index = two_tower.BruteForceIndex()
        index.index(embeddings)
        sharded = index._catalogue.sharded  # noqa: SLF001  the arrays it holds
        arrays = list(index._catalogue.chunks if sharded is None else sharded.chunks)  # noqa: SLF001
        per_device: dict[object, int] = {}
        for array in arrays:
            for shard in array.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        index.search(query_embeddings[:8], k)  # compile
        start = time.perf_counter()
        ids, scores = index.search(query_embeddings, k)
        seconds = time.perf_counter() - start
        reference = reference or (scores, ids)
        largest = max(per_device.values())
        print(
            f"| {name} | {len(per_device)} | {largest:,} | {largest / (catalogue * dim * 4):.3f} "
            f"| {seconds:.2f} | {np.mean(ids == reference[1]):.5f} "
            f"| {np.max(np.abs(scores - reference[0])):.1e} |"
        )
    keras.distribution.set_distribution(None)


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--catalogue", type=int, default=1_000_000)
    args = parser.parse_args()
    table_bytes(args.rows, args.dim)
    steps_per_second(args.steps)
    index_bytes_and_search(args.catalogue, args.dim)


if __name__ == "__main__":
    main()
