"""Filtered search: `where` filters against unfiltered search and post-filtering.

For each catalogue size and each share of the catalogue a filter allows (1 %, 10 %,
100 %), on one backend, in one process:

- unfiltered: `BruteForceIndex.search(queries, k)`;
- filtered: `search(queries, k, where={"bucket": [...]})`, the exact top k among
  the allowed candidates (a selective filter searches a copy of the allowed rows
  only; a broad one scores everything and masks);
- post-filtering: the unfiltered top k, then the allowed ones kept: fewer than k
  (the "results" column: the mean kept per query);
- faiss: `FaissIndex.from_index` of the same catalogue with its defaults,
  unfiltered and filtered, with its recall@k against the exact filtered top k
  (`--no-faiss` leaves it out).

Then, for each size, changes to the exact index (and to the faiss one) against
indexing it again: `add` of `--changed` new candidates, `remove` of as many,
`update` of as many, each the best of `--repeats` rounds (the first `add` after
`index` also copies the ids and attributes into buffers with room: timed apart),
and `index` of the whole catalogue (for faiss, `from_index`: training its lists
and filling them), and a model's `index_candidates` of the whole catalogue (an
`IdEmbeddingTower` of the catalogue's ids embedding every id, then `index`: what
a change cost a user before `add`, `remove` and `update`). After the rounds the
changed exact index's results (ids and scores) are checked equal to those of an
index built from scratch on its catalogue (ids; scores to float32 rounding, since a
chunk grown with room has another shape than a fresh one).

The candidates and queries come from a Gaussian mixture of 1,000 components, as in
`benchmarks/retrieval.py` (clustered, as a trained model's embeddings are);
`bucket` is `position % 100`, so a filter on `fraction × 100` buckets allows that
share. Each time is the best of `--repeats` after one warm-up call (compilation).
Run:

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
    parser.add_argument("--no-faiss", dest="faiss", action="store_false")
    parser.add_argument("--changed", type=int, default=1000)
    args = parser.parse_args()
    _common.use_backend(args.backend)
    import numpy as np

    import two_tower

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def mixture(rows: int) -> Any:
        noise = rng.normal(scale=0.6 / np.sqrt(args.dim), size=(rows, args.dim))
        return (centres[rng.integers(0, len(centres), rows)] + noise).astype("float32")

    queries = mixture(args.queries)
    print(
        f"backend {args.backend}, {args.queries:,} queries, dim {args.dim}, k = {args.k}\n\n"
        "| candidates | allowed | search | s | / unfiltered | results per query | recall |\n"
        "|---|---|---|---|---|---|---|"
    )
    changes = []
    for size in (int(text) for text in args.sizes.split(",")):
        bucket = np.arange(size) % 100
        index = two_tower.BruteForceIndex()
        index.index(mixture(size), attributes={"bucket": bucket})

        unfiltered, (top_ids, _) = _best(lambda i=index: i.search(queries, args.k), args.repeats)
        print(f"| {size:,} | 100 % | unfiltered | {unfiltered:.3f} | 1.00 | {args.k} | 1.00 |")
        exact = {}
        for fraction in (0.01, 0.10, 1.0):
            allowed = list(range(round(fraction * 100)))
            where = {"bucket": allowed}
            seconds, (ids, _) = _best(
                lambda w=where, i=index: i.search(queries, args.k, where=w), args.repeats
            )
            assert np.isin(ids % 100, allowed).all()  # ids are positions here
            exact[fraction] = ids
            kept = float(np.isin(top_ids % 100, allowed).sum(axis=1).mean())
            share = f"{fraction:.0%}".replace("%", " %")
            print(
                f"| {size:,} | {share} | filtered | {seconds:.3f} | "
                f"{seconds / unfiltered:.2f} | {args.k} | 1.00 |"
            )
            post = unfiltered  # the same search, then a host-side filter
            start = time.perf_counter()
            np.isin(top_ids % 100, allowed)
            post += time.perf_counter() - start
            print(
                f"| {size:,} | {share} | post-filtered | {post:.3f} | "
                f"{post / unfiltered:.2f} | {kept:.1f} | {kept / args.k:.2f} |"
            )
        if args.faiss:
            _faiss_rows(two_tower.FaissIndex.from_index(index), queries, exact, size, args)
        embedded = _index_candidates_seconds(size, args.dim)
        changes.append(_change_rows(index, mixture, queries, size, args, "exact", None, embedded))
        if args.faiss:
            start = time.perf_counter()
            ann = two_tower.FaissIndex.from_index(index)
            trained = time.perf_counter() - start
            changes.append(
                _change_rows(ann, mixture, queries, size, args, "faiss", trained, embedded)
            )
        del index
    print(
        f"\nChanges of {args.changed:,} candidates against indexing the whole catalogue again: "
        "the index's own `index` (or faiss' training and filling), and the model's "
        "`index_candidates` (the candidate tower over every id, then `index`):\n\n"
        "| candidates | index | change | ms | index again / change | "
        "index_candidates / change |\n|---|---|---|---|---|---|"
    )
    for rows in changes:
        for row in rows:
            print(row)


def _index_candidates_seconds(size: int, dim: int) -> float:
    """Best of two `index_candidates` of `size` ids through an `IdEmbeddingTower`."""
    import numpy as np

    import two_tower

    model = two_tower.TwoTowerRetrieval(
        two_tower.IdEmbeddingTower(10, dim), two_tower.IdEmbeddingTower(size, dim)
    )
    ids = np.arange(size)
    return _best(lambda: model.index_candidates(ids), 2)[0]


def _change_rows(
    index: Any, mixture: Any, queries: Any, size: int, args: Any, name: str,
    trained: float | None, embedded: float,
) -> list[str]:  # fmt: skip
    """`add`, `remove` and `update` of `--changed` candidates against `index` again
    (for faiss, `trained`: the time `from_index` took to train and fill the lists)
    and against `index_candidates` (`embedded` seconds; for faiss, plus training)."""
    import numpy as np

    import two_tower

    changed = args.changed
    rng = np.random.default_rng(1)

    def timed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
        start = time.perf_counter()
        call(*args, **kwargs)
        return time.perf_counter() - start

    base = int(index.candidate_ids.max()) + 1  # new ids from here
    first = timed(
        index.add, mixture(changed), np.arange(base, base + changed),
        attributes={"bucket": np.arange(changed) % 100},
    )  # fmt: skip
    index.remove(np.arange(base, base + changed))
    times: dict[str, list[float]] = {"add": [], "remove": [], "update": []}
    next_id = base + changed
    for _ in range(args.repeats + 1):
        new_ids = np.arange(next_id, next_id + changed)
        next_id += changed
        rows, buckets = mixture(changed), np.arange(changed) % 100
        times["add"].append(timed(index.add, rows, new_ids, attributes={"bucket": buckets}))
        gone = rng.choice(index.candidate_ids, changed, replace=False)
        times["remove"].append(timed(index.remove, gone))
        picked = rng.choice(index.candidate_ids, changed, replace=False)
        rows = mixture(changed)
        times["update"].append(timed(index.update, picked, rows))
    if trained is None:
        embeddings, ids, attributes = index.embeddings(), index.candidate_ids, index.attributes()
        fresh = two_tower.BruteForceIndex()
        again = min(timed(fresh.index, embeddings, ids, attributes=attributes) for _ in range(2))
        for where in (None, {"bucket": [1, 2, 3]}):
            found, scores = index.search(queries[:64], args.k, where=where)
            expected, expected_scores = fresh.search(queries[:64], args.k, where=where)
            # Ids equal; scores to float32 rounding: a chunk grown with room has
            # another shape than a fresh one, and XLA may sum in another order.
            assert np.array_equal(found, expected)
            np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)
    else:
        again = trained
    model = embedded + (again if trained is not None else 0.0)
    rows_out = [f"| {size:,} | {name} | index again | {1000 * again:.1f} | 1 | |"]
    rows_out.append(f"| {size:,} | {name} | index_candidates again | {1000 * model:.1f} | | 1 |")
    rows_out.append(
        f"| {size:,} | {name} | first add | {1000 * first:.2f} | {again / first:.0f} | "
        f"{model / first:.0f} |"
    )
    for change, values in times.items():
        best = min(values[1:])  # (the first round warms up)
        rows_out.append(
            f"| {size:,} | {name} | {change} | {1000 * best:.2f} | {again / best:.0f} | "
            f"{model / best:.0f} |"
        )
    return rows_out


def _faiss_rows(ann: Any, queries: Any, exact: dict[float, Any], size: int, args: Any) -> None:
    """`FaissIndex` unfiltered and filtered, each with its recall against exact."""
    import numpy as np

    def recall(found: Any, expected: Any) -> float:
        hits = sum(len(np.intersect1d(f, e)) for f, e in zip(found, expected, strict=True))
        return hits / expected.size

    unfiltered, (ids, _) = _best(lambda: ann.search(queries, args.k), args.repeats)
    print(
        f"| {size:,} | 100 % | faiss | {unfiltered:.3f} | 1.00 | {args.k} | "
        f"{recall(ids, exact[1.0]):.2f} |"
    )
    for fraction, expected in exact.items():
        where = {"bucket": list(range(round(fraction * 100)))}
        seconds, (ids, _) = _best(
            lambda w=where: ann.search(queries, args.k, where=w), args.repeats
        )
        results = float((ids != -1).sum(axis=1).mean())
        share = f"{fraction:.0%}".replace("%", " %")
        print(
            f"| {size:,} | {share} | faiss filtered | {seconds:.3f} | "
            f"{seconds / unfiltered:.2f} | {results:.1f} | {recall(ids, expected):.2f} |"
        )


if __name__ == "__main__":
    main()
