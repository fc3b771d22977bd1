"""Towers declare their id ranges through one protocol (`two_tower.towers.tower_ids`).

mypy cannot check it (Keras layers are untyped, so any subclass passes), so this
checks it at run time: each of the library's towers implements every method of
`TowerIds` with the protocol's signature, and the model's host checks use what
the tower declares (a custom tower implementing it gets them too).
"""

import inspect

import keras
import numpy as np
import pytest

import two_tower
from two_tower.towers.tower_ids import IdRange, TowerIds, tower_ids

TOWERS = {
    "IdEmbeddingTower": lambda: two_tower.IdEmbeddingTower(30, 4),
    "SparseEmbedding": lambda: two_tower.SparseEmbedding(30, 4),
    "FeatureTower": lambda: two_tower.FeatureTower(categorical={"user": 30}, output_dim=4),
    "HistoryTower": lambda: two_tower.HistoryTower(num_items=30, embedding_dim=4, max_length=3),
}
METHODS = [name for name in dir(TowerIds) if name in ("id_range", "check_feature_ranges")]


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_tower_implements_the_protocol_with_its_signatures(name):
    tower = TOWERS[name]()
    assert isinstance(tower, TowerIds)
    assert tower_ids(tower) is tower
    assert METHODS == ["check_feature_ranges", "id_range"]
    for method in METHODS:
        expected = parameters(getattr(TowerIds, method))
        assert parameters(getattr(type(tower), method)) == expected, (name, method)


def parameters(function):
    """Names, kinds and defaults (annotations may narrow the protocol's)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_declared_ranges():
    assert tower_ids(TOWERS["IdEmbeddingTower"]()).id_range() == IdRange(30, "vocabulary_size")
    assert tower_ids(TOWERS["SparseEmbedding"]()).id_range().size == 30
    assert tower_ids(TOWERS["FeatureTower"]()).id_range() is None
    assert tower_ids(keras.layers.Embedding(9, 2)).id_range().size == 9
    assert tower_ids(keras.Sequential([keras.layers.Embedding(9, 2)])).id_range().size == 9
    assert tower_ids(keras.layers.Dense(3)) is None


@keras.saving.register_keras_serializable(package="two_tower_tests")
class ShiftedIds(keras.layers.Layer):
    """A custom tower over ids [0, 5) that declares them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = keras.layers.Embedding(5, 4)

    def call(self, ids):
        return self.table(ids)

    def id_range(self):
        return IdRange(5, "ShiftedIds rows")

    def check_feature_ranges(self, features, where="features"):
        del features, where


def test_custom_tower_declaring_its_range_gets_the_host_check():
    model = two_tower.TwoTowerRetrieval(ShiftedIds(), keras.layers.Embedding(8, 4))
    model.compile(optimizer="sgd")
    x = {"query": np.array([0, 5]), "candidate": np.array([1, 2])}
    with pytest.raises(ValueError, match=r"ShiftedIds rows"):
        model.fit(x, epochs=1, verbose=0)


def test_a_sequential_over_an_embedding_may_reshape_its_ids():
    # Only the range is read from the Sequential's first layer; the shape is the
    # Sequential's business ([batch, 1] ids, then Flatten).
    def tower(rows):
        return keras.Sequential([keras.layers.Embedding(rows, 4), keras.layers.Flatten()])

    model = two_tower.TwoTowerRetrieval(tower(10), tower(12))
    model.compile(optimizer="sgd")
    x = {"query": np.arange(8).reshape(-1, 1), "candidate": np.arange(8).reshape(-1, 1)}
    model.fit(x, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)|input_dim"):
        model.fit({"query": np.full((8, 1), 10), "candidate": x["candidate"]}, verbose=0)


def test_from_ids_refuses_the_arguments_it_builds():
    with pytest.raises(TypeError, match=r"from_ids builds \['query_tower'\]"):
        two_tower.TwoTowerRetrieval.from_ids(5, 5, query_tower=keras.layers.Embedding(5, 4))
