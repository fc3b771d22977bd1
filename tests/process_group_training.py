"""The training cases of `tests/test_multidevice_torch.py`, and the script each
process of its torch process group runs.

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 tests/process_group_training.py OUT

Each process trains every case of `cases()` from its own seed (`SEED + rank`: the
ranks start from different weights, which the first step must replace with
rank 0's) and saves its weights before and after `fit` and its logged losses as
`OUT/<case>.<rank>.npz`.
The test trains the same cases in one process from rank 0's seed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

import two_tower
from testing import interactions, negative_layers, pairs_for

USERS, ITEMS, DIM = 40, 64, 8
SEED = 1000
BATCH = 64
LOSSES = two_tower.models.retrieval_task.LOSSES
_OPTIONS = {
    "mse": {},
    "softmax": {"remove_accidental_hits": True},
    "sampled_softmax": {"num_sampled_negatives": 8, "remove_accidental_hits": True},
    "full_softmax": {},
}


def cases() -> list[str]:
    """Every case's name: `<loss>-<dense|sparse>-<rows>`, then the special cases."""
    names = [
        f"{loss}-{tables}-{rows}"
        for loss in LOSSES
        for tables in ("dense", "sparse")
        for rows in (512, 565)  # 565: a last batch of 53 rows, 27 + 26
    ]
    return [
        *names,
        "softmax-sparse-513",  # a last batch of 1 row: rank 1 holds none
        "negatives-sparse-565",  # estimator, cache and popularity sampler, 2 epochs
        "negatives-sparse-513",
        "shuffled-sparse-512",  # each epoch's order drawn on rank 0's seed
        "adam-sparse-512",  # lazy Adam
        "sequences-dense-4",  # per-position training, rows of different lengths
        "dataset-sparse-565",  # each process's own batches, from a PyDataset
    ]


def _tower(rows: int, sparse: bool, bias: bool = True) -> keras.Layer:
    """A table, then a Dense layer: sparse or dense table gradients, and dense ones."""
    table = two_tower.SparseEmbedding(rows, 16) if sparse else keras.layers.Embedding(rows, 16)
    return keras.Sequential([table, keras.layers.Dense(DIM, use_bias=bias)])


def _sequence_model() -> keras.Model:
    model = two_tower.TwoTowerRetrieval.for_sequences(
        ITEMS,
        max_length=6,
        embedding_dim=DIM,
        dropout=0.0,
        loss="softmax",
        remove_accidental_hits=True,
    )
    model.compile(optimizer=keras.optimizers.Adagrad(0.1))
    return model


def _packed_rows() -> dict[str, np.ndarray]:
    """Packed sequence rows whose padding differs by row (the last rows are short)."""
    rng = np.random.default_rng(5)
    users = np.repeat(np.arange(30), rng.integers(2, 9, 30))
    log = two_tower.InteractionLog(users, rng.integers(0, ITEMS, len(users)), np.arange(len(users)))
    data = two_tower.datasets.SequenceDataset(log, max_length=6, batch_size=1000, shuffle=False)
    return data[0]


class _Share(keras.utils.PyDataset):
    """Batches of `BATCH` rows of `x`, each cut to process `rank`'s block of `size`
    (the first blocks one row longer), as `fit` on arrays cuts them."""

    def __init__(self, x: dict[str, np.ndarray], rank: int, size: int) -> None:
        super().__init__()
        self.x, self.rank, self.size = x, rank, size

    def __len__(self) -> int:
        return -(-len(self.x["query"]) // BATCH)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rows = np.arange(index * BATCH, min((index + 1) * BATCH, len(self.x["query"])))
        block = np.array_split(rows, self.size)[self.rank]
        return {key: value[block] for key, value in self.x.items()}


def _model(case: str) -> keras.Model:
    loss, tables, _ = case.split("-")
    if loss == "sequences":
        return _sequence_model()
    options: dict[str, Any] = {}
    if loss == "negatives":
        loss, options = "sampled_softmax", negative_layers(ITEMS)
    elif loss in ("shuffled", "adam", "dataset"):
        loss = "softmax"
    sparse = tables == "sparse"
    # A candidate bias adds q.b to every score of a query: the softmax's gradient
    # of it is 0 but for float32 rounding, which Adam's m / sqrt(v) makes steps of
    # the learning rate's size (6e-5 apart between 1 and 2 processes).
    model = two_tower.TwoTowerRetrieval(
        _tower(USERS, sparse),
        _tower(ITEMS, sparse, bias=not case.startswith("adam")),
        loss=loss,
        catalogue_size=ITEMS,
        **{**_OPTIONS[loss], **options},
    )
    optimizer = keras.optimizers.Adam(0.01) if case.startswith("adam") else "adagrad"
    if optimizer == "adagrad":
        optimizer = keras.optimizers.Adagrad(0.1)
    model.compile(optimizer=optimizer)
    return model


class _Initial(keras.callbacks.Callback):
    """The weights a `fit` starts from (before its first step)."""

    def on_train_begin(self, logs: Any = None) -> None:
        self.weights = self.model.get_weights()


def train(case: str, rank: int = 0, size: int = 1) -> tuple[keras.Model, dict[str, Any]]:
    """The case's model, trained from the current random state by process `rank` of
    `size`, with its logged `losses` and the `initial` weights of its first `fit`."""
    initial = _Initial()
    model, losses = _train(case, rank, size, [initial])
    return model, {"losses": losses, "initial": initial.weights}


def _train(
    case: str, rank: int, size: int, callbacks: list[keras.callbacks.Callback]
) -> tuple[keras.Model, list[float]]:
    loss, _, rows = case.split("-")
    if loss == "dataset":
        model = _model(case)
        x, _ = interactions(int(rows), USERS, ITEMS)
        # shuffle=False: Keras shuffles a PyDataset's batches with each process's own seed.
        history = model.fit(
            _Share(x, rank, size), epochs=1, shuffle=False, verbose=0, callbacks=callbacks
        )
        return model, history.history["loss"]
    if loss == "sequences":  # batches of `rows` packed rows
        model = _model(case)
        history = model.fit(
            _packed_rows(), batch_size=int(rows), shuffle=False, verbose=0, callbacks=callbacks
        )
        return model, history.history["loss"]
    x, ratings = interactions(int(rows), USERS, ITEMS)
    if loss == "negatives":
        x.pop("candidate_sampling_probability")  # the estimator's instead
    elif loss in LOSSES:
        x = pairs_for(loss, x)
    model = _model(case)
    history = model.fit(
        x,
        ratings if loss == "mse" else None,
        batch_size=BATCH,
        epochs=2 if loss in ("negatives", "shuffled") else 1,
        shuffle=loss == "shuffled",
        verbose=0,
        callbacks=callbacks,
    )
    return model, history.history["loss"]


def local_negatives_batch(processes: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """A global batch of 16 rows per process with logQ, and the tables' initial values."""
    rng = np.random.default_rng(4)
    batch = 16 * processes
    x = {
        "query": rng.integers(0, USERS, batch),
        "candidate": rng.integers(0, ITEMS, batch),
        "candidate_sampling_probability": rng.uniform(0.1, 1.0, batch).astype("float32"),
    }
    return x, [rng.normal(size=(USERS, DIM)), rng.normal(size=(ITEMS, DIM))]


def local_negatives_loss(rank: int, processes: int) -> float:
    """The logged loss of one step with `cross_replica_negatives=False`, each process
    given its 16 rows (learning rate 0: the loss alone), and 3 sampled negatives,
    all item 5."""
    x, initial = local_negatives_batch(processes)
    weights = np.zeros(ITEMS)
    weights[5] = 1.0  # every sampled negative is item 5 (p = 1)
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(USERS, DIM),
        keras.layers.Embedding(ITEMS, DIM),
        loss="sampled_softmax",
        catalogue_size=ITEMS,
        num_sampled_negatives=3,
        cross_replica_negatives=False,
        negative_sampler=two_tower.negatives.PopularitySampler.from_weights(weights),
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    model.set_weights(initial + model.get_weights()[2:])
    rows = slice(16 * rank, 16 * (rank + 1))
    logs = model.train_on_batch({key: value[rows] for key, value in x.items()}, return_dict=True)
    return float(logs["loss"])


def main(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases():
        keras.utils.set_random_seed(SEED + rank)
        model, logs = train(case, rank, dist.get_world_size())
        saved = {f"weight_{i}": weight for i, weight in enumerate(model.get_weights())}
        saved.update({f"initial_{i}": weight for i, weight in enumerate(logs["initial"])})
        np.savez(Path(out) / f"{case}.{rank}.npz", losses=np.asarray(logs["losses"]), **saved)
    # Arrays that Keras' own adapter would hand every process whole are refused.
    model = _model("softmax-dense-512")
    x, _ = interactions(64, USERS, ITEMS)
    try:
        model.fit(x, validation_split=0.25, verbose=0)
    except ValueError as error:
        (Path(out) / f"refused.{rank}.txt").write_text(str(error))
    loss = local_negatives_loss(rank, dist.get_world_size())
    (Path(out) / f"local_negatives.{rank}.txt").write_text(repr(loss))
    # Processes that would cut shares of different batches fail together, not hang.
    x, _ = interactions(64 + 6 * rank, USERS, ITEMS)
    try:
        model.fit(x, batch_size=BATCH, verbose=0)
    except ValueError as error:
        (Path(out) / f"disagree.{rank}.txt").write_text(str(error))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
