"""Trains two_tower's softmax default on MovieLens 100K and compares it with two baselines.

This is the main example (`nox -s example-jax` runs it).

Trains `TwoTowerRetrieval.from_ids`, the configuration tuned for id towers
(full-catalogue softmax, a learned movie bias, Adam, `two_tower.defaults`), on
the keras-rs basic retrieval tutorial's protocol: MovieLens 100K split 80/20 at
random with NumPy seed 42. The model takes MovieLens' raw string ids ("42",
"196"): `two_tower.Vocabulary` maps them to table rows and is saved with the
model, and `recommend(["42"], exclude=[...])` returns raw movie ids.

It prints the top-10 movie titles for one user, leaving out the movies that user
rated in training, then a table of test top-10 and top-100 accuracy (for every
test rating, is the rated movie in the user's top k, the user's training movies
left out?) for:

- popularity: the most-rated training movies, the same for everyone
  (`two_tower.baselines.Popularity`);
- the keras-rs tutorial's model: Embedding(32) towers regressing (rating - 1) / 4
  with MSE, Adagrad(0.1), batch 1000, 50 epochs (built and trained by
  `examples/keras_rs_tutorial.py`, which reproduces the tutorial on its own);
- the softmax default;

and how long each took to train. The metrics come from
`two_tower.evaluation.evaluate_retrieval`, which keeps each user's excluded
movies as a list, never as a dense users x movies array.

Usage:
    python examples/movielens_retrieval.py --backend jax
    python examples/movielens_retrieval.py --backend torch --user 7 --no-compare \\
        --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# The keras-rs tutorial's model and data loading live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras_rs_tutorial as tutorial  # noqa: E402

KS = (10, 100)
POPULARITY = "popularity (most-rated movies)"
TUTORIAL = "keras-rs tutorial model (MSE)"
DEFAULT = "two_tower default (softmax)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend",
        choices=tutorial.BACKENDS,
        default=None,
        help="Keras backend; defaults to $KERAS_BACKEND, else jax.",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="Epochs for the softmax default; defaults to two_tower.defaults.FIT (10).",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Folder holding ml-100k/ (or the GroupLens files, or ml-100k.zip); "
        "defaults to $TWO_TOWER_DATA_DIR, else ~/.keras/datasets (downloading).",
    )
    parser.add_argument("--user", default="42", help="MovieLens user id to recommend for.")
    parser.add_argument(
        "--seed",
        type=int,
        default=tutorial.SPLIT_SEED,
        help="Random seed of the 80/20 split and of the starting weights "
        "(42, the keras-rs tutorial's split, by default).",
    )
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="Skip the keras-rs tutorial's model (popularity is still shown).",
    )
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    others = "a simpler model" if args.no_compare else "two simpler models"
    print(
        "This example trains two_tower's default recommender on MovieLens 100K, shows its\n"
        f"top 10 movies for one user, and compares it with {others}."
    )
    tutorial.select_backend(args.backend)  # before Keras is first imported

    import keras

    import two_tower
    from two_tower.datasets import movielens
    from two_tower.evaluation import evaluate_retrieval

    # Raw MovieLens ids are strings ("196"); the vocabularies turn them into table rows.
    ratings = movielens.load_ratings(args.data_dir)
    catalogue = movielens.load_movies(args.data_dir)
    titles = dict(
        zip(catalogue["movie_id"].tolist(), catalogue["movie_title"].tolist(), strict=True)
    )
    records = {
        "user": ratings["user_id"],
        "movie": ratings["movie_id"],
        "rating": ratings["user_rating"],
    }
    train, test = movielens.random_split(records, test_fraction=0.2, seed=args.seed)
    users = two_tower.Vocabulary()  # the users seen in training
    users.adapt(train["user"])
    movies = two_tower.Vocabulary()  # every movie in the catalogue
    movies.adapt(catalogue["movie_id"])
    if args.user not in users.vocabulary:
        sys.exit(
            f"--user must be the MovieLens id of a user with training ratings (such as 42); "
            f"got {args.user!r}"
        )
    print(
        f"{len(ratings['user_id']):,} ratings of {len(catalogue['movie_id']):,} movies by "
        f"{len(users.vocabulary):,} users. The models learn from a random 80%\n"
        f"({len(train['user']):,} ratings) and are tested on the other 20%. "
        f"Keras backend: {keras.backend.backend()}.\n"
    )

    # The metrics take positions in the catalogue: `movies` maps a movie id to its
    # table row, where row 0 is the bucket for unknown movies, so position = row - 1.
    def movie_rows(movie_ids: Any) -> Any:
        return movies(movie_ids) - movies.num_oov_buckets

    def test_accuracy(embed_users: Any, catalogue_embeddings: Any) -> dict[str, float]:
        """Test top-k accuracy over every movie, each user's training movies left out."""
        results = evaluate_retrieval(
            embed_users,
            catalogue_embeddings,
            users(test["user"]),
            movie_rows(test["movie"]),
            exclude_query_ids=users(train["user"]),
            exclude_candidate_ids=movie_rows(train["movie"]),
            ks=KS,
            num_queries=users.size,
        )
        return {f"top_{k}": results["unseen"][f"accuracy_at_{k}"] for k in KS}

    def model_accuracy(model: Any) -> dict[str, float]:
        known_movies = movies(movies.vocabulary)  # table rows 1, 2, ...: every movie
        return test_accuracy(model.embed_queries, model.embed_candidates(known_movies))

    rows: dict[str, dict[str, float]] = {}

    # The softmax default.
    epochs = two_tower.defaults.FIT["epochs"] if args.epochs is None else args.epochs
    print(f"Training the two_tower default ({epochs} epochs):")
    keras.utils.set_random_seed(args.seed)
    model = two_tower.TwoTowerRetrieval.from_ids(
        query_vocabulary=users, candidate_vocabulary=movies
    )
    model.compile(optimizer=two_tower.defaults.optimizer())
    started = time.perf_counter()
    model.fit(
        {"query": train["user"], "candidate": train["movie"]},
        verbose=2,
        **{**two_tower.defaults.FIT, "epochs": epochs},
    )
    seconds = time.perf_counter() - started
    print(f"Trained in {seconds:.1f} s.\n")
    rows[DEFAULT] = {**model_accuracy(model), "train_seconds": seconds}

    model.index_candidates()  # every movie, under its raw id
    seen = train["movie"][train["user"] == args.user]
    print(
        f"Top 10 movies for user {args.user}, leaving out the {len(seen)} movies they rated "
        "in the training part:"
    )
    recommended = model.recommend([args.user], k=10, exclude=[seen])[0]
    for rank, movie_id in enumerate(recommended, start=1):
        print(f"  {rank:2d}. {titles[movie_id]}")
    print()

    # Popularity: every user gets the movies with the most training ratings.
    started = time.perf_counter()
    popularity = two_tower.baselines.Popularity(len(movies.vocabulary))
    popularity.fit(movie_rows(train["movie"]))
    seconds = time.perf_counter() - started
    rows[POPULARITY] = {
        # The same query embedding (a 1) for every user: the score is the count.
        **test_accuracy(
            lambda user_rows: popularity.embed_histories(user_rows[:, None]),
            popularity.catalogue_embeddings(),
        ),
        "train_seconds": seconds,
    }

    if not args.no_compare:
        print(f"Training the keras-rs tutorial's model ({tutorial.EPOCHS} epochs)...")
        keras.utils.set_random_seed(args.seed)
        mse_model = tutorial.build_model(
            users.size, movies.size, query_vocabulary=users, candidate_vocabulary=movies
        )
        seconds = tutorial.fit_model(mse_model, train)
        print(f"Trained in {seconds:.1f} s.\n")
        rows[TUTORIAL] = {**model_accuracy(mse_model), "train_seconds": seconds}

    print(
        "Test accuracy: how often the movie of a test rating is among the user's top 10 or\n"
        "top 100 recommendations (out of all movies, leaving out those they rated in training).\n"
    )
    width = max(len(name) for name in rows)
    print(f"{'model':<{width}}  top-10  top-100  training time")
    for name in (POPULARITY, TUTORIAL, DEFAULT):
        if name in rows:
            row = rows[name]
            print(
                f"{name:<{width}}  {row['top_10']:6.3f}  {row['top_100']:7.3f}  "
                f"{row['train_seconds']:11.1f} s"
            )
    print(
        f"\nThe default finds the test movie in the user's top 100 for "
        f"{rows[DEFAULT]['top_100']:.0%} of test ratings;\n"
        f"recommending the most-rated movies does so for {rows[POPULARITY]['top_100']:.0%}."
    )
    return rows


if __name__ == "__main__":
    main()
