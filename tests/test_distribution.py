"""Distribution pieces that run on one device, in every backend session.

The multi-device behaviour itself is tested in `test_multidevice_jax.py` and
`test_multidevice_tensorflow.py` (the `tests-multidevice` session).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip

MESH = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], [f"cpu:{i}" for i in range(8)])


JAX_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="Keras implements keras.distribution on JAX only; layout_map refuses other "
    "backends (tests/test_bad_input_sparse.py)",
)


@JAX_ONLY
@pytest.mark.parametrize(
    "path",
    [
        "query_tower/embedding/embeddings",  # IdEmbeddingTower
        "candidate_tower/bias/embeddings",  # its bias table
        "tower/genres_embedding/embeddings",  # FeatureTower
        "my_tower/user_table/embeddings",  # a plain keras.layers.Embedding
    ],
)
def test_layout_map_shards_every_table_by_rows(path):
    layouts = two_tower.distribution.layout_map(MESH)
    assert layouts[path].axes == ("model", None)
    # Everything else stays replicated (no entry: Keras' default layout).
    assert layouts["tower/dense/kernel"] is None


@JAX_ONLY
def test_layout_map_names_a_missing_axis():
    with pytest.raises(ValueError, match=r"axes are \['batch', 'model'\].*'rows'"):
        two_tower.distribution.layout_map(MESH, model_axis="rows")


def test_table_rows_round_trip_and_build_the_padded_shape():
    tower = two_tower.IdEmbeddingTower(943, embedding_dim=4, bias="learned", table_rows=944)
    restored = assert_config_round_trip(tower)
    assert restored.table_rows == 944
    output = restored(np.array([0, 942]))
    assert tuple(output.shape) == (2, 5)
    assert tuple(restored.embedding.embeddings.shape) == (944, 4)
    assert tuple(restored.bias_embedding.embeddings.shape) == (944, 1)
    # The extra row starts at zero; the real rows are drawn as without padding.
    assert not np.any(keras.ops.convert_to_numpy(restored.embedding.embeddings)[943:])


def test_feature_tower_table_rows_round_trip():
    tower = two_tower.FeatureTower(
        categorical={"genre": 19}, table_rows={"genre_embedding": 20}, output_dim=None
    )
    restored = assert_config_round_trip(tower)
    restored({"genre": np.array([0, 18])})
    assert tuple(restored.embeddings["genre"].embeddings.shape) == (20, 32)


@pytest.mark.parametrize("table_rows", [942, 0, 943.0, True])
def test_table_rows_below_the_vocabulary_are_refused(table_rows):
    with pytest.raises(
        ValueError, match=r"`table_rows` must be None or an integer >= vocabulary_size \(=943\)"
    ):
        two_tower.IdEmbeddingTower(943, table_rows=table_rows)


def test_feature_tower_table_rows_are_checked():
    with pytest.raises(ValueError, match=r"`table_rows`.*'genre_embedding'.*>= 19"):
        two_tower.FeatureTower(categorical={"genre": 19}, table_rows={"genre_embedding": 5})
    with pytest.raises(ValueError, match=r"`table_rows` names an unknown table 'year'"):
        two_tower.FeatureTower(categorical={"genre": 19}, table_rows={"year": 50})


def test_cross_replica_negatives_is_stored_and_checked():
    model = two_tower.TwoTowerRetrieval.from_ids(10, 20, 4, cross_replica_negatives=False)
    assert model.get_config()["cross_replica_negatives"] is False
    with pytest.raises(ValueError, match="`cross_replica_negatives` must be True or False"):
        two_tower.TwoTowerRetrieval.from_ids(10, 20, 4, cross_replica_negatives="yes")


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch process groups exist on torch only"
)
@pytest.mark.parametrize(
    "option", [{"validation_split": 0.25}, {"class_weight": {0: 1.0}}, {"shuffle": "batch"}]
)
def test_torch_process_group_refuses_arrays_that_would_reach_every_process_whole(
    monkeypatch, option
):
    # Keras' own adapter would hand each process the whole global batches, as if
    # they were its share (tests/test_multidevice_torch.py trains real groups).
    import torch.distributed

    model = two_tower.TwoTowerRetrieval.from_ids(10, 20, 4)
    model.compile(optimizer="sgd")
    x = {"query": np.arange(8), "candidate": np.arange(8)}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"process group of 2 processes.*validation_split"):
        model.fit(x, verbose=0, **option)
    for weights, kept in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(weights, kept)  # refused before any step


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch process groups exist on torch only"
)
def test_torch_process_group_refuses_tensors_and_row_penalties(monkeypatch):
    import torch
    import torch.distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model = two_tower.TwoTowerRetrieval.from_ids(10, 20, 4, sparse=True)  # l2 by default
    model.compile(optimizer="adagrad")
    tensors = {"query": torch.arange(8), "candidate": torch.arange(8)}
    with pytest.raises(
        ValueError, match=r"process group of 2 processes.*Received x of \['Tensor'\]"
    ):
        model.fit(tensors, verbose=0)
    x = {"query": np.arange(8), "candidate": np.arange(8)}
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    before = model.get_weights()
    # (train_on_batch: fit's array path would first share rank 0's seed, a collective.)
    with pytest.raises(ValueError, match=r"SparseEmbedding 'embedding' has an embeddings_reg"):
        model.train_on_batch(x)
    for weights, kept in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(weights, kept)


class _Counter(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_test_batch_end(self, batch, logs=None):
        self.batches += 1


@pytest.mark.parametrize("how", ["keyword", "positional"])
def test_backend_loop_callbacks_run_beside_the_users(monkeypatch, how):
    from two_tower.backends import backend_module

    added = _Counter()
    monkeypatch.setattr(backend_module(), "loop_callbacks", lambda: [added])
    model = two_tower.TwoTowerRetrieval.from_ids(8, 8, 4, loss="softmax")
    model.compile(optimizer="sgd")
    x = {"query": np.arange(64) % 8, "candidate": np.arange(64) % 8}
    own = _Counter()
    if how == "keyword":
        model.fit(x, batch_size=16, epochs=1, verbose=0, callbacks=[own])
        model.evaluate(x, batch_size=16, verbose=0, callbacks=[own])
    else:  # fit(x, y, batch_size, epochs, verbose, callbacks), evaluate(..., callbacks)
        model.fit(x, None, 16, 1, 0, [own])
        model.evaluate(x, None, 16, 0, None, None, [own])
    assert own.batches == 8  # 4 training batches, then 4 evaluation ones
    assert added.batches == 8


def test_backend_loop_callbacks_join_fits_validation_once(monkeypatch):
    # fit hands evaluate its own CallbackList each epoch; the backend's callbacks,
    # already in it, are not added again (they were, once per epoch).
    from two_tower.backends import backend_module

    made: list[_Counter] = []

    class Added(_Counter):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    Added.__module__ = "two_tower.backends.a_backend"
    monkeypatch.setattr(backend_module(), "loop_callbacks", lambda: [Added()])
    model = two_tower.TwoTowerRetrieval.from_ids(8, 8, 4, loss="softmax")
    model.compile(optimizer="sgd")
    x = {"query": np.arange(64) % 8, "candidate": np.arange(64) % 8}
    model.fit(x, batch_size=16, epochs=3, verbose=0, validation_data=(x,))
    assert len(made) == 4  # fit's, then one per validation
    assert [added.batches for added in made] == [3 * (4 + 4), 0, 0, 0]


def test_backend_loop_callbacks_join_a_callback_list(monkeypatch):
    from two_tower.backends import backend_module
    from two_tower.models import _input_checks

    added, own = _Counter(), _Counter()
    monkeypatch.setattr(backend_module(), "loop_callbacks", lambda: [added])
    given = keras.callbacks.CallbackList([own])
    _, kwargs = _input_checks.for_backend("fit", (), {"callbacks": given}, backend_module())
    assert kwargs["callbacks"] is given and given.callbacks == [own, added]
