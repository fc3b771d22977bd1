"""The tuned defaults of the softmax configuration.

Chosen on MovieLens 100K, on the split of the keras-rs basic retrieval tutorial
(80% of the ratings for training, by a NumPy permutation with random seed 42):
10% of its training part held out as validation, never the test part. They are
a full-catalogue softmax over id towers with a learned item bias, embedding dim
32, L2 5e-5 on the tables, Adam at 0.01, batch 1000, 10 epochs, temperature 1.
`benchmarks/tune_softmax.py` runs a grid around these values on
the same validation split.

`SPARSE` is False: `benchmarks/tune_sparse.py` found the best row-sparse
configuration (lazy Adam 0.003, L2 3e-5 on the looked-up rows, 20 epochs) level
with the dense default on validation (top-100 0.610 against 0.604, top-10 0.145
against 0.146) at twice the epochs, and at MovieLens' size (1,683 items, all
looked up by the full softmax at every step) sparse updates save nothing. Use
`from_ids(..., sparse=True)` for tables of 10^5 rows or more
(`docs/sparse-training.md`).
"""

from __future__ import annotations

from typing import Any

import keras

from two_tower.backends import backend_module

EMBEDDING_DIM = 32
L2 = 5e-5
LEARNING_RATE = 0.01
TEMPERATURE = 1.0
LOSS = "full_softmax"
SPARSE = False
"""Whether `TwoTowerRetrieval.from_ids` builds row-sparse tables (`SparseEmbedding`)."""
FIT: dict[str, Any] = {"batch_size": 1000, "epochs": 10}
"""Keyword arguments for `fit` (spread them: `model.fit(x, **FIT)`)."""


SEQUENCE: dict[str, Any] = {
    "max_length": 50,
    "embedding_dim": 64,
    "num_blocks": 2,
    "num_heads": 1,
    "dropout": 0.5,
    "positions": "from_oldest",
    "item_bias": False,
    "loss": "sampled_softmax",
    "temperature": 1.0,
    "num_sampled_negatives": 2000,
    "batch_size": 16,
    "sampling_probability": True,
    "epochs": 200,
    "learning_rate": 1e-3,
}
"""The next-item configuration (`TwoTowerRetrieval.for_sequences`, `SequenceDataset`).

Model arguments (`for_sequences` takes them) and training ones: `batch_size`
packed rows of `max_length` per step, `SequenceDataset(sampling_probability=True)`,
at most `epochs` (with `RetrievalValidation` keeping the best), Adam at
`learning_rate` with `beta_2=0.98` (`sequence_optimizer`).

Chosen on the validation targets of SASRec's Video Games data
(`benchmarks/sequential.py`, leave-one-out; never the test targets): the
sampled softmax (the batch's other targets, logQ-corrected, plus 2,000 uniform
items) reached the validation figures of the full-catalogue softmax at a
quarter of its time per epoch; without the logQ correction it was 0.02 lower in
sampled HR@10 and 0.012 in full NDCG@10. Width 128 and dropout 0.3 learned
faster but reached no better, and a learned item bias changed nothing.
`docs/benchmarks.md` has the figures.
"""

SEQUENCE_TRAINING = ("batch_size", "sampling_probability", "epochs", "learning_rate")
"""The keys of `SEQUENCE` that configure training, not the model."""


def sequence_optimizer(learning_rate: float | None = None) -> keras.optimizers.Optimizer:
    """A fresh optimizer for `for_sequences` models: Adam, `beta_2=0.98` (SASRec's)."""
    rate = SEQUENCE["learning_rate"] if learning_rate is None else learning_rate
    return keras.optimizers.Adam(learning_rate=rate, beta_2=0.98)


def optimizer() -> keras.optimizers.Optimizer:
    """A fresh default optimizer: Adam at `LEARNING_RATE`."""
    return keras.optimizers.Adam(learning_rate=LEARNING_RATE)


def steps_per_execution() -> int:
    """Training steps per compiled call, by backend.

    Running several steps per call removes per-step Python overhead on JAX and
    TensorFlow. Keras on torch rejects values above 1, so torch gets 1.
    """
    limit = backend_module().max_steps_per_execution
    return 16 if limit is None else min(16, limit)
