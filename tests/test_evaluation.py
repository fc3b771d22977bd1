import numpy as np
import pytest

import two_tower
from test_factorized_top_k import numpy_metrics
from two_tower import evaluation


def test_evaluate_retrieval_matches_numpy():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(6, 4)).astype("float32")
    catalogue = rng.normal(size=(25, 4)).astype("float32")
    test_q, test_c = rng.integers(0, 6, 50), rng.integers(0, 25, 50)
    seen_q, seen_c = rng.integers(0, 6, 40), rng.integers(0, 25, 40)
    results = evaluation.evaluate_retrieval(
        queries,
        catalogue,
        test_q,
        test_c,
        exclude_query_ids=seen_q,
        exclude_candidate_ids=seen_c,
        ks=(1, 3, 10),
        batch_size=7,
    )
    excluded = np.zeros((6, 25), bool)
    excluded[seen_q, seen_c] = True
    for name, table in (("all", None), ("unseen", excluded)):
        expected = numpy_metrics(queries[test_q], catalogue, test_c, test_q, table, ks=(1, 3, 10))
        assert sorted(results[name]) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(results[name][key], value, atol=1e-6, err_msg=key)


def test_bad_ids_raise():
    with pytest.raises(ValueError, match=r"test_candidate_ids.*\[0, 2\)"):
        evaluation.evaluate_retrieval(np.eye(2), np.eye(2), [0], [2])
    with pytest.raises(ValueError, match="same length"):
        evaluation.evaluate_retrieval(np.eye(2), np.eye(2), [0, 1], [0])


def test_format_table():
    table = evaluation.format_table(
        {"a": {"recall_at_10": 0.25, "recall_at_50": 0.5}, "b": {"recall_at_10": 0.125}},
        ks=(10, 50),
        stat="recall",
    )
    assert table.splitlines() == [
        "| model | recall@10 | recall@50 |",
        "|---|---|---|",
        "| a | 0.250 | 0.500 |",
        "| b | 0.125 | n/a |",
    ]
    with pytest.raises(ValueError, match="stat"):
        evaluation.format_table({}, stat="mrr")


def test_plot_recall_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional [plot] extra")
    path = evaluation.plot_recall(
        {"m": {"recall_at_1": 0.1, "recall_at_10": 0.4, "recall_at_100": 0.9}},
        tmp_path / "recall.png",
        ks=(1, 10, 100),
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert two_tower.evaluation is evaluation
