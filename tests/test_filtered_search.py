"""Filtered search (`allow`, `where`): the exact top k among the allowed candidates.

Expected results come from a NumPy reference: scores of every candidate, the
allowed ones ranked by (score, position), padding where fewer than k remain.
The catalogue is on a 1/8 grid with repeated rows, so scores are exact and tie
on every backend.
"""

import keras
import numpy as np
import pytest

import two_tower
from testing import save_and_load
from two_tower.retrieval import brute_force_index

N, DIM, K = 300, 4, 10


def catalogue(seed=0):
    rng = np.random.default_rng(seed)
    embeddings = (rng.integers(-8, 9, (N, DIM)) / 8).astype("float32")
    embeddings[1::7] = embeddings[0]  # ties
    attributes = {
        "category": rng.integers(0, 5, N),
        "in_stock": rng.random(N) < 0.7,
        "price": np.round(rng.random(N) * 100, 1),
        "region": rng.choice(["eu", "us", "asia"], N),
    }
    return embeddings, attributes


def reference(queries, embeddings, ids, k, allowed):
    """`allowed[q]`: the [N] bools of what query q may return."""
    scores = queries @ embeddings.T
    found, found_scores = [], []
    for row in range(len(queries)):
        positions = np.flatnonzero(allowed[row])
        order = positions[np.lexsort((positions, -scores[row, positions]))][:k]
        pad = k - len(order)
        padding = "" if ids.dtype.kind == "U" else -1
        found.append(list(ids[order]) + [padding] * pad)
        found_scores.append(list(scores[row, order]) + [-np.inf] * pad)
    return np.array(found, dtype=ids.dtype), np.array(found_scores, "float32")


def queries(count=37, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.integers(-8, 9, (count, DIM)) / 8).astype("float32")


@pytest.fixture(params=["compacted", "masked"], autouse=True)
def path(request, monkeypatch):
    """Each test on both paths: a selective filter searches a copy of the allowed rows
    only (forced here for every filter), any other masks scores in place."""
    fraction = 1 if request.param == "compacted" else 10**9
    monkeypatch.setattr(brute_force_index, "_COMPACT_FRACTION", fraction)
    return request.param


@pytest.fixture(scope="module")
def index():
    embeddings, attributes = catalogue()
    # Small chunks and query batches: filters cross chunk and batch boundaries.
    found = two_tower.BruteForceIndex(chunk_size=64, query_batch_size=8)
    found.index(embeddings, np.arange(N) * 3 + 7, attributes=attributes)
    return found, embeddings, attributes


def test_where_equals_numpy(index):
    found, embeddings, attributes = index
    ids = found.candidate_ids
    q = queries()
    where = {"category": [1, 3], "in_stock": True, "price": {"min": 10.0, "max": 80.0}}
    mask = (
        np.isin(attributes["category"], [1, 3])
        & attributes["in_stock"]
        & (attributes["price"] >= 10.0)
        & (attributes["price"] <= 80.0)
    )
    expected = reference(q, embeddings, ids, K, np.tile(mask, (len(q), 1)))
    got = found.search(q, k=K, where=where)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # Strings, and a one-sided range.
    got = found.search(q, k=K, where={"region": "eu", "price": {"max": 30.0}})
    mask = (attributes["region"] == "eu") & (attributes["price"] <= 30.0)
    np.testing.assert_array_equal(
        got[0], reference(q, embeddings, ids, K, np.tile(mask, (len(q), 1)))[0]
    )


def test_allow_where_and_exclude_together(index):
    found, embeddings, attributes = index
    ids = found.candidate_ids
    q = queries()
    rng = np.random.default_rng(5)
    allow, exclude = [], []
    allowed = np.zeros((len(q), N), dtype=bool)
    for row in range(len(q)):
        if row % 4 == 3:  # no allow-list: everything meeting `where`
            allow.append(None)
            allowed[row] = True
        else:
            picked = rng.choice(N, size=rng.integers(0, 40), replace=False)
            allow.append(list(ids[picked]))
            allowed[row, picked] = True
        dropped = rng.choice(N, size=rng.integers(0, 60), replace=False)
        exclude.append(list(ids[dropped]))
        allowed[row, dropped] = False
    allowed &= attributes["in_stock"][None, :]
    expected_ids, expected_scores = reference(q, embeddings, ids, K, allowed)
    got_ids, got_scores = found.search(
        q, k=K, allow=allow, exclude=exclude, where={"in_stock": True}
    )
    np.testing.assert_array_equal(got_ids, expected_ids)
    np.testing.assert_array_equal(got_scores, expected_scores)
    assert np.isneginf(expected_scores).any()  # some rows had fewer than k: padded
    assert (expected_ids == -1).any()


def test_every_query_with_an_allow_list(index):
    """The union of the allow-lists is all that is searched (compacted)."""
    found, embeddings, attributes = index
    ids = found.candidate_ids
    q = queries(20)
    rng = np.random.default_rng(9)
    allow, exclude = [], []
    allowed = np.zeros((len(q), N), dtype=bool)
    for row in range(len(q)):
        picked = rng.choice(N, size=rng.integers(0, 30), replace=False)
        allow.append(list(ids[picked]))
        allowed[row, picked] = True
        dropped = rng.choice(N, size=20, replace=False)
        exclude.append(list(ids[dropped]))
        allowed[row, dropped] = False
    allowed &= (attributes["category"] != 0)[None, :]
    expected = reference(q, embeddings, ids, K, allowed)
    got = found.search(q, k=K, allow=allow, exclude=exclude, where={"category": [1, 2, 3, 4]})
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # Nothing allowed anywhere: all padding.
    got_ids, got_scores = found.search(q[:2], k=3, allow=[[], []])
    assert got_ids.tolist() == [[-1] * 3] * 2 and np.isneginf(got_scores).all()


def test_allow_alone_with_string_ids_and_an_empty_list():
    embeddings, _ = catalogue()
    ids = np.array([f"item-{i}" for i in range(N)])
    found = two_tower.BruteForceIndex(chunk_size=128)
    found.index(embeddings, ids)
    q = queries(3)
    allow = [["item-5", "item-200", "item-17"], [], None]
    allowed = np.zeros((3, N), dtype=bool)
    allowed[0, [5, 200, 17]] = True
    allowed[2] = True
    expected_ids, expected_scores = reference(q, embeddings, ids, 4, allowed)
    got_ids, got_scores = found.search(q, k=4, allow=allow)
    np.testing.assert_array_equal(got_ids, expected_ids)
    np.testing.assert_array_equal(got_scores, expected_scores)
    assert got_ids[1].tolist() == ["", "", "", ""]  # nothing allowed: all padding


def test_unfiltered_search_is_unchanged_and_still_refuses_too_many_exclusions(index):
    found, embeddings, _ = index
    ids = found.candidate_ids
    q = queries(5)
    expected = reference(q, embeddings, ids, K, np.ones((5, N), dtype=bool))
    np.testing.assert_array_equal(found.search(q, k=K)[0], expected[0])
    with pytest.raises(ValueError, match="leaves fewer than k=10"):
        found.search(q[:1], k=K, exclude=[list(ids[:295])])
    # With a filter the same exclusions are padding, not an error.
    got, scores = found.search(q[:1], k=K, exclude=[list(ids[:295])], allow=[None])
    assert np.isneginf(scores[0, 5:]).all() and (got[0, 5:] == -1).all()


def test_recommend_and_similar_items_filter(tmp_path):
    embeddings, attributes = catalogue()
    model = two_tower.TwoTowerRetrieval.from_ids(20, N, embedding_dim=DIM)
    model.index_candidates(np.arange(N), attributes=attributes)
    users = np.arange(6)
    where = {"region": ["eu", "asia"], "in_stock": False}
    got = model.recommend(users, k=K, where=where, allow=[None, [1, 2, 3]] + [None] * 4)
    user_embeddings = keras.ops.convert_to_numpy(model.embed_queries(users))
    catalogue_embeddings = keras.ops.convert_to_numpy(model.embed_candidates(np.arange(N)))
    mask = np.isin(attributes["region"], ["eu", "asia"]) & ~attributes["in_stock"]
    allowed = np.tile(mask, (6, 1))
    allowed[1, [i for i in range(N) if i not in (1, 2, 3)]] = False
    expected = reference(user_embeddings, catalogue_embeddings, np.arange(N), K, allowed)[0]
    # Float32 products of learned weights: compare ids where scores are apart.
    np.testing.assert_array_equal(got, expected)
    similar = model.similar_items(np.array([4, 9]), k=5, where={"category": 2})
    assert np.all(attributes["category"][similar] == 2)
    assert 4 not in similar[0] and 9 not in similar[1]
    # Attributes are saved with the index in the .keras file.
    loaded = save_and_load(model, tmp_path)
    for name, values in attributes.items():
        np.testing.assert_array_equal(loaded.candidate_index.attributes()[name], values)
    np.testing.assert_array_equal(
        loaded.recommend(users, k=K, where=where), model.recommend(users, k=K, where=where)
    )


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ({"colour": 1}, r"attribute 'colour', which was not indexed.*\['category'"),
        ({"category": "1"}, r"`where\['category'\]` must be one of numbers"),
        ({"in_stock": 1}, r"`where\['in_stock'\]` must be one of booleans"),
        ({"region": ["eu", 3]}, r"`where\['region'\]` must list strings"),
        ({"price": {"low": 3}}, r"a range is \{'min': a, 'max': b\}"),
        ({"region": {"min": 3}}, r"a range is .*'region' holds strings"),
        ({"price": {"max": float("nan")}}, r"must be a finite number"),
        ({"category": []}, r"empty list"),
        ({}, r"non-empty dict"),
        ([("category", 1)], r"non-empty dict"),
    ],
)
def test_bad_where_raises(index, where, match):
    found = index[0]
    with pytest.raises(ValueError, match=match):
        found.search(queries(2), k=3, where=where)


def test_bad_allow_and_attributes_raise(index):
    found, embeddings, _ = index
    with pytest.raises(ValueError, match=r"`allow\[0\]` is a single id"):
        found.search(queries(2), k=3, allow=[7, 10])
    with pytest.raises(ValueError, match=r"`allow` must have one entry per query"):
        found.search(queries(2), k=3, allow=[[7]])
    with pytest.raises(ValueError, match=r"allowed id\(s\) are not in the indexed catalogue"):
        found.search(queries(1), k=3, allow=[[7, 8]])
    ids, _ = found.search(queries(1), k=3, allow=[[7, 8]], ignore_unknown_exclusions=True)
    assert ids.tolist() == [[7, -1, -1]]
    bare = two_tower.BruteForceIndex()
    bare.index(embeddings)
    with pytest.raises(ValueError, match="none were indexed"):
        bare.search(queries(1), k=3, where={"category": 1})
    for attributes, match in [
        ({"category": np.arange(N - 1)}, r"one value per candidate: shape \(300,\)"),
        ({"price": np.full(N, np.nan)}, "holds NaN"),
        ({"mixed": [1, "a"] * (N // 2)}, "a mix of"),
        ({"when": np.full(N, np.datetime64("2026-01-01"))}, "booleans, numbers or strings"),
        ({"": np.arange(N)}, "non-empty strings"),
        ([np.arange(N)], "non-empty dict"),
    ]:
        with pytest.raises(ValueError, match=match):
            bare.index(embeddings, attributes=attributes)
    assert bare.num_candidates == N and bare.attributes() == {}  # the old catalogue kept


class Unfiltered(two_tower.BruteForceIndex):
    """A user's index whose `index` and `search` take no filters."""

    def index(self, candidate_embeddings, candidate_ids=None):
        super().index(candidate_embeddings, candidate_ids)

    def search(
        self, query_embeddings, k=10, similarity_fn=None, *, exclude=None,
        ignore_unknown_exclusions=False,
    ):  # fmt: skip
        return super().search(
            query_embeddings, k, similarity_fn, exclude=exclude,
            ignore_unknown_exclusions=ignore_unknown_exclusions,
        )  # fmt: skip


def test_an_index_that_cannot_filter_is_named():
    model = two_tower.TwoTowerRetrieval.from_ids(
        20, N, embedding_dim=DIM, candidate_index=Unfiltered()
    )
    _, attributes = catalogue()
    with pytest.raises(ValueError, match=r"Unfiltered.index does not take \['attributes'\]"):
        model.index_candidates(np.arange(N), attributes=attributes)
    model.index_candidates(np.arange(N))
    with pytest.raises(ValueError, match=r"Unfiltered.search does not take \['where'\]"):
        model.recommend(np.arange(2), k=3, where={"category": 1})
    assert model.recommend(np.arange(2), k=3).shape == (2, 3)  # unfiltered: as before


def test_conditions_compare_as_the_attribute_values_do():
    """Found in review: string lists cut to the attribute's width, float32 values
    missed by list and NumPy-float conditions, integers beyond int64."""
    index = two_tower.BruteForceIndex()
    values = {
        "s": np.array(["abc", "abc", "xyz", "q"]),
        "f": np.array([0.2, 0.5, 0.2, 0.7], "float32"),
        "n": np.array([1, 2, 3, 4]),
    }
    index.index(np.eye(4, dtype="float32"), np.array([10, 20, 30, 40]), attributes=values)
    q = np.array([[0.4, 0.3, 0.2, 0.1]], "float32")

    def found(where):
        ids, _ = index.search(q, k=4, where=where)
        return sorted(i for i in ids[0].tolist() if i != -1)

    assert found({"s": ["abcd"]}) == [] and found({"s": "abcd"}) == []
    assert found({"s": ["abc", "q"]}) == [10, 20, 40]
    for condition in (
        0.2,
        [0.2],
        np.float64(0.2),
        {"max": np.float64(0.2)},
        {"min": 0.2, "max": 0.2},
    ):
        assert found({"f": condition}) == [10, 30], condition
    assert found({"n": {"max": 2**70}}) == [10, 20, 30, 40]
    assert found({"n": {"min": 2**70}}) == [] and found({"n": 2**70}) == []
    assert found({"n": {"min": 1.5, "max": 3}}) == [20, 30]
    with pytest.raises(ValueError, match="beyond the int64 range"):
        index.index(np.eye(4, dtype="float32"), attributes={"n": [1, 2, 3, 2**70]})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_indexes_filter(dtype, path):
    """Found in review: a bfloat16 index failed on the compacted path."""
    embeddings, attributes = catalogue()
    index = two_tower.BruteForceIndex(dtype=dtype)
    index.index(embeddings, attributes=attributes)
    q = queries(5)
    mask = attributes["category"] == 3
    expected = reference(q, embeddings, np.arange(N), K, np.tile(mask, (5, 1)))
    got_ids, got_scores = index.search(q, k=K, where={"category": 3})
    # The 1/8 grid is exact in both types (scores up to 4 need 5 significant bits).
    np.testing.assert_array_equal(got_ids, expected[0])
    np.testing.assert_array_equal(got_scores.astype("float32"), expected[1])


def test_filters_of_many_sizes_share_compiled_steps(path):
    """Found in review: each subset size compiled a step of its own and pushed the
    unfiltered one out of the cache. Widths are powers of two now."""
    embeddings, attributes = catalogue()
    index = two_tower.BruteForceIndex(chunk_size=256)
    index.index(embeddings, attributes={"price": attributes["price"]})
    q = queries(3)
    index.search(q, k=3)
    for high in range(5, 95, 5):  # 5 % to 90 % allowed: about 15 to 270 rows
        index.search(q, k=3, where={"price": {"max": float(high)}})
    # Private: the compiled steps, one per width (32, 64, 128, 256; the unfiltered
    # catalogue's 256 among them). Widths rounded to 32 rows made 8 or more.
    assert len(index._steps._entries) <= 4
