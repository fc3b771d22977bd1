"""Item-to-item: movies similar to "Star Wars (1977)" from a trained MovieLens model.

Trains the library's softmax default (`TwoTowerRetrieval.from_ids`) on the seed
protocol's training split, indexes all 1,682 movies with the candidate tower, and
queries the index with the candidate tower's embedding of one movie
(`TwoTowerRetrieval.similar_items`), leaving the movie itself out.

Usage:
    python examples/item_to_item.py --backend jax
    python examples/item_to_item.py --title "Toy Story (1995)" --k 5
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default=None)
    parser.add_argument("--title", default="Star Wars (1977)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="Defaults to the tuned value.")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    backend = args.backend or os.environ.get("KERAS_BACKEND") or "jax"
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise RuntimeError(f"Keras is already imported with another backend than {backend}.")
    os.environ["KERAS_BACKEND"] = backend  # before Keras is imported

    import keras
    import numpy as np

    import two_tower
    from two_tower.datasets import movielens

    keras.utils.set_random_seed(42)
    ratings = movielens.load_ratings(args.data_dir)
    movies = movielens.load_movies(args.data_dir)
    titles = movies["movie_title"].tolist()
    if args.title not in titles:
        close = [t for t in titles if args.title.split(" (")[0].lower() in t.lower()][:5]
        raise SystemExit(f"No movie titled {args.title!r}. Did you mean one of {close}?")
    records = {
        "query": ratings["user_id"].astype("int32"),
        "candidate": ratings["movie_id"].astype("int32"),
    }
    train, _ = movielens.random_split(records, test_fraction=0.2, seed=42)

    model = two_tower.TwoTowerRetrieval.from_ids(944, 1683)  # ids start at 1
    model.compile(
        optimizer=two_tower.defaults.optimizer(),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    fit_args = dict(two_tower.defaults.FIT)
    if args.epochs is not None:
        fit_args["epochs"] = args.epochs
    model.fit(train, verbose=0, **fit_args)

    movie_ids = movies["movie_id"].astype("int64")
    model.index_candidates(movie_ids, candidate_ids=movie_ids)
    title_of = dict(zip(movie_ids.tolist(), titles, strict=True))
    query = movie_ids[titles.index(args.title)]
    found, scores = model.similar_items(np.array([query]), k=args.k, return_scores=True)
    similar = [title_of[int(m)] for m in found[0]]
    print(f"Movies similar to {args.title} ({backend}):")
    for title, score in zip(similar, scores[0], strict=True):
        print(f"  {score:7.3f}  {title}")
    return similar


if __name__ == "__main__":
    main()
