"""FaissIndex (the ANN export) against exact NumPy search."""

import numpy as np
import pytest

import two_tower
from two_tower.evaluation import recall_against_exact


def numpy_top_k_ids(queries, candidates, k):
    scores = queries.astype("float64") @ candidates.astype("float64").T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def clustered(n, dim=16, components=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(components, dim))
    labels = rng.integers(0, components, n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, dim))).astype("float32")


def test_probing_every_list_is_exact():
    candidates = clustered(3000)
    queries = clustered(25, seed=1)
    ann = two_tower.FaissIndex(nlist=16, nprobe=16)
    ann.index(candidates, np.arange(3000) + 2**40)
    scores, ids = ann.search(queries, k=10)
    expected = numpy_top_k_ids(queries, candidates, 10)
    np.testing.assert_array_equal(ids, expected + 2**40)
    np.testing.assert_allclose(
        scores, np.take_along_axis(queries @ candidates.T, expected, 1), rtol=1e-4, atol=1e-4
    )


def test_few_probes_keep_high_recall_on_clustered_data():
    candidates = clustered(5000, components=50)
    queries = clustered(50, components=50, seed=0)[:50]
    ann = two_tower.FaissIndex(nlist=64, nprobe=8)
    ann.index(candidates)
    _, ids = ann.search(queries, k=20)
    recall = recall_against_exact(ids, numpy_top_k_ids(queries, candidates, 20))
    assert recall >= 0.9


def test_export_from_a_model_and_save_load(tmp_path):
    import keras

    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(10, 8), keras.layers.Embedding(500, 8)
    )
    model.index_candidates(np.arange(500), np.array([f"item{i}" for i in range(500)]))
    ann = two_tower.FaissIndex.from_index(model.candidate_index, nlist=8, nprobe=8)
    queries = model.embed_queries(np.arange(10))  # a backend tensor (with grad on torch)
    _, ids = ann.search(queries, k=5)
    exact = model.recommend(np.arange(10), k=5)
    assert recall_against_exact(ids, exact) == 1.0
    ann.save(tmp_path / "ann")
    restored = two_tower.FaissIndex.load(tmp_path / "ann", nprobe=8)
    np.testing.assert_array_equal(restored.search(queries, k=5)[1], ids)
    assert ids.dtype.kind == "U"


def test_recall_against_exact():
    assert recall_against_exact([[1, 2, 3], [4, 5, 6]], [[3, 2, 1], [4, 0, 9]]) == pytest.approx(
        (3 + 1) / 6
    )
    with pytest.raises(ValueError, match=r"\[queries, k\]"):
        recall_against_exact([[1, 2]], [[1, 2, 3]])


def test_bad_input_raises(tmp_path):
    ann = two_tower.FaissIndex(nlist=4)
    with pytest.raises(ValueError, match="empty"):
        ann.search(np.ones((1, 3), "float32"), k=1)
    with pytest.raises(ValueError, match="empty catalogue"):
        ann.index(np.zeros((0, 3), "float32"))
    with pytest.raises(ValueError, match=r"unique.*\[1\]"):
        ann.index(np.ones((4, 3), "float32"), [1, 1, 2, 3])
    with pytest.raises(ValueError, match=r"`nlist` \(=4\) must not exceed the candidates \(=3\)"):
        ann.index(np.ones((3, 3), "float32"))
    ann.index(clustered(200, dim=3))
    with pytest.raises(ValueError, match=r"k=201"):
        ann.search(np.ones((1, 3), "float32"), k=201)
    with pytest.raises(ValueError, match=r"\[queries, 3\].*\(1, 4\)"):
        ann.search(np.ones((1, 4), "float32"), k=1)
    with pytest.raises(ValueError, match="NaN"):
        ann.search(np.full((1, 3), np.nan, "float32"), k=1)
    with pytest.raises(ValueError, match="nprobe"):
        two_tower.FaissIndex(nprobe=0)
    with pytest.raises(FileNotFoundError, match="not a saved FaissIndex"):
        two_tower.FaissIndex.load(tmp_path / "nothing")
    assert two_tower.FaissIndex(nlist=3, nprobe=2).get_config() == {
        "nlist": 3,
        "nprobe": 2,
        "train_size": None,
        "seed": 0,
    }
