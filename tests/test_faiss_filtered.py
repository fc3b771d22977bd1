"""`FaissIndex` filtered search: only allowed candidates, recall against exact >= 0.95.

Expected results come from NumPy: the exact top k among the allowed candidates
of a clustered catalogue (the kind IVF is built for), with filters that ignore
the clusters and filters that follow them.
"""

import numpy as np
import pytest

import two_tower
from testing import save_and_load

faiss = pytest.importorskip("faiss")

N, DIM, K, CLUSTERS = 20_000, 16, 10, 100


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLUSTERS, DIM)).astype("float32")
    cluster = rng.integers(0, CLUSTERS, N)
    embeddings = (centres[cluster] + 0.3 * rng.normal(size=(N, DIM))).astype("float32")
    attributes = {
        "shelf": rng.integers(0, 100, N),  # independent of the clusters
        "genre": cluster % 10,  # follows them: a genre lives in 10 of 100 clusters
        "new": rng.random(N) < 0.5,
        "label": np.array(["a", "b", "c", "d"])[rng.integers(0, 4, N)],
    }
    ids = np.arange(N) * 7 + 3
    ann = two_tower.FaissIndex()  # the defaults
    ann.index(embeddings, ids, attributes=attributes)
    queries = (centres[rng.integers(0, CLUSTERS, 200)] + 0.3 * rng.normal(size=(200, DIM))).astype(
        "float32"
    )
    return ann, embeddings, ids, attributes, queries


def exact(queries, embeddings, ids, k, allowed):
    """NumPy: per query, the top-k ids among `allowed[q]` ([N] bools), ties lower first."""
    scores = queries @ embeddings.T
    found = []
    for row in range(len(queries)):
        positions = np.flatnonzero(allowed[row])
        order = positions[np.lexsort((positions, -scores[row, positions]))][:k]
        found.append(list(ids[order]) + [-1] * (k - len(order)))
    return np.array(found)


def recall(found, expected):
    hits = [len(set(f[f != -1]) & set(e[e != -1])) for f, e in zip(found, expected, strict=True)]
    return sum(hits) / max(1, int(np.sum(expected != -1)))


def only_allowed(found, ids, allowed):
    positions = {int(i): p for p, i in enumerate(ids)}
    for row, results in enumerate(found):
        for value in results[results != -1]:
            assert allowed[row][positions[int(value)]], (row, value)


@pytest.mark.parametrize(
    "where, share",
    [
        ({"shelf": 7}, "1% across clusters"),
        ({"shelf": list(range(10))}, "10% across clusters"),
        ({"genre": 3}, "10% in a tenth of the clusters"),
        # Past sqrt(64 k N) allowed, faiss searches with a selector: these follow the
        # clusters (one nprobe for every query found 0.87 of the first).
        ({"genre": [3, 4]}, "20% in a fifth of the clusters"),
        ({"genre": [3, 4, 5, 6, 7]}, "50% in half of the clusters"),
        ({"new": True, "label": ["a", "b"]}, "25%"),
        ({"shelf": {"min": 0, "max": 59}}, "60%"),
    ],
)
def test_where_recall_against_exact(data, where, share):
    ann, embeddings, ids, attributes, queries = data
    mask = np.ones(N, bool)
    for name, condition in where.items():
        values = attributes[name]
        if isinstance(condition, dict):
            mask &= (values >= condition["min"]) & (values <= condition["max"])
        else:
            mask &= np.isin(values, condition if isinstance(condition, list) else [condition])
    allowed = np.broadcast_to(mask, (len(queries), N))
    found, scores = ann.search(queries, k=K, where=where)
    only_allowed(found, ids, allowed)
    assert np.all(found != -1)  # every query has more than k allowed
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert recall(found, exact(queries, embeddings, ids, K, allowed)) >= 0.95, share


def test_allow_lists_short_and_long_with_exclusions(data):
    """Short lists are scored exactly (equal to NumPy); long ones go through faiss
    with an ID selector; unrestricted queries beside them."""
    ann, embeddings, ids, _, queries = data
    rng = np.random.default_rng(5)
    q = queries[:12]
    allow, exclude = [], []
    allowed = np.zeros((len(q), N), bool)
    for row in range(len(q)):
        size = [30, 5_000, None][row % 3]
        if size is None:
            allow.append(None)
            allowed[row] = True
        else:
            picked = rng.choice(N, size, replace=False)
            allow.append(ids[picked])
            allowed[row, picked] = True
        dropped = rng.choice(np.flatnonzero(allowed[row]), 3, replace=False)
        exclude.append(ids[dropped])
        allowed[row, dropped] = False
    found, _ = ann.search(q, k=K, allow=allow, exclude=exclude)
    only_allowed(found, ids, allowed)
    expected = exact(q, embeddings, ids, K, allowed)
    np.testing.assert_array_equal(found[0::3], expected[0::3])  # the exact path
    assert recall(found, expected) >= 0.95


def test_too_few_allowed_pads_and_nothing_allowed_is_all_padding(data):
    ann, embeddings, ids, attributes, queries = data
    allow = [ids[:4], ids[:0], None]
    found, scores = ann.search(
        queries[:3], k=K, allow=allow, where={"new": True}, exclude=[ids[:1], None, None]
    )
    kept = [p for p in range(1, 4) if attributes["new"][p]]
    expected = exact(queries[:1], embeddings, ids, K, [np.isin(np.arange(N), kept)])
    np.testing.assert_array_equal(found[0], expected[0])
    assert np.all(np.isneginf(scores[0, len(kept) :]))
    assert np.all(found[1] == -1) and np.all(np.isneginf(scores[1]))
    assert np.all(found[2] != -1) and np.all(attributes["new"][(found[2] - 3) // 7])
    # Without filters, exclusions leaving fewer than k still raise.
    with pytest.raises(ValueError, match="fewer than k"):
        ann.search(queries[:1], k=N, exclude=[ids[:1]])


def test_attributes_survive_save_load_and_from_index(data, tmp_path):
    ann, embeddings, ids, attributes, queries = data
    where = {"genre": [1, 2], "label": "c"}
    expected = ann.search(queries[:20], k=K, where=where)
    ann.save(tmp_path / "ann")
    loaded = two_tower.FaissIndex.load(tmp_path / "ann")
    assert sorted(loaded.attributes()) == sorted(attributes)
    for name, values in attributes.items():
        np.testing.assert_array_equal(loaded.attributes()[name], values)
    for got, wanted in zip(loaded.search(queries[:20], k=K, where=where), expected, strict=True):
        np.testing.assert_array_equal(got, wanted)
    exact_index = two_tower.BruteForceIndex()
    exact_index.index(embeddings, ids, attributes=attributes)
    exported = two_tower.FaissIndex.from_index(exact_index)
    np.testing.assert_array_equal(exported.attributes()["label"], attributes["label"])


def test_a_damaged_attributes_file_is_named(data, tmp_path):
    ann = data[0]
    ann.save(tmp_path / "ann")
    (attributes_file,) = (tmp_path / "ann").glob("candidate_attributes-*.npz")
    attributes_file.write_bytes(attributes_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=attributes_file.name):
        two_tower.FaissIndex.load(tmp_path / "ann")


def test_a_model_with_a_faiss_index_filters_and_saves(tmp_path):
    rng = np.random.default_rng(2)
    model = two_tower.TwoTowerRetrieval.from_ids(
        30, 400, embedding_dim=8, candidate_index=two_tower.FaissIndex(nlist=8)
    )
    model(
        {"query": np.arange(4), "candidate": np.arange(4)}
    )  # builds the towers (no training needed here)
    colour = rng.integers(0, 4, 400)
    model.index_candidates(np.arange(400), attributes={"colour": colour})
    found = model.recommend(np.arange(5), k=6, where={"colour": 2})
    assert np.all(colour[found] == 2)
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(loaded.recommend(np.arange(5), k=6, where={"colour": 2}), found)
    similar = model.similar_items(np.array([1, 2]), k=4, allow=[[5, 6, 7, 8, 9], None])
    assert set(similar[0]) <= {5, 6, 7, 8, 9}


def test_bad_filters_raise_as_for_the_exact_index(data):
    ann, _, ids, _, queries = data
    for kwargs, match in [
        ({"where": {"colour": 1}}, "colour"),
        ({"where": {"shelf": {"low": 1}}}, "min"),
        ({"allow": [ids[:3]]}, "one entry per query"),
        ({"allow": [[10**12], None]}, "not in the indexed catalogue"),
    ]:
        with pytest.raises(ValueError, match=match):
            ann.search(queries[:2], k=3, **kwargs)
    bare = two_tower.FaissIndex(nlist=4)
    bare.index(np.eye(8, dtype="float32").repeat(40, axis=0), np.arange(320))
    with pytest.raises(ValueError, match="none were indexed"):
        bare.search(np.ones((1, 8), "float32"), k=2, where={"shelf": 1})  # none indexed


def test_the_exact_path_breaks_ties_by_position():
    """A short allow-list and a selective `where` are scored exactly: equal to NumPy
    on a grid catalogue with repeated rows (many equal scores)."""
    rng = np.random.default_rng(8)
    embeddings = (rng.integers(-4, 5, (2_000, 8)) / 4).astype("float32")
    embeddings[1::5] = embeddings[0]
    kind = rng.integers(0, 50, 2_000)
    ann = two_tower.FaissIndex(nlist=20)
    ann.index(embeddings, np.arange(2_000), attributes={"kind": kind})
    queries = (rng.integers(-4, 5, (9, 8)) / 4).astype("float32")
    queries[0] = embeddings[0]
    allow = [rng.choice(2_000, 300, replace=False) for _ in range(9)]
    allowed = np.zeros((9, 2_000), bool)
    for row, picked in enumerate(allow):
        allowed[row, picked] = True
    found, _ = ann.search(queries, k=K, allow=allow)
    np.testing.assert_array_equal(found, exact(queries, embeddings, np.arange(2_000), K, allowed))
    found, _ = ann.search(queries, k=K, where={"kind": [3, 4]})
    mask = np.broadcast_to(np.isin(kind, [3, 4]), (9, 2_000))
    np.testing.assert_array_equal(found, exact(queries, embeddings, np.arange(2_000), K, mask))
