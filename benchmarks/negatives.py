"""Whether each technique of `two_tower.negatives` (and mixed precision) helps, on validation.

Two logs, each split in time, the validation part never used to fit:

- MovieLens 100K: the earliest 80 % of ratings (the temporal split's training part)
  split again in time, 90 % to fit and the latest 10 % to validate; top-10/100
  over the full catalogue with each user's fitting movies excluded.
- A synthetic log (`SyntheticLog`: 2,000 users, 5,000 items in 20 clusters,
  Zipf popularity): the first 90 % of 200,000 interactions to fit, the last
  10 % to validate, without exclusion (users interact with items again). Its
  generator knows each user's true item distribution: the `ideal` row ranks by
  it, `popularity` by training counts.

Every row is the same id towers (`from_ids`: dim 32, item bias, L2 5e-5, Adam
0.01, batch 1,000, 10 epochs; seed 42), changing only the loss and the
negatives. With `--precision` it fits the default model under each
mixed-precision policy instead (test top-10/100 on the keras-rs tutorial's split,
fit time and peak memory), and times a wider in-batch softmax (100,000 x 100,000
ids, dim 256, batch 8,192), each policy in a fresh process.

    python benchmarks/negatives.py --backend jax
    python benchmarks/negatives.py --backend torch --precision
"""

from __future__ import annotations

import argparse
import os
import time

import _common


def _movielens(data_dir):
    from two_tower.datasets import movielens

    ratings = movielens.load_ratings(data_dir)
    records = {
        "user": ratings["user_id"].astype("int32"),
        "item": ratings["movie_id"].astype("int32"),
        "timestamp": ratings["timestamp"].astype("int64"),
    }
    train, _ = movielens.temporal_split(records, 0.2)
    fitting, validation = movielens.temporal_split(train, 0.1)
    return fitting, validation, 944, 1683, True


def _synthetic():
    from two_tower.datasets.synthetic import SyntheticLog

    log = SyntheticLog(num_users=2000, num_items=5000, seed=3)
    arrays = log.to_arrays(200_000)
    cut = 180_000
    fitting = {key: value[:cut] for key, value in arrays.items()}
    validation = {key: value[cut:] for key, value in arrays.items()}
    return fitting, validation, 2000, 5000, False, log


def _score(queries, catalogue, fitting, validation, exclude, first_item):
    from two_tower.evaluation import evaluate_retrieval

    results = evaluate_retrieval(
        queries,
        catalogue[first_item:],
        validation["user"],
        validation["item"] - first_item,
        exclude_query_ids=fitting["user"] if exclude else None,
        exclude_candidate_ids=fitting["item"] - first_item if exclude else None,
        ks=(10, 100),
    )
    part = results["unseen"] if exclude else results["all"]
    return part["accuracy_at_10"], part["accuracy_at_100"]


def _configurations(items, counts):
    import numpy as np

    import two_tower
    from two_tower.negatives import FrequencyEstimator, NegativeCache, PopularitySampler

    def estimator():
        return FrequencyEstimator(num_buckets=items)

    sampled = {"loss": "sampled_softmax", "catalogue_size": items, "num_sampled_negatives": 1000}
    return {
        "full softmax (the default)": ({"loss": "full_softmax", "catalogue_size": items}, None),
        "in-batch softmax, no logQ": ({"loss": "softmax"}, None),
        "in-batch + exact logQ: share of the log": ({"loss": "softmax"}, "share"),
        "in-batch + exact logQ: chance of appearing in a batch": ({"loss": "softmax"}, "chance"),
        "in-batch + streaming logQ": (
            {"loss": "softmax", "frequency_estimator": estimator()},
            None,
        ),
        "in-batch + streaming logQ + cache (4 batches)": (
            {
                "loss": "softmax",
                "frequency_estimator": estimator(),
                "negative_cache": NegativeCache(size=4000),
            },
            None,
        ),
        "in-batch + streaming logQ + cache (1 batch)": (
            {
                "loss": "softmax",
                "frequency_estimator": estimator(),
                "negative_cache": NegativeCache(size=1000),
            },
            None,
        ),
        "in-batch + cache (4 batches), no logQ": (
            {"loss": "softmax", "negative_cache": NegativeCache(size=4000)},
            None,
        ),
        "sampled 1,000 uniform + streaming logQ": (
            {**sampled, "frequency_estimator": estimator()},
            None,
        ),
        "sampled 1,000 uniform + exact logQ: share of the log": (sampled, "share"),
        "sampled 1,000 popularity^0.75 + streaming logQ": (
            {
                **sampled,
                "frequency_estimator": estimator(),
                "negative_sampler": PopularitySampler.from_weights(np.power(counts + 1.0, 0.75)),
            },
            None,
        ),
    }, two_tower


def quality(data_dir, dataset: str) -> list[tuple[str, float, float, float]]:
    import keras
    import numpy as np

    if dataset == "movielens":
        fitting, validation, users, items, exclude = _movielens(data_dir)
        log = None
        first_item = 1
    else:
        fitting, validation, users, items, exclude, log = _synthetic()
        first_item = 0
    counts = np.bincount(fitting["item"], minlength=items).astype("float64")
    rows = []
    configurations, two_tower = _configurations(items, counts)
    batch = two_tower.defaults.FIT["batch_size"]
    for name, (options, exact_log_q) in configurations.items():
        keras.utils.set_random_seed(42)
        model = two_tower.TwoTowerRetrieval.from_ids(users, items, **options)
        model.compile(optimizer=two_tower.defaults.optimizer())
        x = {"query": fitting["user"], "candidate": fitting["item"]}
        share = counts / counts.sum()
        if exact_log_q == "share":  # each item's share of the log, as ShardDataset gives
            x["candidate_sampling_probability"] = share[fitting["item"]].astype("float32")
        elif exact_log_q == "chance":  # its chance of appearing in a batch (SequenceDataset)
            chance = -np.expm1(batch * np.log1p(-share))
            x["candidate_sampling_probability"] = chance[fitting["item"]].astype("float32")
        start = time.perf_counter()
        model.fit(x, verbose=0, **two_tower.defaults.FIT)
        seconds = time.perf_counter() - start
        queries = keras.ops.convert_to_numpy(model.query_tower(np.arange(users)))
        catalogue = keras.ops.convert_to_numpy(model.candidate_tower(np.arange(items)))
        top_10, top_100 = _score(queries, catalogue, fitting, validation, exclude, first_item)
        rows.append((name, top_10, top_100, seconds))
        print(f"| {dataset} | {name} | {top_10:.4f} | {top_100:.4f} | {seconds:.1f} |", flush=True)
    if log is not None:
        ideal = log.ideal_scores(np.arange(users))
        popularity = np.tile(counts, (users, 1))
        for name, scores in (("ideal (the generator's truth)", ideal), ("popularity", popularity)):
            top = np.argsort(-scores, axis=1)[:, :100]
            hits = top[validation["user"]] == validation["item"][:, None]
            top_10, top_100 = hits[:, :10].any(1).mean(), hits.any(1).mean()
            rows.append((name, float(top_10), float(top_100), 0.0))
            print(f"| {dataset} | {name} | {top_10:.4f} | {top_100:.4f} | |", flush=True)
    return rows


def precision_worker(data_dir, policy: str) -> dict:
    """The default model on the keras-rs tutorial's MovieLens split under `policy`,
    then a wider in-batch softmax (dim 256, batch 8,192) on synthetic ids: quality,
    seconds and this process' peak memory."""
    import keras
    import numpy as np

    import two_tower
    from two_tower.datasets import movielens
    from two_tower.evaluation import evaluate_retrieval

    ratings = movielens.load_ratings(data_dir)
    records = {
        "user": ratings["user_id"].astype("int32"),
        "movie": ratings["movie_id"].astype("int32"),
    }
    train, test = movielens.random_split(records, test_fraction=0.2, seed=42)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(42)
    model = two_tower.TwoTowerRetrieval.from_ids(944, 1683)
    model.compile(
        optimizer=two_tower.defaults.optimizer(),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    x = {"query": train["user"], "candidate": train["movie"]}
    start = time.perf_counter()
    model.fit(x, verbose=0, **two_tower.defaults.FIT)
    seconds = time.perf_counter() - start

    def table(tower, rows):
        return keras.ops.convert_to_numpy(keras.ops.cast(tower(np.arange(rows)), "float32"))

    results = evaluate_retrieval(
        table(model.query_tower, 944), table(model.candidate_tower, 1683)[1:],
        test["user"], test["movie"] - 1,
        exclude_query_ids=train["user"], exclude_candidate_ids=train["movie"] - 1,
        ks=(10, 100),
    )["unseen"]  # fmt: skip
    movielens_peak = _common.peak_rss_kib() / 2**20
    rng = np.random.default_rng(0)
    wide_x = {
        "query": rng.integers(0, 100_000, 81_920),
        "candidate": rng.integers(0, 100_000, 81_920),
    }
    wide = two_tower.TwoTowerRetrieval.from_ids(100_000, 100_000, 256, loss="softmax")
    wide.compile(optimizer=two_tower.defaults.optimizer())
    wide.fit(wide_x, batch_size=8192, epochs=1, verbose=0)  # compile
    start = time.perf_counter()
    wide.fit(wide_x, batch_size=8192, epochs=2, verbose=0)
    wide_step = (time.perf_counter() - start) / 20
    return {
        "top_10": results["accuracy_at_10"],
        "top_100": results["accuracy_at_100"],
        "fit_seconds": seconds,
        "movielens_peak_gb": movielens_peak,
        "wide_step_ms": wide_step * 1000,
        "peak_gb": _common.peak_rss_kib() / 2**20,
    }


def precision(data_dir, backend: str) -> None:
    """`precision_worker` for each policy, each in a fresh process (its own peak memory)."""
    for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
        arguments = ["--backend", backend, "--policy", policy]
        if data_dir:
            arguments += ["--data-dir", data_dir]
        result = _common.worker_result(__file__, arguments, f"{backend} {policy}")
        print(
            f"| {backend} | {policy} | {result['top_10']:.4f} | {result['top_100']:.4f} | "
            f"{result['fit_seconds']:.1f} | {result['movielens_peak_gb']:.2f} | "
            f"{result['wide_step_ms']:.0f} | {result['peak_gb']:.2f} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    _common.add_data_dir_argument(parser)
    parser.add_argument("--precision", action="store_true", help="the mixed-precision table")
    parser.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _common.use_backend(args.backend)
    if args.policy:  # one worker of --precision
        _common.report(precision_worker(args.data_dir, args.policy))
        return
    if args.precision:
        print(
            "| backend | policy | test top-10 | test top-100 | fit (s) | peak RSS (GB) "
            "| wide step (ms) | peak RSS with wide (GB) |"
        )
        precision(args.data_dir, args.backend)
        return
    print("| log | negatives | validation top-10 | validation top-100 | fit (s) |")
    for dataset in ("movielens", "synthetic"):
        quality(args.data_dir, dataset)


if __name__ == "__main__":
    main()
