"""A subclass's `call` and the outputs the loss reads (`RetrievalOutputs`).

A `call` override that returns only the two embeddings must not train a different
loss in silence: the loss raises, naming what is missing. One that returns
`self.retrieval_outputs(...)` trains the same loss as the model, checked against
NumPy.
"""

import keras
import numpy as np
import pytest

import two_tower

USERS, ITEMS, DIM = 12, 9, 4


class EmbeddingsOnly(two_tower.TwoTowerRetrieval):
    def call(self, inputs, training=False):
        if "query" not in inputs or "candidate" not in inputs:
            return self.query_tower(inputs)
        return {
            "query_embeddings": self.query_tower(inputs["query"]),
            "candidate_embeddings": self.candidate_tower(inputs["candidate"]),
        }


class ScaledQueries(two_tower.TwoTowerRetrieval):
    """Doubles the query embeddings, and returns everything the loss needs."""

    def call(self, inputs, training=False):
        if "query" not in inputs or "candidate" not in inputs:
            return 2.0 * self.query_tower(inputs)
        query = 2.0 * self.query_tower(inputs["query"])
        candidate = self.candidate_tower(inputs["candidate"])
        return self.retrieval_outputs(inputs, query, candidate, training)


def make(cls, **kwargs):
    keras.utils.set_random_seed(0)
    return cls(keras.layers.Embedding(USERS, DIM), keras.layers.Embedding(ITEMS, DIM), **kwargs)


def pairs():
    # Candidate 3 appears twice: an accidental hit for each of its rows.
    return {"query": np.array([0, 1, 2, 3, 4, 5]), "candidate": np.array([3, 1, 3, 7, 8, 0])}


@pytest.mark.parametrize(
    ("options", "missing"),
    [
        ({"loss": "softmax", "remove_accidental_hits": True}, "candidate_ids"),
        ({"loss": "full_softmax", "catalogue_size": ITEMS}, "catalogue_embeddings"),
        (
            {"loss": "sampled_softmax", "catalogue_size": ITEMS, "num_sampled_negatives": 4},
            "sampled_candidate_embeddings",
        ),
    ],
)
def test_call_without_what_the_loss_needs_raises(options, missing):
    model = make(EmbeddingsOnly, **options)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=rf"`call` returned no \[.*'{missing}'.*retrieval_outputs"):
        model.fit(pairs(), batch_size=6, epochs=1, verbose=0)


def test_call_with_only_embeddings_is_enough_for_plain_softmax():
    model = make(EmbeddingsOnly, loss="softmax")
    model.compile(optimizer="sgd")
    model.fit(pairs(), batch_size=6, epochs=1, verbose=0)


def test_evaluation_with_factorized_top_k_needs_the_catalogue():
    model = make(EmbeddingsOnly, loss="softmax", catalogue_size=ITEMS)
    model.compile(optimizer="sgd", metrics=[two_tower.FactorizedTopK(ks=(3,))])
    model.fit(pairs(), batch_size=6, epochs=1, verbose=0)  # training steps rank nothing
    with pytest.raises(ValueError, match="metrics_catalogue_embeddings"):
        model.evaluate(pairs(), batch_size=6, verbose=0)


def numpy_softmax(logits, positives, mask=None):
    logits = np.where(mask, -np.inf, logits) if mask is not None else logits
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(positives)), positives].mean()


def embeddings(model):
    return [
        keras.ops.convert_to_numpy(t.embeddings) for t in (model.query_tower, model.candidate_tower)
    ]


@pytest.mark.parametrize("loss", ["softmax", "full_softmax"])
def test_override_returning_retrieval_outputs_trains_the_same_loss(loss):
    options = {"remove_accidental_hits": True} if loss == "softmax" else {"catalogue_size": ITEMS}
    model = make(ScaledQueries, loss=loss, temperature=0.5, **options)
    model.compile(optimizer="sgd")
    x = pairs()
    model.fit(x, batch_size=6, epochs=1, verbose=0)  # builds; weights then read back
    users, items = embeddings(model)
    q = 2.0 * users[x["query"]].astype("float64")
    if loss == "softmax":
        logits = q @ items[x["candidate"]].T / 0.5
        ids = x["candidate"]
        accidental = (ids[:, None] == ids[None, :]) & ~np.eye(len(ids), dtype=bool)
        expected = numpy_softmax(logits, np.arange(len(ids)), accidental)
    else:
        expected = numpy_softmax(q @ items.T / 0.5, x["candidate"])
    found = model.evaluate(x, batch_size=6, verbose=0)
    np.testing.assert_allclose(found, expected, rtol=1e-5)
