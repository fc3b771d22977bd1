"""How `movielens.load_tables` scales: parse time and peak memory against rows.

The real 20M/25M zips are not on these machines, so this writes synthetic files in
ml-25m's layout (`ratings.csv` with a header, `movies.csv` with quoted titles) at
each size and loads them with `sha256=None` (our own files). Prints rows/s and the
peak RSS added by the load, each in a fresh process, so one size does not inherit
another's memory.

    python benchmarks/movielens_load.py --rows 1000000,10000000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np


def write_release(folder: Path, rows: int, movies: int = 62_423, users: int = 162_541) -> None:
    if (folder / "ratings.csv").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "movies.csv", "w", encoding="utf-8") as out:
        out.write("movieId,title,genres\n")
        for movie in range(movies):
            out.write(f'{movie + 1},"Movie {movie}, The (1999)",Comedy|Drama\n')
    with open(folder / "ratings.csv", "w", encoding="utf-8") as out:
        out.write("userId,movieId,rating,timestamp\n")
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            block = np.column_stack(
                [
                    rng.integers(1, users + 1, n),
                    rng.integers(1, movies + 1, n),
                    rng.integers(1, 11, n) * 5,  # tenths: 0.5 .. 5.0
                    rng.integers(789652009, 1574327703, n),
                ]
            )
            out.write("".join(f"{u},{m},{r // 10}.{r % 10},{t}\n" for u, m, r, t in block.tolist()))


def measure(folder: str) -> None:
    from two_tower.datasets import movielens

    before = _common.peak_rss_kib()
    start = time.perf_counter()
    tables = movielens.load_tables(folder, variant="25m", sha256=None)
    seconds = time.perf_counter() - start
    peak = _common.peak_rss_kib()
    _common.report(
        {
            "rows": tables.num_ratings,
            "seconds": seconds,
            "peak_gb": peak / 1e6,
            "added_gb": (peak - before) / 1e6,
            "ratings_gb": sum(v.nbytes for v in tables.ratings.values()) / 1e9,
        }
    )


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--rows", default="1000000,10000000")
    parser.add_argument("--cache", default="/tmp/two_tower_movielens_load")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    print(f"{'rows':>12} {'file MB':>8} {'load s':>7} {'rows/s':>11} {'peak RSS GB':>11} "
          f"{'added GB':>8} {'columns GB':>10}")  # fmt: skip
    for rows in (int(r) for r in args.rows.split(",")):
        folder = Path(args.cache) / f"rows-{rows}"
        write_release(folder, rows)
        r = _common.worker_result(__file__, ["--measure", str(folder)], f"{rows:,} rows")
        size = (folder / "ratings.csv").stat().st_size / 1e6
        speed = r["rows"] / r["seconds"]
        print(f"{r['rows']:>12,} {size:>8.0f} {r['seconds']:>7.2f} {speed:>11,.0f} "
              f"{r['peak_gb']:>11.2f} {r['added_gb']:>8.2f} {r['ratings_gb']:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
