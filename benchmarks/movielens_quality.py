"""Reproduces the quality table of docs/benchmarks.md, on the keras-rs tutorial's split.

The split of the keras-rs basic retrieval tutorial: MovieLens 100K, an 80/20
random split of all 100,000 ratings (NumPy permutation, random seed 42). For each
backend it trains and evaluates, over the full catalogue of 1,682 movies:
- popularity: train counts (the same on every backend; computed once);
- the keras-rs tutorial's MSE model: Embedding(32) towers, MSE on (rating-1)/4, Adagrad(0.1),
  batch 1000, 50 epochs;
- the library's softmax default: `TwoTowerRetrieval.from_ids` with
  `two_tower.defaults` (full-catalogue softmax, item bias, Adam, 10 epochs).
Each is scored with and without leaving out the movies the user rated in train.

Each backend runs in its own process (Keras fixes its backend at import).

    python benchmarks/movielens_quality.py --backends jax,tensorflow,torch \\
        --plot docs/movielens_recall.png
"""

from __future__ import annotations

import argparse
import time

import _common

KS = (1, 5, 10, 50, 100)


def worker(backend: str, data_dir: str | None, seed: int) -> dict:
    _common.use_backend(backend)
    import keras
    import numpy as np

    import two_tower
    from two_tower.datasets import movielens
    from two_tower.evaluation import evaluate_retrieval

    ratings = movielens.load_ratings(data_dir)
    records = {
        "user": ratings["user_id"].astype("int32"),
        "movie": ratings["movie_id"].astype("int32"),
        "rating": (ratings["user_rating"] - 1.0) / 4.0,
    }
    train, test = movielens.random_split(records, test_fraction=0.2, seed=seed)
    num_users, num_movies = 944, 1683  # ids start at 1; row 0 is unused

    def evaluate(query_table: np.ndarray, catalogue: np.ndarray) -> dict:
        # Rank over the 1,682 real movies only (catalogue row 0 is no movie).
        return evaluate_retrieval(
            query_table,
            catalogue[1:],
            test["user"],
            test["movie"] - 1,
            exclude_query_ids=train["user"],
            exclude_candidate_ids=train["movie"] - 1,
            ks=KS,
        )

    def tables(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
        queries = keras.ops.convert_to_numpy(model.query_tower(np.arange(num_users)))
        catalogue = keras.ops.convert_to_numpy(model.candidate_tower(np.arange(num_movies)))
        return queries, catalogue

    results = {}
    counts = np.bincount(train["movie"], minlength=num_movies).astype("float32")
    results["popularity"] = {
        **evaluate(np.ones((num_users, 1), "float32"), counts[:, None]),
        "fit_seconds": 0.0,
    }

    keras.utils.set_random_seed(seed)
    tutorial_model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(num_users, 32), keras.layers.Embedding(num_movies, 32), loss="mse"
    )
    tutorial_model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=0.1))
    started = time.perf_counter()
    tutorial_model.fit(
        {"query": train["user"], "candidate": train["movie"]},
        train["rating"],
        batch_size=1000,
        epochs=50,
        verbose=0,
    )
    results["keras-rs tutorial's MSE model"] = {
        **evaluate(*tables(tutorial_model)),
        "fit_seconds": time.perf_counter() - started,
    }

    keras.utils.set_random_seed(seed)
    model = two_tower.TwoTowerRetrieval.from_ids(num_users, num_movies)
    model.compile(
        optimizer=two_tower.defaults.optimizer(),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    started = time.perf_counter()
    model.fit(
        {"query": train["user"], "candidate": train["movie"]}, verbose=0, **two_tower.defaults.FIT
    )
    results["softmax default"] = {
        **evaluate(*tables(model)),
        "fit_seconds": time.perf_counter() - started,
    }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = _common.argument_parser(__doc__)
    _common.add_backends_argument(parser)
    _common.add_data_dir_argument(parser)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--plot", default=None, help="Save a recall@k PNG here.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _common.report(worker(args.worker, args.data_dir, args.seed))
        return

    by_backend = {}
    for backend in args.backends.split(","):
        arguments = ["--worker", backend, "--seed", str(args.seed)]
        if args.data_dir:
            arguments += ["--data-dir", args.data_dir]
        by_backend[backend] = _common.worker_result(__file__, arguments, backend)

    from two_tower.evaluation import format_table, plot_recall

    for subset, title in (("unseen", "train-seen items excluded"), ("all", "nothing excluded")):
        rows = {}
        for backend, results in by_backend.items():
            for name, result in results.items():
                if name == "popularity" and rows.get("popularity"):
                    continue
                label = "popularity" if name == "popularity" else f"{name} ({backend})"
                rows[label] = result[subset]
        print(f"\nTest top-k accuracy, {title}:\n")
        print(format_table(rows, ks=(10, 50, 100)))
    print("\nFit time (s):")
    for backend, results in by_backend.items():
        times = ", ".join(
            f"{name} {result['fit_seconds']:.1f}"
            for name, result in results.items()
            if name != "popularity"
        )
        print(f"  {backend}: {times}")
    if args.plot:
        first = next(iter(by_backend))
        rows = {f"{name}, unseen": result["unseen"] for name, result in by_backend[first].items()}
        plot_recall(rows, args.plot, ks=KS, title=f"Recall@k on MovieLens 100K ({first})")
        print(f"\nSaved {args.plot}")


if __name__ == "__main__":
    main()
