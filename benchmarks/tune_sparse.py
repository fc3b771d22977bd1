"""The validation search behind `two_tower.defaults.SPARSE`: dense Adam or sparse tables.

Same protocol as `tune_softmax.py`, never the test split: the training part of
the keras-rs basic retrieval tutorial's split (80% of MovieLens 100K, by a NumPy
permutation with random seed 42) is split again, 90% to fit and 10% to validate,
scored by validation top-10 and top-100 over the full catalogue with the user's
fitting items excluded. The default
model (`from_ids`, full softmax, dim 32, batch 1000) is trained with its dense
tables and Adam, and with `sparse=True` tables and each optimizer the sparse
path takes: lazy Adam, Adagrad and row-wise Adagrad, over learning rates, L2
(on the looked-up rows, for sparse tables) and epochs.

    python benchmarks/tune_sparse.py --backend jax
"""

from __future__ import annotations

import itertools

from tune_softmax import fit_and_score, tuning_data


def main(argv: list[str] | None = None) -> None:
    fitting, validation = tuning_data(__doc__, argv)

    import keras

    import two_tower

    optimizers = {
        "adam": keras.optimizers.Adam,
        "adagrad": keras.optimizers.Adagrad,
        "row_wise_adagrad": two_tower.RowWiseAdagrad,
    }
    configs = [
        {"sparse": False, "optimizer": "adam", "learning_rate": 0.01, "l2": 5e-5, "epochs": 10}
    ]
    grids = {
        "adam": {"learning_rate": (0.003, 0.01), "l2": (0.0, 1e-5, 3e-5, 1e-4), "epochs": (10, 20)},
        "adagrad": {"learning_rate": (0.1, 0.3), "l2": (0.0, 1e-5, 3e-5, 1e-4), "epochs": (10, 20)},
        "row_wise_adagrad": {
            "learning_rate": (0.1, 0.3),
            "l2": (0.0, 1e-5, 3e-5, 1e-4),
            "epochs": (10, 20),
        },
    }
    for name, grid in grids.items():
        for values in itertools.product(*grid.values()):
            configs.append(
                {"sparse": True, "optimizer": name, **dict(zip(grid, values, strict=True))}
            )
    rows = {}
    for config in configs:
        keras.utils.set_random_seed(42)
        model = two_tower.TwoTowerRetrieval.from_ids(
            944, 1683, l2=config["l2"], sparse=config["sparse"]
        )
        model.compile(
            optimizer=optimizers[config["optimizer"]](learning_rate=config["learning_rate"]),
            steps_per_execution=two_tower.defaults.steps_per_execution(),
        )
        fit_and_score(model, config, fitting, validation, rows)
    for sparse in (False, True):
        candidates = [name for name in rows if f"sparse={sparse}" in name]
        best = max(candidates, key=lambda name: rows[name]["accuracy_at_100"])
        print(f"best {'sparse' if sparse else 'dense'} by validation top-100: {best}")


if __name__ == "__main__":
    main()
