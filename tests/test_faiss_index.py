"""FaissIndex (the ANN export) against exact NumPy search."""

import json

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
    ids, scores = ann.search(queries, k=10)
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
    ids, _ = ann.search(queries, k=20)
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
    ids, _ = ann.search(queries, k=5)
    exact = model.recommend(np.arange(10), k=5)
    assert recall_against_exact(ids, exact) == 1.0
    ann.save(tmp_path / "ann")
    restored = two_tower.FaissIndex.load(tmp_path / "ann", nprobe=8)
    np.testing.assert_array_equal(restored.search(queries, k=5)[0], ids)
    assert ids.dtype.kind == "U"


def test_exclusions_with_string_ids_and_a_partial_probe():
    # Exclusions fetch more results from faiss and drop the excluded ones; with
    # every list probed the result is the exact top k among the rest.
    candidates = clustered(600)
    queries = clustered(6, seed=2)
    names = np.array([f"item{i}" for i in range(600)])
    ann = two_tower.FaissIndex(nlist=8, nprobe=8)
    ann.index(candidates, names)
    best = numpy_top_k_ids(queries, candidates, 20)
    exclude = [list(names[row[:15]]) for row in best[:3]] + [None, [], {names[best[5, 0]]}]
    ids, _ = ann.search(queries, k=5, exclude=exclude)
    expected = [row[15:20] for row in best[:3]] + [best[3, :5], best[4, :5], best[5, 1:6]]
    np.testing.assert_array_equal(ids, names[np.array(expected)])
    np.testing.assert_array_equal(ann.positions_of(names[[5, 0]]), [5, 0])
    with pytest.raises(ValueError, match=r"2 ids are not in the indexed catalogue"):
        ann.positions_of(["nope", "gone"])
    with pytest.raises(ValueError, match="each entry of `exclude` must be a sequence"):
        ann.search(queries, k=5, exclude=["item1"] * 6)
    with pytest.raises(ValueError, match=r"leaves fewer than k=5"):
        ann.search(queries[:1], k=5, exclude=[list(names[:596])])


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
    with pytest.raises(FileNotFoundError, match="nothing: no such folder"):
        two_tower.FaissIndex.load(tmp_path / "nothing")
    config = two_tower.FaissIndex(nlist=3, nprobe=2).get_config()
    expected = {
        "nlist": 3,
        "nprobe": 2,
        "train_size": None,
        "seed": 0,
        "target_recall": None,
        "calibration_k": 100,
        "pq_subquantizers": None,
    }
    # Plus the Keras layer's own keys (name, trainable, dtype).
    assert {key: config[key] for key in expected} == expected
    assert two_tower.FaissIndex.from_config(config).get_config() == config


def test_default_nprobe_reads_about_64_candidates_per_result():
    candidates = clustered(10_000, components=200)
    ann = two_tower.FaissIndex()
    ann.index(candidates)
    nlist = ann._catalogue.index.nlist
    assert nlist == 100  # sqrt(10,000)
    # 64 x k candidates over lists of 100: k=100 reads 64 lists, k=10 the floor of 16.
    assert ann.nprobe_for(100) == 64 and ann.nprobe_for(10) == 16
    assert ann.nprobe_for(1000) == nlist  # never more than every list
    assert two_tower.FaissIndex(nprobe=8).get_config()["nprobe"] == 8


def test_default_recall_holds_where_a_fixed_nprobe_did_not():
    # 10,000 candidates from 1,000 components (10 each), the retrieval benchmark's
    # smallest size: 16 of 100 lists found 0.64 of the top 100.
    candidates = clustered(10_000, dim=32, components=1000, seed=3)
    queries = clustered(64, dim=32, components=1000, seed=4)
    exact = numpy_top_k_ids(queries, candidates, 100)
    default = two_tower.FaissIndex()
    default.index(candidates)
    fixed = two_tower.FaissIndex(nprobe=16)
    fixed.index(candidates)
    assert recall_against_exact(default.search(queries, k=100)[0], exact) >= 0.95
    assert recall_against_exact(fixed.search(queries, k=100)[0], exact) < 0.9


@pytest.mark.parametrize("target", [0.8, 0.99])
def test_target_recall_calibrates_the_smallest_nprobe(target):
    candidates = clustered(4000, dim=16, components=400, seed=5)
    queries = clustered(100, dim=16, components=400, seed=6)
    ann = two_tower.FaissIndex(nlist=64, target_recall=target, calibration_k=20)
    ann.index(candidates, calibration_queries=queries)
    exact = numpy_top_k_ids(queries, candidates, 20)
    nprobe = ann.calibrated_nprobe
    assert ann.nprobe_for(20) == nprobe and 1 <= nprobe <= 64
    # Reported honestly: the recall of a search with that nprobe, checked in NumPy.
    measured = recall_against_exact(ann.search(queries, k=20)[0], exact)
    assert ann.calibrated_recall == pytest.approx(measured, abs=1e-9)
    assert measured >= target
    if nprobe > 1:  # and it is the smallest: one list fewer misses the target
        fewer = two_tower.FaissIndex(nlist=64, nprobe=nprobe - 1)
        fewer.index(candidates)
        assert recall_against_exact(fewer.search(queries, k=20)[0], exact) < target


def test_save_and_load_keep_the_calibrated_nprobe(tmp_path):
    candidates = clustered(4000, dim=16, components=400, seed=5)
    queries = clustered(100, dim=16, components=400, seed=6)
    ann = two_tower.FaissIndex(nlist=64, target_recall=0.8, calibration_k=20)
    ann.index(candidates, calibration_queries=queries)
    ann.save(tmp_path / "ann")
    loaded = two_tower.FaissIndex.load(tmp_path / "ann")
    assert loaded.calibrated_nprobe == ann.calibrated_nprobe is not None
    assert loaded.calibrated_recall == ann.calibrated_recall
    assert loaded.nprobe_for(20) == ann.nprobe_for(20)
    for got, expected in zip(loaded.search(queries, k=20), ann.search(queries, k=20), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert two_tower.FaissIndex.load(tmp_path / "ann", nprobe=3).nprobe_for(20) == 3

    manifest = tmp_path / "ann" / "faiss_index.json"
    edited = json.loads(manifest.read_text())
    edited["calibration"]["nprobe"] = 0
    manifest.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"damaged calibration entry \{'nprobe': 0, "):
        two_tower.FaissIndex.load(tmp_path / "ann")


def test_ivf_pq_compresses_and_reports_its_recall():
    candidates = clustered(6000, dim=16, components=60, seed=7)
    queries = clustered(50, dim=16, components=60, seed=8)
    ann = two_tower.FaissIndex(pq_subquantizers=8, target_recall=0.5, calibration_k=10)
    ann.index(candidates, calibration_queries=queries)
    assert ann._catalogue.index.code_size == 8  # 8 bytes a vector instead of 64
    measured = recall_against_exact(
        ann.search(queries, k=10)[0], numpy_top_k_ids(queries, candidates, 10)
    )
    assert ann.calibrated_recall == pytest.approx(measured, abs=1e-9)
    assert measured >= 0.5
    with pytest.raises(ValueError, match=r"`pq_subquantizers` \(=5\) must divide"):
        two_tower.FaissIndex(pq_subquantizers=5).index(candidates)
    with pytest.warns(UserWarning, match="out of reach"):
        two_tower.FaissIndex(pq_subquantizers=1, target_recall=1.0, calibration_k=10).index(
            candidates, calibration_queries=queries
        )


def test_from_index_streams_a_multi_chunk_exact_index():
    candidates = clustered(3000)
    exact = two_tower.BruteForceIndex(chunk_size=512)
    exact.index(candidates, np.arange(3000) * 7)
    assert len(exact._catalogue.host.chunks) == 6
    ann = two_tower.FaissIndex.from_index(exact, nlist=16, nprobe=16)
    queries = clustered(20, seed=9)
    np.testing.assert_array_equal(
        ann.search(queries, k=10)[0], numpy_top_k_ids(queries, candidates, 10) * 7
    )


def test_bad_calibration_arguments_raise():
    with pytest.raises(ValueError, match=r"`target_recall` must be a finite number in \(0, 1\]"):
        two_tower.FaissIndex(target_recall=1.5)
    with pytest.raises(ValueError, match="`calibration_k` must be an integer >= 1"):
        two_tower.FaissIndex(calibration_k=0)
    ann = two_tower.FaissIndex(nlist=4, target_recall=0.9)
    with pytest.raises(ValueError, match=r"`calibration_queries` must have shape \[queries, 3\]"):
        ann.index(clustered(400, dim=3), calibration_queries=np.ones((2, 4)))
