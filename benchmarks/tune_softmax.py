"""The validation search behind `two_tower.defaults`.

It never looks at the test split: the training part of the keras-rs basic
retrieval tutorial's split (80% of MovieLens 100K, by a NumPy permutation with
random seed 42) is split again, 90% to fit and 10% to validate. Each
configuration is scored by validation top-10 and top-100 accuracy over the full
catalogue, with the user's fitting items excluded.

    python benchmarks/tune_softmax.py --backend jax
"""

from __future__ import annotations

import itertools
import os
import time

import _common


def validation_split(data_dir: str | None) -> tuple[dict, dict]:
    """The fitting and validation parts of the keras-rs tutorial's training split."""
    from two_tower.datasets import movielens

    ratings = movielens.load_ratings(data_dir)
    records = {
        "user": ratings["user_id"].astype("int32"),
        "movie": ratings["movie_id"].astype("int32"),
    }
    train, _ = movielens.random_split(records, test_fraction=0.2, seed=42)
    return movielens.random_split(train, test_fraction=0.1, seed=7)


def validation_results(model, fitting: dict, validation: dict) -> dict[str, float]:
    """Validation top-10/100 over the full catalogue, fitting items excluded."""
    import keras
    import numpy as np

    from two_tower.evaluation import evaluate_retrieval

    queries = keras.ops.convert_to_numpy(model.query_tower(np.arange(944)))
    catalogue = keras.ops.convert_to_numpy(model.candidate_tower(np.arange(1683)))
    return evaluate_retrieval(
        queries,
        catalogue[1:],  # row 0 is no movie
        validation["user"],
        validation["movie"] - 1,
        exclude_query_ids=fitting["user"],
        exclude_candidate_ids=fitting["movie"] - 1,
        ks=(10, 100),
    )["unseen"]


def tuning_data(doc: str, argv: list[str] | None) -> tuple[dict, dict]:
    """Reads `--backend` and `--data-dir`, sets the backend, returns `validation_split`'s parts.

    Called before Keras is imported: `--backend` (the environment's `KERAS_BACKEND`,
    else jax) only counts until then.
    """
    parser = _common.argument_parser(doc)
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    _common.add_data_dir_argument(parser)
    args = parser.parse_args(argv)
    _common.use_backend(args.backend)
    return validation_split(args.data_dir)


def fit_and_score(model, config: dict, fitting: dict, validation: dict, rows: dict) -> None:
    """Fits `model` for `config["epochs"]`, scores it and prints and keeps its row in `rows`."""
    from two_tower.evaluation import format_table

    started = time.perf_counter()
    model.fit(
        {"query": fitting["user"], "candidate": fitting["movie"]},
        batch_size=1000,
        epochs=config["epochs"],
        verbose=0,
    )
    seconds = time.perf_counter() - started
    results = validation_results(model, fitting, validation)
    label = ", ".join(f"{k}={v}" for k, v in config.items()) + f" ({seconds:.0f} s)"
    rows[label] = results
    print(format_table({label: results}, ks=(10, 100)).splitlines()[-1], flush=True)


def main(argv: list[str] | None = None) -> None:
    fitting, validation = tuning_data(__doc__, argv)

    import keras

    import two_tower

    grid = {
        "embedding_dim": (32, 64),
        "l2": (0.0, 3e-5, 5e-5, 1e-4, 3e-4),
        "learning_rate": (0.003, 0.01),
        "epochs": (10, 20),
        "temperature": (0.7, 1.0),
    }
    rows = {}
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values, strict=True))
        keras.utils.set_random_seed(42)
        model = two_tower.TwoTowerRetrieval.from_ids(
            944, 1683, config["embedding_dim"], config["l2"], config["temperature"]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(config["learning_rate"]),
            steps_per_execution=two_tower.defaults.steps_per_execution(),
        )
        fit_and_score(model, config, fitting, validation, rows)
    best = max(rows, key=lambda name: rows[name]["accuracy_at_100"])
    print(f"\nbest by validation top-100: {best}")


if __name__ == "__main__":
    main()
