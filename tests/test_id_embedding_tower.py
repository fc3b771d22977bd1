import keras
import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip, save_and_load


@pytest.mark.parametrize(("bias", "width"), [(None, 4), ("learned", 5), ("constant", 5)])
def test_output_matches_the_tables(bias, width):
    tower = two_tower.IdEmbeddingTower(10, embedding_dim=4, bias=bias)
    ids = np.array([3, 0, 9])
    out = keras.ops.convert_to_numpy(tower(ids))
    assert out.shape == (3, width)
    table = keras.ops.convert_to_numpy(tower.embedding.embeddings)
    np.testing.assert_allclose(out[:, :4], table[ids])
    if bias == "constant":
        np.testing.assert_array_equal(out[:, 4], np.ones(3))
    if bias == "learned":
        bias_table = keras.ops.convert_to_numpy(tower.bias_embedding.embeddings)
        np.testing.assert_allclose(out[:, 4], bias_table[ids, 0])


def test_l2_penalty_matches_numpy():
    tower = two_tower.IdEmbeddingTower(6, embedding_dim=3, l2=0.1, bias="learned")
    tower(np.array([1]))
    table = keras.ops.convert_to_numpy(tower.embedding.embeddings)
    penalty = sum(float(keras.ops.convert_to_numpy(loss)) for loss in tower.losses)
    np.testing.assert_allclose(penalty, 0.1 * np.sum(table**2), rtol=1e-5)  # bias starts at 0


def test_config_and_save_round_trip(tmp_path):
    restored = assert_config_round_trip(
        two_tower.IdEmbeddingTower(7, embedding_dim=2, l2=0.5, bias="learned")
    )
    assert (restored.vocabulary_size, restored.l2, restored.bias) == (7, 0.5, "learned")
    model = two_tower.TwoTowerRetrieval.from_ids(5, 8, embedding_dim=3)
    model.compile(optimizer=two_tower.defaults.optimizer())
    model.fit({"query": np.arange(16) % 5, "candidate": np.arange(16) % 8}, batch_size=8, verbose=0)
    model.index_candidates(np.arange(8))
    expected = model.recommend(np.arange(5), k=3)
    np.testing.assert_array_equal(
        save_and_load(model, tmp_path).recommend(np.arange(5), k=3), expected
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocabulary_size": 0}, "vocabulary_size"),
        ({"embedding_dim": -2}, "embedding_dim"),
        ({"l2": -1.0}, "l2"),
        ({"bias": "popularity"}, "bias"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    arguments = {"vocabulary_size": 4}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        two_tower.IdEmbeddingTower(**arguments)


def test_from_ids_uses_the_defaults():
    model = two_tower.TwoTowerRetrieval.from_ids(5, 8)
    assert model.loss_name == two_tower.defaults.LOSS == "full_softmax"
    assert model.catalogue_size == 8
    assert model.candidate_tower.bias == "learned" and model.query_tower.bias == "constant"
    assert model.candidate_tower.embedding_dim == two_tower.defaults.EMBEDDING_DIM
    assert model.candidate_tower.l2 == two_tower.defaults.L2


def test_steps_per_execution_default_is_explicit_per_backend():
    expected = 1 if keras.backend.backend() == "torch" else 16
    assert two_tower.defaults.steps_per_execution() == expected


def test_steps_per_execution_above_one_is_rejected_on_torch_only():
    model = two_tower.TwoTowerRetrieval.from_ids(5, 8)
    model.compile(optimizer="adam", steps_per_execution=2)
    x = {"query": np.arange(16) % 5, "candidate": np.arange(16) % 8}
    if keras.backend.backend() == "torch":
        with pytest.raises(ValueError, match="steps_per_execution"):
            model.fit(x, batch_size=4, verbose=0)
    else:
        history = model.fit(x, batch_size=4, epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
