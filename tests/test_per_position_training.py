"""Per-position training: one packed pass equals a row per prefix (loss and gradients)."""

import keras
import numpy as np
import pytest

import two_tower

WIDTH = 4
NUM_ITEMS = 9
# Three users, time order; user 2 has more targets than WIDTH (cut into two pieces).
USERS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2])
ITEMS = np.array([1, 4, 2, 3, 3, 5, 0, 2, 7, 8, 1, 6])
TIMES = np.arange(len(USERS))


def packed_batch():
    log = two_tower.InteractionLog(USERS, ITEMS, TIMES)
    data = two_tower.datasets.SequenceDataset(log, max_length=WIDTH, batch_size=99, shuffle=False)
    assert len(data) == 1
    return data[0]


def per_row_batch(batch):
    """Each packed position as its own row: the prefix of its segment, most recent first."""
    sequence, segment = batch["query"]["sequence"], batch["query"]["segment"]
    histories, targets = [], []
    for row, column in zip(*np.nonzero(segment > 0), strict=True):
        same = np.flatnonzero(segment[row, : column + 1] == segment[row, column])
        history = np.full(WIDTH, -1, "int32")
        history[: len(same)] = sequence[row, same][::-1]
        histories.append(history)
        targets.append(batch["candidate"][row, column])
    return {"query": {"history": np.array(histories)}, "candidate": np.array(targets, "int32")}


def _model(loss):
    options = {"full_softmax": {}, "softmax": {"remove_accidental_hits": True}}.get(loss, {})
    if loss == "sampled_softmax":
        options = {"num_sampled_negatives": 5}
    model = two_tower.TwoTowerRetrieval.for_sequences(
        NUM_ITEMS, max_length=WIDTH, embedding_dim=8, num_heads=2, dropout=0.0, loss=loss,
        **options,
    )  # fmt: skip
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    return model


@pytest.mark.parametrize("loss", ["full_softmax", "softmax", "sampled_softmax"])
def test_one_packed_step_equals_a_row_per_prefix(loss):
    batch = packed_batch()
    rows = per_row_batch(batch)
    # 9 targets: user 0 gives 2, user 1 gives 1, user 2 gives 6 (pieces of 4 and 2).
    assert len(rows["candidate"]) == 9 and (batch["candidate"] >= 0).sum() == 9
    packed_model, row_model = _model(loss), _model(loss)
    packed_model.predict({"history": rows["query"]["history"][:1]}, verbose=0)
    row_model.predict({"history": rows["query"]["history"][:1]}, verbose=0)
    rng = np.random.default_rng(0)
    weights = [rng.normal(scale=0.3, size=w.shape).astype("float32") for w in packed_model.weights]
    packed_model.set_weights(weights)
    row_model.set_weights(weights)
    packed = packed_model.fit(batch, batch_size=len(batch["candidate"]), shuffle=False, verbose=0)
    by_row = row_model.fit(rows, batch_size=len(rows["candidate"]), shuffle=False, verbose=0)
    np.testing.assert_allclose(packed.history["loss"], by_row.history["loss"], rtol=1e-5)
    moved = 0.0
    for before, after, other in zip(
        weights, packed_model.get_weights(), row_model.get_weights(), strict=True
    ):
        np.testing.assert_allclose(after, other, atol=2e-5, rtol=1e-4)
        moved = max(moved, float(np.abs(after - before).max()))
    assert moved > 1e-3  # the step did something: equal gradients, not two zeros


@pytest.mark.parametrize("per", ["row", "position"])
def test_sample_weights_per_row_or_per_position(per):
    batch = packed_batch()
    rows = per_row_batch(batch)
    model = _model("softmax")
    model.predict({"history": rows["query"]["history"][:1]}, verbose=0)
    rng = np.random.default_rng(1)
    shape = batch["candidate"].shape
    weights = rng.uniform(0.5, 2.0, shape[0] if per == "row" else shape).astype("float32")
    per_position = weights[:, None] * np.ones(shape) if per == "row" else weights
    valid = batch["candidate"] >= 0
    packed = model.compute_loss(batch, None, model(batch), sample_weight=weights)
    by_row = model.compute_loss(
        rows, None, model(rows), sample_weight=per_position[valid].astype("float32")
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(packed), keras.ops.convert_to_numpy(by_row), rtol=1e-5
    )
    unweighted = model.compute_loss(batch, None, model(batch))
    assert abs(float(keras.ops.convert_to_numpy(unweighted - packed))) > 1e-4


def test_predict_on_packed_pairs_gives_both_embeddings_per_position():
    batch = packed_batch()
    model = _model("full_softmax")
    found = model.predict(batch, verbose=0)
    rows = len(batch["candidate"])
    assert found["query_embeddings"].shape == (rows, WIDTH, 8)
    assert found["candidate_embeddings"].shape == (rows, WIDTH, 8)


def test_sequence_dataset_must_fit_the_towers():
    log = two_tower.InteractionLog(USERS, ITEMS, TIMES)
    model = _model("full_softmax")
    wide = two_tower.datasets.SequenceDataset(log, max_length=WIDTH + 1)
    with pytest.raises(ValueError, match="max_length=4"):
        model.fit(wide, verbose=0)
    big = two_tower.InteractionLog(USERS, ITEMS + 5, TIMES)
    with pytest.raises(ValueError, match="item index 13"):
        model.fit(two_tower.datasets.SequenceDataset(big, max_length=WIDTH), verbose=0)
    # The full softmax scores every item: a logQ correction would be silently wrong.
    corrected = two_tower.datasets.SequenceDataset(log, max_length=WIDTH, sampling_probability=True)
    with pytest.raises(ValueError, match="loss='full_softmax' does not use it"):
        model.fit(corrected, verbose=0)


def test_padding_is_no_negative_and_has_no_loss():
    """The loss of packed rows does not change with what the padded positions hold."""
    batch = packed_batch()
    model = _model("softmax")
    model.predict({"history": np.full((1, WIDTH), -1)}, verbose=0)
    outputs = model(batch)
    loss = float(keras.ops.convert_to_numpy(model.compute_loss(batch, None, outputs)))
    wider = {
        "query": {k: np.pad(v, ((0, 2), (0, 0)), constant_values=(0 if k == "segment" else -1))
                  for k, v in batch["query"].items()},
        "candidate": np.pad(batch["candidate"], ((0, 2), (0, 0)), constant_values=-1),
    }  # fmt: skip
    padded = float(keras.ops.convert_to_numpy(model.compute_loss(wider, None, model(wider))))
    np.testing.assert_allclose(padded, loss, rtol=1e-6)


def test_per_position_errors():
    batch = packed_batch()
    model = _model("full_softmax")
    with pytest.raises(ValueError, match=r"\[rows, length\] integers"):
        model.fit({"query": batch["query"], "candidate": batch["candidate"][:, 0]}, verbose=0)
    with pytest.raises(ValueError, match="ids or -1"):
        model.fit({"query": batch["query"], "candidate": batch["candidate"] - 5}, verbose=0)
    with pytest.raises(ValueError, match=r"lie in \[0, 9\)"):
        model.fit({"query": batch["query"], "candidate": batch["candidate"] + 9}, verbose=0)
    mse = two_tower.TwoTowerRetrieval(
        two_tower.SequenceTower(max_length=WIDTH), two_tower.IdEmbeddingTower(NUM_ITEMS, 8),
        loss="mse",
    )  # fmt: skip
    mse.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="softmax loss"):
        mse.fit(batch, np.zeros(len(batch["candidate"])), verbose=0)
