"""SequenceTower: outputs against a NumPy transformer, packed rows, saving, bad input."""

import keras
import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip, save_and_load

WIDTH = 5
DIM = 8
NUM_ITEMS = 12
# Serving input: the most recent item first, -1 after.
HISTORY = np.array(
    [[3, 1, 4, -1, -1], [-1, -1, -1, -1, -1], [2, 9, 0, 5, 7], [6, -1, -1, -1, -1]], "int32"
)
# Packed training rows, oldest first: segments 1, 2, ... and 0 where padded.
PACKED = {
    "sequence": np.array([[4, 1, 3, 8, 2], [5, 0, 9, 2, 7], [6, 11, -1, -1, -1]], "int32"),
    "segment": np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 2, 0, 0, 0]], "int32"),
}


def _layer_norm(x, layer):
    gamma, beta = (keras.ops.convert_to_numpy(w) for w in (layer.gamma, layer.beta))
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + 1e-8) * gamma + beta


def _dense(x, layer):
    return x @ keras.ops.convert_to_numpy(layer.kernel) + keras.ops.convert_to_numpy(layer.bias)


def _attention(queries, values, layer):
    """Keras' MultiHeadAttention, causal, in NumPy: heads of `key_dim`, scaled dot products."""

    def project(x, dense):
        kernel = keras.ops.convert_to_numpy(dense.kernel)  # [dim, heads, key_dim]
        return np.einsum("td,dhk->thk", x, kernel) + keras.ops.convert_to_numpy(dense.bias)

    q = project(queries, layer._query_dense)
    k = project(values, layer._key_dense)
    v = project(values, layer._value_dense)
    logits = np.einsum("thk,shk->hts", q, k) / np.sqrt(q.shape[-1])
    length = len(queries)
    logits = np.where(np.tril(np.ones((length, length), bool))[None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("hts,shk->thk", weights, v)
    output = layer._output_dense
    return np.einsum("thk,hkd->td", attended, keras.ops.convert_to_numpy(output.kernel)) + (
        keras.ops.convert_to_numpy(output.bias)
    )


def numpy_sequence(tower, items):
    """The tower's output at every position of one user's items (oldest first), no padding."""
    if len(items) == 0:
        return keras.ops.convert_to_numpy(tower.output_norm.beta)[None]
    table = keras.ops.convert_to_numpy(tower.item_table.embeddings)
    positions = keras.ops.convert_to_numpy(tower.positions.embeddings)
    order = np.arange(len(items))
    if tower.positions_from == "from_newest":
        order = order[::-1]
    hidden = table[items] * np.sqrt(table.shape[1]) + positions[order]
    for block in range(tower.num_blocks):
        queries = _layer_norm(hidden, tower.attention_norms[block])
        hidden = _layer_norm(
            queries + _attention(queries, hidden, tower.attentions[block]),
            tower.feed_forward_norms[block],
        )
        inner = np.maximum(_dense(hidden, tower.feed_forward_inner[block]), 0)
        hidden = hidden + _dense(inner, tower.feed_forward_outer[block])
    return _layer_norm(hidden, tower.output_norm)


def _randomise(tower, seed=0):
    """Random weights (biases and norms included), so that no term hides behind a zero."""
    rng = np.random.default_rng(seed)
    for weight in tower.weights:
        weight.assign(rng.normal(scale=0.5, size=weight.shape).astype("float32"))


def _tower(**options):
    options = {
        "num_items": NUM_ITEMS, "embedding_dim": DIM, "max_length": WIDTH, "dropout": 0.0,
        **options,
    }  # fmt: skip
    tower = two_tower.SequenceTower(**options)
    tower({"history": HISTORY})
    _randomise(tower)
    return tower


@pytest.mark.parametrize("positions", ["from_oldest", "from_newest"])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])  # Keras' attention takes another path with it
def test_serving_output_matches_numpy(positions, heads, dropout):
    tower = _tower(positions=positions, num_heads=heads, dropout=dropout)
    found = keras.ops.convert_to_numpy(tower({"history": HISTORY}))
    for row, history in enumerate(HISTORY):
        items = history[history >= 0][::-1]  # oldest first
        expected = numpy_sequence(tower, items)[-1]
        np.testing.assert_allclose(found[row], expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("positions", ["from_oldest", "from_newest"])
def test_packed_rows_match_each_segment_alone(positions):
    tower = _tower(positions=positions, num_heads=2)
    found = keras.ops.convert_to_numpy(tower(PACKED))
    assert found.shape == (3, WIDTH, DIM)
    for row in range(3):
        segments = PACKED["segment"][row]
        for number in set(segments[segments > 0].tolist()):
            columns = np.flatnonzero(segments == number)
            expected = numpy_sequence(tower, PACKED["sequence"][row][columns])
            np.testing.assert_allclose(found[row, columns], expected, atol=2e-4, rtol=2e-4)


def test_from_oldest_position_t_is_the_serving_output_of_the_prefix():
    tower = _tower(positions="from_oldest")
    found = keras.ops.convert_to_numpy(tower(PACKED))
    items = PACKED["sequence"][1]  # one segment of five items
    prefixes = np.full((WIDTH, WIDTH), -1, "int32")
    for t in range(WIDTH):
        prefixes[t, : t + 1] = items[: t + 1][::-1]
    served = keras.ops.convert_to_numpy(tower({"history": prefixes}))
    np.testing.assert_allclose(found[1], served, atol=1e-5)


def test_inputs_wider_than_max_length_raise_inside_the_call():
    tower = _tower()
    wide = keras.ops.convert_to_tensor(np.full((1, WIDTH + 2), -1, "int32"))  # no host check
    with pytest.raises(ValueError, match="at most 5 columns"):
        tower({"history": wide})


def test_bias_column_and_shared_table():
    items = two_tower.IdEmbeddingTower(NUM_ITEMS, embedding_dim=DIM, bias="learned")
    model = two_tower.TwoTowerRetrieval(
        two_tower.SequenceTower(max_length=WIDTH, bias="constant"),
        items,
        loss="full_softmax",
        catalogue_size=NUM_ITEMS,
    )
    assert model.query_tower.item_table is items.embedding
    out = keras.ops.convert_to_numpy(model.query_tower({"history": HISTORY}))
    assert out.shape == (4, DIM + 1)
    np.testing.assert_array_equal(out[:, -1], 1.0)
    # The table is the candidate tower's: not a weight of the query tower too.
    table = items.embedding.embeddings
    assert not any(w is table for w in model.query_tower.weights)


def test_dropout_applies_in_training_only():
    tower = two_tower.SequenceTower(NUM_ITEMS, DIM, max_length=WIDTH, dropout=0.5)
    first = keras.ops.convert_to_numpy(tower({"history": HISTORY}))
    again = keras.ops.convert_to_numpy(tower({"history": HISTORY}))
    np.testing.assert_array_equal(first, again)
    trained = keras.ops.convert_to_numpy(tower({"history": HISTORY}, training=True))
    assert not np.allclose(first, trained)


def test_config_round_trip():
    tower = two_tower.SequenceTower(
        NUM_ITEMS, DIM, max_length=7, num_blocks=3, num_heads=2, dropout=0.3,
        history_key="h", sequence_key="s", segment_key="g", positions="from_newest",
        bias="constant",
    )  # fmt: skip
    restored = assert_config_round_trip(tower)
    assert restored.get_config()["num_blocks"] == 3


def test_saved_model_gives_the_same_outputs(tmp_path):
    model = two_tower.TwoTowerRetrieval.for_sequences(NUM_ITEMS, max_length=WIDTH, dropout=0.1)
    model.compile(optimizer=two_tower.defaults.sequence_optimizer())
    target = np.where(PACKED["segment"] > 0, (PACKED["sequence"] + 1) % NUM_ITEMS, -1)
    model.fit({"query": PACKED, "candidate": target}, epochs=2, verbose=0)
    # Saved before any serving call: the model records the serving input (what it is
    # rebuilt with, and what `export` serves), not the training rows.
    assert model.get_build_config()["query_input_spec"] == {"history": f"int32|{WIDTH}"}
    loaded = save_and_load(model, tmp_path)
    before = model.predict({"history": HISTORY}, verbose=0)
    assert loaded.query_tower.item_table is loaded.candidate_tower.embedding
    np.testing.assert_allclose(loaded.predict({"history": HISTORY}, verbose=0), before, atol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.query_tower(PACKED)),
        keras.ops.convert_to_numpy(model.query_tower(PACKED)),
        atol=1e-6,
    )


def test_own_table_saved_in_a_model(tmp_path):
    tower = two_tower.SequenceTower(NUM_ITEMS, DIM, max_length=WIDTH)
    model = two_tower.TwoTowerRetrieval(tower, two_tower.IdEmbeddingTower(NUM_ITEMS, DIM))
    model.predict({"history": HISTORY}, verbose=0)
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_allclose(
        loaded.predict({"history": HISTORY}, verbose=0),
        model.predict({"history": HISTORY}, verbose=0),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_heads": 3}, "divide"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"max_length": 0}, "max_length"),
        ({"positions": "random"}, "positions"),
        ({"bias": "learned"}, "bias"),
        ({"segment_key": "history"}, "differ"),
        ({"sequence_key": ""}, "sequence_key"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        two_tower.SequenceTower(**{"num_items": NUM_ITEMS, "embedding_dim": DIM, **options})


def test_embedding_dim_without_own_table_must_match_the_shared_one():
    with pytest.raises(ValueError, match="differs from the shared"):
        two_tower.TwoTowerRetrieval(
            two_tower.SequenceTower(embedding_dim=4, max_length=WIDTH),
            two_tower.IdEmbeddingTower(NUM_ITEMS, embedding_dim=DIM),
        )
    with pytest.raises(ValueError, match="must divide"):
        two_tower.TwoTowerRetrieval(
            two_tower.SequenceTower(num_heads=3, max_length=WIDTH),
            two_tower.IdEmbeddingTower(NUM_ITEMS, embedding_dim=DIM),
        )


def _packed(**changes):
    return {**{k: v.copy() for k, v in PACKED.items()}, **changes}


@pytest.mark.parametrize(
    "features, message",
    [
        (HISTORY, "dict of features"),
        ({"other": HISTORY}, "Neither 'history' nor 'sequence'"),
        ({"history": HISTORY[:, :3]}, r"\[batch, 5\]"),
        ({"history": np.array([[NUM_ITEMS, -1, -1, -1, -1]])}, r"in \[0, 12\)"),
        ({"history": np.array([[-1, 3, -1, -1, -1]])}, "padding before an item"),
        ({"sequence": PACKED["sequence"]}, "no 'segment'"),
        (_packed(segment=PACKED["segment"][:2]), "same shape"),
        (_packed(sequence=np.full((3, WIDTH), -2)), "or -1 padding"),
        (_packed(segment=PACKED["segment"] - 1), "segment numbers >= 1"),
        (_packed(segment=np.ones((3, WIDTH), "int32")), "only there"),
        (
            {
                "sequence": np.array([[1, 2, 3, 4, 5]]),
                "segment": np.array([[1, 1, 2, 1, 1]]),
            },
            "one run",
        ),
        ({"history": [[1, 2], [3]]}, "rectangular"),
    ],
)
def test_bad_input(features, message):
    tower = two_tower.SequenceTower(NUM_ITEMS, DIM, max_length=WIDTH)
    with pytest.raises(ValueError, match=message):
        tower(features)
