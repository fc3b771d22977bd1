"""Growing tables: what `grow_tables` costs against table size, and what steps cost after.

A model with row-sparse id tables (`IdEmbeddingTower(sparse=True)`, dim 64,
Adam) and a candidate table of `--rows` rows (queries: a tenth as many) is
trained for a few steps; then both tables grow by 1 % (`grow_tables`) and
training goes on. Per size: the time of `grow_tables` (one copy of the tables
and of Adam's two moments, O(rows)), and the warm time per step before and
after (a step must cost the same: it reads only the looked-up rows). One
process, one backend; the machine is shared, so compare within a row.

    python benchmarks/grow_tables.py --backend jax --rows 100000,1000000,4000000
"""

from __future__ import annotations

import time
from typing import Any

import _common

BATCH = 1024
DIM = 64


def _fit_ms(model: Any, rng: Any, users: int, items: int, steps: int) -> float:
    """Warm time per step of `fit` over `steps` batches of ids below `users`/`items`."""
    count = BATCH * steps
    x = {"query": rng.integers(0, users, count), "candidate": rng.integers(0, items, count)}
    model.fit(x, batch_size=BATCH, epochs=1, verbose=0)  # compiles
    start = time.perf_counter()
    model.fit(x, batch_size=BATCH, epochs=1, verbose=0)
    return 1000 * (time.perf_counter() - start) / steps


def measure(rows: int, steps: int) -> dict[str, float]:
    import keras
    import numpy as np

    import two_tower

    rng = np.random.default_rng(0)
    users = max(rows // 10, 1000)
    model = two_tower.TwoTowerRetrieval(
        two_tower.IdEmbeddingTower(users, DIM, sparse=True),
        two_tower.IdEmbeddingTower(rows, DIM, sparse=True),
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = _fit_ms(model, rng, users, rows, steps)
    grown_users, grown_rows = users + users // 100, rows + rows // 100
    start = time.perf_counter()
    model.grow_tables(query=grown_users, candidate=grown_rows)
    grow = time.perf_counter() - start
    after = _fit_ms(model, rng, grown_users, grown_rows, steps)
    return {"rows": rows, "grow_s": grow, "before_ms": before, "after_ms": after}


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--rows", default="100000,1000000,4000000")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    _common.use_backend(args.backend)
    print(f"backend {args.backend}, batch {BATCH}, dim {DIM}, Adam, sparse tables, +1 % rows")
    print("| candidate rows | grow_tables (s) | ms/step before | ms/step after | after / before |")
    print("|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        result = measure(rows, args.steps)
        print(
            f"| {rows:,} | {result['grow_s']:.3f} | {result['before_ms']:.2f} | "
            f"{result['after_ms']:.2f} | {result['after_ms'] / result['before_ms']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
