"""How `InteractionLog`'s cost grows with the log: build, history and peak memory.

A synthetic log of n interactions (n / 100 users, 10^5 items, random times) at
each size. Per size, one process measures:
- build: `InteractionLog(users, items, times)` (one sort, O(n log n));
- history: `log.history(users, times, width=32)` for a batch of 65,536 queries
  drawn from the log (the per-batch cost a data pipeline pays; two binary
  searches per query, so it should grow with log n, not n);
- peak: the process' peak resident memory above the arrays' own size.
At the smallest size it also times a per-user Python loop (group the log by
user, then a `bisect` per query) on the same queries, and checks that both give
the same histories, so the ratio compares equal work.

    python benchmarks/history_scale.py --sizes 100000,1000000,10000000
"""

from __future__ import annotations

import argparse
import bisect
import time
from collections import defaultdict

import _common

WIDTH = 32
QUERIES = 65_536


def _log(size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    import numpy as np

    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(size // 100, 1), size, dtype=np.int64)
    items = rng.integers(0, 100_000, size, dtype=np.int32)
    times = rng.integers(0, 10**9, size, dtype=np.int64)
    return users, items, times


def _python_history(users, items, times, query_users, query_times):  # type: ignore[no-untyped-def]
    """The obvious per-user loop: a reference for the ratio, not for use."""
    import numpy as np

    by_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for user, item, when in zip(users.tolist(), items.tolist(), times.tolist(), strict=True):
        by_user[user].append((when, item))
    for rows in by_user.values():
        rows.sort()
    stamps = {user: [when for when, _ in rows] for user, rows in by_user.items()}
    out = np.full((len(query_users), WIDTH), -1, np.int32)
    for row, (user, when) in enumerate(
        zip(query_users.tolist(), query_times.tolist(), strict=True)
    ):
        end = bisect.bisect_left(stamps.get(user, []), when)
        recent = [item for _, item in by_user[user][max(end - WIDTH, 0) : end]][::-1]
        out[row, : len(recent)] = recent
    return out


def measure(size: int, reference: bool) -> dict[str, float]:
    """One size, in this process."""
    import numpy as np

    import two_tower

    users, items, times = _log(size)
    base = _common.peak_rss_kib() / 1024
    start = time.perf_counter()
    log = two_tower.InteractionLog(users, items, times)
    build = time.perf_counter() - start
    rng = np.random.default_rng(1)
    rows = rng.integers(0, size, QUERIES)
    query_users, query_times = users[rows], times[rows]
    batches = []
    for _ in range(3):  # the median of three batches: a pipeline's steady cost
        start = time.perf_counter()
        history = log.history(query_users, query_times, width=WIDTH)
        batches.append(time.perf_counter() - start)
    batch = sorted(batches)[1]
    result = {
        "size": size,
        "build_s": build,
        "history_ms": batch * 1e3,
        "peak_mb": _common.peak_rss_kib() / 1024 - base,
        "arrays_mb": (users.nbytes + items.nbytes + times.nbytes) / 2**20,
    }
    if reference:
        start = time.perf_counter()
        expected = _python_history(users, items, times, query_users, query_times)
        result["python_s"] = time.perf_counter() - start
        if not np.array_equal(history, expected):
            raise AssertionError("InteractionLog and the Python loop disagree")
    return result


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        _common.report(measure(args.one, args.reference))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    print(
        f"{'interactions':>12} {'build s':>8} {'history ms':>11} {'per query us':>13} "
        f"{'peak MB':>8} {'log MB':>7} {'python s':>9} {'ratio':>6}"
    )
    for size in sizes:
        arguments = ["--one", str(size)]
        if size == min(sizes):
            arguments.append("--reference")
        row = _common.worker_result(__file__, arguments, f"{size:,} interactions")
        python = row.get("python_s")
        extra = (
            f"{python:>9.2f} {python / (row['build_s'] + row['history_ms'] / 1e3):>5.0f}x"
            if python
            else ""
        )
        print(
            f"{size:>12,} {row['build_s']:>8.2f} {row['history_ms']:>11.1f} "
            f"{row['history_ms'] * 1e3 / QUERIES:>13.2f} {row['peak_mb']:>8.0f} "
            f"{row['arrays_mb']:>7.0f} {extra}"
        )
    print(
        f"history: {QUERIES:,} queries of width {WIDTH}; python: a per-user loop on the "
        "same queries; ratio: python / (build + history), both checked equal"
    )


if __name__ == "__main__":
    main()
