"""Next-item evaluation against NumPy, sampled negatives, and the RetrievalValidation callback."""

import keras
import numpy as np
import pytest

import two_tower
from two_tower.evaluation import RetrievalValidation, evaluate_next_item, sample_negatives

QUERIES, ITEMS, DIM = 300, 500, 6


def problem(seed=0):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(QUERIES, DIM)).astype("float32")
    catalogue = rng.normal(size=(ITEMS, DIM)).astype("float32")
    targets = rng.integers(0, ITEMS, QUERIES)
    exclude = rng.integers(-1, ITEMS, (QUERIES, 12))
    exclude[:20, 0] = targets[:20]  # the target listed: it is still ranked
    exclude[20:40, 1] = exclude[20:40, 2]  # an item listed twice is left out once
    return queries, catalogue, targets, exclude


def numpy_metrics(ranks, ks):
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.mean()
        out[f"ndcg@{k}"] = np.where(hit, 1 / np.log2(ranks + 2.0), 0).mean()
        out[f"mrr@{k}"] = np.where(hit, 1 / (ranks + 1.0), 0).mean()
    return out


def numpy_full_ranks(queries, catalogue, targets, exclude):
    scores = queries.astype("float64") @ catalogue.T.astype("float64")
    ranks = []
    for row, target in enumerate(targets):
        competing = np.ones(ITEMS, bool)
        competing[exclude[row][exclude[row] >= 0]] = False
        competing[target] = False
        ranks.append(int((scores[row][competing] >= scores[row, target]).sum()))
    return np.array(ranks)


@pytest.mark.parametrize("with_exclusions", [False, True])
def test_full_ranking_matches_numpy(with_exclusions):
    queries, catalogue, targets, exclude = problem()
    if not with_exclusions:
        exclude = np.full((QUERIES, 1), -1)
    found = evaluate_next_item(
        queries, catalogue, targets, exclude=exclude if with_exclusions else None,
        ks=(1, 10, 50), batch_size=64,
    )  # fmt: skip
    expected = numpy_metrics(numpy_full_ranks(queries, catalogue, targets, exclude), (1, 10, 50))
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=1e-12), key
    assert expected["hr@50"] > 0.05  # not all zero: the comparison means something


def test_sampled_ranking_matches_numpy():
    queries, catalogue, targets, _ = problem(1)
    rng = np.random.default_rng(5)
    negatives = (targets[:, None] + rng.integers(1, ITEMS, (QUERIES, 40))) % ITEMS
    found = evaluate_next_item(queries, catalogue, targets, negatives=negatives, ks=(5, 10))
    scores = np.einsum("qd,qcd->qc", queries, catalogue[np.c_[targets, negatives]])
    ranks = (scores[:, 1:] >= scores[:, :1]).sum(axis=1)
    for key, value in numpy_metrics(ranks, (5, 10)).items():
        assert found[key] == pytest.approx(value, abs=1e-12), key


def test_a_custom_similarity_is_used_for_both_protocols():
    queries, catalogue, targets, exclude = problem(2)
    negatives = (targets[:, None] + np.arange(1, 31)) % ITEMS

    def negated(q, c):
        return -keras.ops.matmul(q, keras.ops.transpose(c))

    flipped = evaluate_next_item(-queries, catalogue, targets, exclude=exclude)
    assert evaluate_next_item(queries, catalogue, targets, exclude=exclude,
                              similarity_fn=negated) == flipped  # fmt: skip
    flipped = evaluate_next_item(-queries, catalogue, targets, negatives=negatives)
    assert evaluate_next_item(queries, catalogue, targets, negatives=negatives,
                              similarity_fn=negated) == flipped  # fmt: skip


def test_ties_count_against_the_target():
    catalogue = np.ones((4, 2), "float32")
    found = evaluate_next_item(np.ones((1, 2), "float32"), catalogue, [2], ks=(1, 4))
    assert found["hr@1"] == 0.0 and found["hr@4"] == 1.0 and found["mrr@4"] == 0.25


def test_a_function_embeds_queries_batch_by_batch():
    queries, catalogue, targets, exclude = problem(3)
    seen = []

    def embed(rows):
        seen.append(len(rows))
        return queries[rows]

    found = evaluate_next_item(embed, catalogue, targets, exclude=exclude, batch_size=128)
    assert found == evaluate_next_item(queries, catalogue, targets, exclude=exclude)
    assert seen == [128, 128, 44]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"targets": []}, "is empty"),
        ({"targets": [ITEMS]}, r"in \[0, 500\)"),
        ({"targets": [0.5]}, "integer item indices"),
        ({"exclude": np.zeros((2, 3), int)}, "with 1 rows"),
        ({"exclude": [[-2]]}, "or -1 padding"),
        ({"negatives": [[-1]]}, r"in \[0, 500\)"),
        ({"negatives": [[3, 4]]}, "own target"),
        ({"negatives": [[1]], "exclude": [[1]]}, "pass one of them"),
        ({"queries": np.full((1, DIM), np.nan, "float32")}, "NaN"),
        ({"queries": np.ones((1, DIM + 1), "float32")}, "dimensions"),
        ({"ks": (0,)}, "ks"),
        ({"ks": ()}, "ks"),
    ],
)
def test_evaluate_bad_input(arguments, message):
    _, catalogue, _, _ = problem()
    queries = arguments.pop("queries", np.ones((1, DIM), "float32"))
    targets = arguments.pop("targets", [3])
    with pytest.raises(ValueError, match=message):
        evaluate_next_item(queries, catalogue, targets, **arguments)


# ---------------------------------------------------------------- negatives
def test_negatives_are_distinct_unseen_and_seeded():
    rng = np.random.default_rng(0)
    seen = rng.integers(-1, 60, (200, 30))
    negatives = sample_negatives(seen, 60, num=20, seed=3)
    assert negatives.shape == (200, 20) and negatives.min() >= 0 and negatives.max() < 60
    for row in range(200):
        assert len(set(negatives[row].tolist())) == 20
        assert not set(negatives[row].tolist()) & set(seen[row].tolist())
    np.testing.assert_array_equal(negatives, sample_negatives(seen, 60, num=20, seed=3))
    assert not np.array_equal(negatives, sample_negatives(seen, 60, num=20, seed=4))


def test_uniform_and_popularity_distributions():
    seen = np.full((4000, 1), -1)
    uniform = np.bincount(sample_negatives(seen, 10, num=1).ravel(), minlength=10) / 4000
    np.testing.assert_allclose(uniform, 0.1, atol=0.03)
    counts = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 11])  # item 9: half the mass, item 0 never
    drawn = np.bincount(
        sample_negatives(seen, 10, num=1, distribution="popularity", item_counts=counts).ravel(),
        minlength=10,
    )
    assert drawn[0] == 0
    assert drawn[9] / 4000 == pytest.approx(0.55, abs=0.04)


def test_negatives_bad_input():
    with pytest.raises(ValueError, match="items left to sample from"):
        sample_negatives([[0, 1, 2]], 5, num=3)
    with pytest.raises(ValueError, match="needs `item_counts`"):
        sample_negatives([[0]], 5, num=1, distribution="popularity")
    with pytest.raises(ValueError, match="distribution='popularity' only"):
        sample_negatives([[0]], 5, num=1, item_counts=np.ones(5))
    with pytest.raises(ValueError, match="item_counts"):
        sample_negatives([[0]], 5, num=1, distribution="popularity", item_counts=np.ones(4))
    with pytest.raises(ValueError, match="distribution"):
        sample_negatives([[0]], 5, num=1, distribution="zipf")


# ----------------------------------------------------------------- callback
def _model_and_batch():
    model = two_tower.TwoTowerRetrieval.for_sequences(8, max_length=3, embedding_dim=4, dropout=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    batch = {
        "query": {"sequence": np.array([[1, 2, 3]]), "segment": np.array([[1, 1, 1]])},
        "candidate": np.array([[2, 3, 4]]),
    }
    return model, batch


class Scripted(RetrievalValidation):
    """Reports a scripted `full_ndcg@10` per validation, to test the bookkeeping."""

    def __init__(self, values, **kwargs):
        super().__init__({"history": np.array([[3, 2, 1]])}, [4], **kwargs)
        self.values = list(values)

    def evaluate(self):
        return {"full_ndcg@10": self.values.pop(0)}


class Weights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.by_epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.by_epoch.append([np.array(w) for w in self.model.get_weights()])


def test_restores_the_best_epoch():
    model, batch = _model_and_batch()
    weights = Weights()
    validation = Scripted([0.1, 0.3, 0.2, 0.25], verbose=0)
    history = model.fit(batch, epochs=4, verbose=0, callbacks=[weights, validation])
    assert history.history["val_full_ndcg@10"] == [0.1, 0.3, 0.2, 0.25]
    assert validation.best == 0.3 and validation.best_epoch == 1
    for found, expected in zip(model.get_weights(), weights.by_epoch[1], strict=True):
        np.testing.assert_array_equal(found, expected)
    assert not np.array_equal(weights.by_epoch[1][0], weights.by_epoch[3][0])


def test_patience_stops_and_frequency_skips():
    model, batch = _model_and_batch()
    validation = Scripted([0.3, 0.2, 0.1, 0.0], patience=2, verbose=0)
    history = model.fit(batch, epochs=10, verbose=0, callbacks=[validation])
    assert len(history.history["loss"]) == 3
    model, batch = _model_and_batch()
    validation = Scripted([0.1, 0.2, 0.3], frequency=2, verbose=0)
    model.fit(batch, epochs=5, verbose=0, callbacks=[validation])
    assert sorted(validation.history) == [1, 3, 4]  # every 2nd epoch, and the last


def test_real_validation_matches_evaluate_next_item():
    model, batch = _model_and_batch()
    histories = np.array([[3, 2, 1], [2, 1, -1], [5, -1, -1]])
    targets = np.array([4, 3, 6])
    negatives = np.array([[0, 1], [0, 5], [1, 2]])
    validation = RetrievalValidation(
        {"history": histories}, targets, exclude=histories, negatives=negatives, ks=(2,),
        monitor="sampled_hr@2", verbose=0,
    )  # fmt: skip
    model.fit(batch, epochs=1, verbose=0, callbacks=[validation])
    queries = model.predict({"history": histories}, verbose=0)
    catalogue = keras.ops.convert_to_numpy(model.embed_candidates(np.arange(8)))
    full = evaluate_next_item(queries, catalogue, targets, exclude=histories, ks=(2,))
    sampled = evaluate_next_item(queries, catalogue, targets, negatives=negatives, ks=(2,))
    expected = {f"full_{k}": v for k, v in full.items()}
    expected.update({f"sampled_{k}": v for k, v in sampled.items()})
    assert validation.history[0] == pytest.approx(expected)


def test_callback_needs_a_catalogue_without_catalogue_size():
    model = two_tower.TwoTowerRetrieval.for_sequences(
        8, max_length=3, embedding_dim=4, loss="softmax"
    )
    model.compile(optimizer="sgd")
    _, batch = _model_and_batch()
    validation = RetrievalValidation({"history": np.array([[3, 2, 1]])}, [4], verbose=0)
    with pytest.raises(ValueError, match="catalogue=np.arange"):
        model.fit(batch, epochs=1, verbose=0, callbacks=[validation])
    validation = RetrievalValidation(
        {"history": np.array([[3, 2, 1]])}, [4], catalogue=np.arange(8), verbose=0
    )
    model.fit(batch, epochs=1, verbose=0, callbacks=[validation])
    assert "full_ndcg@10" in validation.history[0]


def test_callback_bad_input():
    with pytest.raises(ValueError, match="monitor"):
        RetrievalValidation({"history": np.zeros((1, 3))}, [1], monitor="ndcg@10")
    with pytest.raises(ValueError, match="needs `negatives`"):
        RetrievalValidation({"history": np.zeros((1, 3))}, [1], monitor="sampled_hr@10")
    model, batch = _model_and_batch()
    validation = RetrievalValidation(
        {"history": np.array([[3, 2, 1]])}, [4], monitor="full_ndcg@5", verbose=0
    )
    with pytest.raises(ValueError, match="not among the results"):
        model.fit(batch, epochs=1, verbose=0, callbacks=[validation])
