"""Hashed and quotient-remainder embeddings against a full table, on MovieLens 100K and
the synthetic log.

For each side (the user tower, then the item tower) it swaps the full table
(`IdEmbeddingTower`) for:
- `HashedEmbedding` with 1/2, 1/4 and 1/10 of the ids as buckets (one hash), and
  1/4 with two hashes (`num_hashes=2`, same memory);
- `QuotientRemainderEmbedding` (`hashed=False`, `"multiply"`) with the same number
  of rows as each hashed table (the largest `num_collisions` that fits), and at
  its fewest rows (`num_collisions = ceil(sqrt(ids))`).
The other side keeps its full table. Every model: 32 dimensions, no bias, the
full-catalogue softmax, Adam(0.01), batch 1000; the same seed for each.

Data: MovieLens 100K, the 80/20 random split of `movielens_quality.py` (seed 42),
and a `SyntheticLog` (clustered users and items, power-law popularity), 80/20
random split. Metric: recall@k over the full catalogue, train items excluded
(`two_tower.evaluation.evaluate_retrieval`'s `recall_at_k`: per test user, the
share of their test items in the top k, averaged over users).

    python benchmarks/hashed_embeddings.py --backend jax
"""

from __future__ import annotations

import argparse
import math
import time

import _common

KS = (10, 50, 100)
FRACTIONS = (2, 4, 10)


def _qr_collisions(ids: int, rows: int) -> int:
    """The largest `m` whose two tables, `ceil(ids / m) + m` rows, fit in `rows`."""
    best = math.isqrt(ids - 1) + 1
    for m in range(best, ids + 1):
        if -(-ids // m) + m <= rows:
            best = m
    return best


def variants(ids: int) -> list[tuple[str, dict]]:
    """(label, layer spec) of every table compared for a side of `ids` ids."""
    found: list[tuple[str, dict]] = [("full table", {"kind": "full"})]
    for fraction in FRACTIONS:
        buckets = ids // fraction
        found.append((f"hashed 1/{fraction}", {"kind": "hashed", "buckets": buckets}))
        if fraction == 4:
            found.append(
                (f"hashed 1/{fraction}, 2 hashes", {"kind": "hashed", "buckets": buckets, "k": 2})
            )
    for fraction in FRACTIONS:
        m = _qr_collisions(ids, ids // fraction)
        found.append((f"QR 1/{fraction} (m={m})", {"kind": "qr", "m": m}))
    smallest = math.isqrt(ids - 1) + 1
    found.append((f"QR sqrt (m={smallest})", {"kind": "qr", "m": smallest}))
    return found


def worker(backend: str, data_dir: str | None, seed: int, epochs: int, synthetic: dict) -> dict:
    _common.use_backend(backend)
    import keras
    import numpy as np

    import two_tower
    from two_tower.datasets import movielens
    from two_tower.datasets.synthetic import SyntheticLog
    from two_tower.embeddings.hashed_embedding import HashedEmbedding
    from two_tower.embeddings.quotient_remainder_embedding import QuotientRemainderEmbedding
    from two_tower.evaluation import evaluate_retrieval

    def layer(spec: dict, ids: int, dim: int = 32) -> keras.layers.Layer:
        if spec["kind"] == "full":
            return two_tower.IdEmbeddingTower(ids, dim)
        if spec["kind"] == "hashed":
            return HashedEmbedding(spec["buckets"], dim, num_hashes=spec.get("k", 1))
        return QuotientRemainderEmbedding(ids, dim, num_collisions=spec["m"], hashed=False)

    def run(dataset: str, train: dict, test: dict, num_users: int, num_items: int) -> list:
        rows = []
        for side, ids in (("user", num_users), ("item", num_items)):
            for label, spec in variants(ids):
                if side == "item" and spec["kind"] == "full":
                    continue  # the same model as the user side's full table
                keras.utils.set_random_seed(seed)
                varied = layer(spec, ids)
                query = varied if side == "user" else layer({"kind": "full"}, num_users)
                candidate = varied if side == "item" else layer({"kind": "full"}, num_items)
                model = two_tower.TwoTowerRetrieval(
                    query, candidate, loss="full_softmax", catalogue_size=num_items
                )
                model.compile(optimizer=keras.optimizers.Adam(0.01))
                started = time.perf_counter()
                model.fit(
                    {"query": train["user"], "candidate": train["item"]},
                    batch_size=1000,
                    epochs=epochs,
                    verbose=0,
                )
                seconds = time.perf_counter() - started
                queries = keras.ops.convert_to_numpy(model.query_tower(np.arange(num_users)))
                catalogue = keras.ops.convert_to_numpy(model.candidate_tower(np.arange(num_items)))
                recall = evaluate_retrieval(
                    queries,
                    catalogue,
                    test["user"],
                    test["item"],
                    exclude_query_ids=train["user"],
                    exclude_candidate_ids=train["item"],
                    ks=KS,
                )["unseen"]
                parameters = sum(int(np.prod(w.shape)) for w in varied.trainable_weights)
                rows.append(
                    {
                        "dataset": dataset,
                        "side": "user + item" if spec["kind"] == "full" else side,
                        "table": label,
                        "ids": ids,
                        "parameters": parameters,
                        "recall": {str(k): recall[f"recall_at_{k}"] for k in KS},
                        "seconds_per_epoch": seconds / epochs,
                    }
                )
        return rows

    ratings = movielens.load_ratings(data_dir)
    records = {
        "user": ratings["user_id"].astype("int32"),
        "item": ratings["movie_id"].astype("int32") - 1,  # movies 1..1682 as rows 0..1681
    }
    train, test = movielens.random_split(records, test_fraction=0.2, seed=seed)
    results = run("MovieLens 100K", train, test, 944, 1682)

    log = SyntheticLog(
        num_users=synthetic["users"], num_items=synthetic["items"], num_clusters=50, seed=seed
    )
    arrays = log.to_arrays(synthetic["interactions"])
    order = np.random.default_rng(seed).permutation(len(arrays["user"]))
    cut = int(0.8 * len(order))
    pick = {name: arrays[name] for name in ("user", "item")}
    synthetic_train = {name: values[order[:cut]] for name, values in pick.items()}
    synthetic_test = {name: values[order[cut:]] for name, values in pick.items()}
    results += run(
        "synthetic", synthetic_train, synthetic_test, synthetic["users"], synthetic["items"]
    )
    return {"rows": results, "keras": keras.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backend", default="jax")
    _common.add_data_dir_argument(parser)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--synthetic-users", type=int, default=5000)
    parser.add_argument("--synthetic-items", type=int, default=2000)
    parser.add_argument("--synthetic-interactions", type=int, default=100_000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    synthetic = {
        "users": args.synthetic_users,
        "items": args.synthetic_items,
        "interactions": args.synthetic_interactions,
    }
    if args.worker:
        _common.report(worker(args.backend, args.data_dir, args.seed, args.epochs, synthetic))
        return
    arguments = ["--worker", "--backend", args.backend, "--seed", str(args.seed)]
    arguments += ["--epochs", str(args.epochs)]
    arguments += ["--synthetic-users", str(args.synthetic_users)]
    arguments += ["--synthetic-items", str(args.synthetic_items)]
    arguments += ["--synthetic-interactions", str(args.synthetic_interactions)]
    if args.data_dir:
        arguments += ["--data-dir", args.data_dir]
    result = _common.worker_result(__file__, arguments, args.backend)
    print(
        f"\n{args.backend}, Keras {result['keras']}, {args.epochs} epochs; recall@k over the "
        "full catalogue, train items excluded; parameters of the varied side's tables; "
        "s/epoch: fit time / epochs, compilation included.\n"
    )
    header = "| data | side | table | parameters | " + " | ".join(f"R@{k}" for k in KS)
    print(header + " | s/epoch |")
    print("|" + "---|" * 8)
    for row in result["rows"]:
        full = row["ids"] * 32
        recall = " | ".join(f"{row['recall'][str(k)]:.3f}" for k in KS)
        share = f"{row['parameters']:,} ({row['parameters'] / full:.0%})"
        print(
            f"| {row['dataset']} | {row['side']} | {row['table']} | {share} | {recall} | "
            f"{row['seconds_per_epoch']:.2f} |"
        )


if __name__ == "__main__":
    main()
