"""Filtered exact search: `where` filters against unfiltered search and post-filtering.

For each catalogue size and each share of the catalogue a filter allows (1 %, 10 %,
100 %), on one backend, in one process:

- unfiltered: `BruteForceIndex.search(queries, k)`;
- filtered: `search(queries, k, where={"bucket": [...]})`, the exact top k among
  the allowed candidates (a selective filter searches a copy of the allowed rows
  only; a broad one scores everything and masks);
- post-filtering: the unfiltered top k, then the allowed ones kept: fewer than k
  (the "results" column: the mean kept per query).

The candidates are random Gaussian rows; `bucket` is `position % 100`, so a filter
on `fraction × 100` buckets allows that share. Each time is the best of `--repeats`
after one warm-up call (compilation). Run:

    python benchmarks/live_catalogue.py --backend jax --sizes 100000,1000000
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import _common


def _best(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of `repeats` calls after one warm-up (compilation), and a result."""
    call()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    _common.use_backend(args.backend)
    import numpy as np

    import two_tower

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, args.dim)).astype("float32")
    print(
        f"backend {args.backend}, {args.queries:,} queries, dim {args.dim}, k = {args.k}\n\n"
        "| candidates | allowed | search | s | / unfiltered | results per query |\n"
        "|---|---|---|---|---|---|"
    )
    for size in (int(text) for text in args.sizes.split(",")):
        candidates = rng.standard_normal((size, args.dim)).astype("float32")
        bucket = np.arange(size) % 100
        index = two_tower.BruteForceIndex()
        index.index(candidates, attributes={"bucket": bucket})
        del candidates

        unfiltered, (top_ids, _) = _best(lambda i=index: i.search(queries, args.k), args.repeats)
        print(f"| {size:,} | 100 % | unfiltered | {unfiltered:.3f} | 1.00 | {args.k} |")
        for fraction in (0.01, 0.10, 1.0):
            allowed = list(range(round(fraction * 100)))
            where = {"bucket": allowed}
            seconds, (ids, _) = _best(
                lambda w=where, i=index: i.search(queries, args.k, where=w), args.repeats
            )
            assert np.isin(ids % 100, allowed).all()  # ids are positions here
            kept = float(np.isin(top_ids % 100, allowed).sum(axis=1).mean())
            share = f"{fraction:.0%}".replace("%", " %")
            print(
                f"| {size:,} | {share} | filtered | {seconds:.3f} | "
                f"{seconds / unfiltered:.2f} | {args.k} |"
            )
            post = unfiltered  # the same search, then a host-side filter
            start = time.perf_counter()
            np.isin(top_ids % 100, allowed)
            post += time.perf_counter() - start
            print(
                f"| {size:,} | {share} | post-filtered | {post:.3f} | "
                f"{post / unfiltered:.2f} | {kept:.1f} |"
            )


if __name__ == "__main__":
    main()
