"""The keras-rs "basic retrieval" tutorial, rebuilt on two_tower, for comparison.

Same setup as the keras-rs basic retrieval tutorial: Embedding(32) towers on raw
user and movie ids, MSE on (rating - 1) / 4, Adagrad(0.1), batch 1000, 50 epochs,
validation every 5 epochs, an 80/20 random split of MovieLens 100K (NumPy seed
42), and the top-10 titles for user 42. At the end it prints test top-10 and
top-100 accuracy over the full catalogue: for every test rating, is the rated
movie within the user's top k? Nothing is excluded (TFRS's FactorizedTopK
definition).

This model loses to recommending the most-rated movies to everyone. The main
example, `examples/movielens_retrieval.py`, trains the library's softmax default
on the same split and compares the three (it builds and trains this model with
`build_model` and `fit_model` from this file).

Data is fed as NumPy arrays, not a tf.data pipeline, which costs 2.5-7x on JAX and
torch.

Usage:
    python examples/keras_rs_tutorial.py --backend jax
    python examples/keras_rs_tutorial.py --backend torch --epochs 5 \\
        --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

BACKENDS = ("jax", "tensorflow", "torch")
# The keras-rs tutorial's settings.
EMBEDDING_DIM = 32
LEARNING_RATE = 0.1
BATCH_SIZE = 1000
EPOCHS = 50
SPLIT_SEED = 42


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend; defaults to $KERAS_BACKEND, else jax.",
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Folder holding ml-100k/ (or the GroupLens files, or ml-100k.zip); "
        "defaults to $TWO_TOWER_DATA_DIR, else ~/.keras/datasets (downloading).",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SPLIT_SEED)
    parser.add_argument("--user", type=int, default=42, help="User to recommend for.")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def select_backend(backend: str | None) -> str:
    """Sets `KERAS_BACKEND` (argument, else the environment, else jax) before Keras loads.

    Raises:
        RuntimeError: Keras is already imported with another backend.
    """
    backend = backend or os.environ.get("KERAS_BACKEND") or "jax"
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise RuntimeError(f"Keras is already imported with another backend than {backend}.")
    os.environ["KERAS_BACKEND"] = backend
    return backend


def load_data(data_dir: str | None, seed: int = SPLIT_SEED) -> dict[str, Any]:
    """MovieLens 100K split 80/20 at random, as the keras-rs tutorial does.

    Args:
        data_dir: where the MovieLens files are (see `movielens.load_ratings`).
        seed: seed of the split's permutation (the tutorial's is 42).

    Returns:
        `train` and `test` (dicts of int32 `user` and `movie` ids and float
        `rating`, 1 to 5 stars), `titles` (movie id -> title),
        `movie_ids` (int64, every movie), `num_users` and `num_movies` (table
        sizes: ids start at 1 and have no gaps, so they index the tables
        directly and row 0 is unused).
    """
    from two_tower.datasets import movielens

    ratings = movielens.load_ratings(data_dir)
    movies = movielens.load_movies(data_dir)
    records = {
        "user": ratings["user_id"].astype("int32"),
        "movie": ratings["movie_id"].astype("int32"),
        "rating": ratings["user_rating"],
    }
    train, test = movielens.random_split(records, test_fraction=0.2, seed=seed)
    movie_ids = movies["movie_id"].astype("int64")
    return {
        "train": train,
        "test": test,
        "titles": dict(zip(movie_ids.tolist(), movies["movie_title"].tolist(), strict=True)),
        "movie_ids": movie_ids,
        "num_users": int(records["user"].max()) + 1,
        "num_movies": int(movie_ids.max()) + 1,
    }


def build_model(num_users: int, num_movies: int, **kwargs: Any) -> Any:
    """The tutorial's model, compiled: Embedding(32) towers, MSE, Adagrad(0.1).

    Args:
        num_users: rows of the user table.
        num_movies: rows of the movie table.
        **kwargs: other `TwoTowerRetrieval` arguments (e.g. vocabularies).
    """
    import keras

    import two_tower

    model = two_tower.TwoTowerRetrieval(
        query_tower=keras.layers.Embedding(num_users, EMBEDDING_DIM),
        candidate_tower=keras.layers.Embedding(num_movies, EMBEDDING_DIM),
        loss="mse",
        **kwargs,
    )
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=LEARNING_RATE))
    return model


def fit_model(
    model: Any,
    train: dict[str, Any],
    *,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    test: dict[str, Any] | None = None,
    verbose: int = 0,
) -> float:
    """Regresses the score of each (`user`, `movie`) pair on (`rating` - 1) / 4.

    Validates on `test` every 5 epochs if given.

    Returns:
        The seconds `fit` took.
    """

    def pairs(part: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        return {"query": part["user"], "candidate": part["movie"]}, (part["rating"] - 1.0) / 4.0

    validation = None if test is None else pairs(test)
    started = time.perf_counter()
    model.fit(
        *pairs(train),
        batch_size=batch_size,
        epochs=epochs,
        validation_data=validation,
        validation_freq=5,
        verbose=verbose,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    select_backend(args.backend)  # before Keras is first imported

    import keras
    import numpy as np

    keras.utils.set_random_seed(args.seed)
    data = load_data(args.data_dir, args.seed)
    train, test, titles = data["train"], data["test"], data["titles"]
    model = build_model(data["num_users"], data["num_movies"])
    print(f"backend={keras.backend.backend()} train={len(train['user'])} test={len(test['user'])}")
    fit_seconds = fit_model(
        model, train, epochs=args.epochs, batch_size=args.batch_size, test=test, verbose=2
    )

    movie_ids = data["movie_ids"]
    model.index_candidates(movie_ids, candidate_ids=movie_ids)
    recommended = model.recommend(np.array([args.user]), k=10)
    print(f"Recommended movies for user {args.user}:")
    for movie_id in recommended[0]:
        print(f"  {titles[int(movie_id)]}")

    users, rows = np.unique(test["user"], return_inverse=True)
    top = model.recommend(users, k=100)[rows]
    hits = top == test["movie"][:, None]
    results = {
        "fit_seconds": fit_seconds,
        "top_10_accuracy": float(hits[:, :10].any(axis=1).mean()),
        "top_100_accuracy": float(hits.any(axis=1).mean()),
    }
    print(f"fit: {fit_seconds:.1f} s for {args.epochs} epochs")
    print(f"test top-10 accuracy:  {results['top_10_accuracy']:.3f}")
    print(f"test top-100 accuracy: {results['top_100_accuracy']:.3f}")
    return results


if __name__ == "__main__":
    main()
