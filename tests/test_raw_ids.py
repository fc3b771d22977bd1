"""Raw ids end to end: a model that carries its vocabularies, on every backend.

References are the same model without vocabularies, fed `Vocabulary` indices,
and NumPy rankings of its embeddings.
"""

import json

import keras
import numpy as np
import pytest

import two_tower
from testing import numpy_ranking, save_and_load

USERS = np.array([f"user-{i}" for i in range(12)])
ITEMS = np.array([f"item-{i}" for i in range(30)])


def raw_pairs(rows=240, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "query": USERS[rng.integers(0, 12, rows)],
        "candidate": ITEMS[rng.integers(0, 30, rows)],
    }


def vocabularies():
    users = two_tower.Vocabulary(num_oov_buckets=2)
    users.adapt(USERS)
    items = two_tower.Vocabulary()
    items.adapt(ITEMS)
    return users, items


def trained(with_vocabularies, seed=1, **fit):
    """The same model trained on raw ids (carrying vocabularies) or on their indices."""
    users, items = vocabularies()
    keras.utils.set_random_seed(seed)
    model = two_tower.TwoTowerRetrieval.from_ids(
        users.size,
        items.size,
        8,
        query_vocabulary=users if with_vocabularies else None,
        candidate_vocabulary=items if with_vocabularies else None,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    x = raw_pairs()
    if not with_vocabularies:
        x = {"query": users(x["query"]), "candidate": items(x["candidate"])}
    history = model.fit(x, batch_size=40, epochs=2, verbose=0, shuffle=False, **fit)
    return model, users, items, history


@pytest.fixture(scope="module")
def pair():
    raw, users, items, _ = trained(True)
    indexed, _, _, _ = trained(False)
    raw.index_candidates()
    indexed.index_candidates(np.arange(1, items.size), candidate_ids=items.vocabulary)
    return raw, indexed, users, items


def tables(model):
    # IdEmbeddingTower outputs (query bias column 1, candidate learned bias).
    queries = model.embed_queries(np.arange(model.query_tower.vocabulary_size))
    candidates = model.embed_candidates(np.arange(model.candidate_tower.vocabulary_size))
    return keras.ops.convert_to_numpy(queries), keras.ops.convert_to_numpy(candidates)


def test_fit_on_raw_ids_trains_exactly_like_fit_on_their_indices(pair):
    raw, indexed, _, _ = pair
    for expected, actual in zip(indexed.get_weights(), raw.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_recommend_takes_and_returns_raw_ids(pair):
    raw, indexed, users, items = pair
    requests = np.array(["user-3", "user-7", "user-0"])
    exclude = [["item-4", "item-9"], None, ITEMS[:5]]
    found = raw.recommend(requests, k=6, exclude=exclude)
    assert found.dtype.kind == "U" and found.shape == (3, 6)
    # The same as the index model, whose ids are the vocabulary's values...
    expected = indexed.recommend(users(requests), k=6, exclude=exclude)
    np.testing.assert_array_equal(found, expected)
    # ...and as NumPy's ranking of the embeddings, known items only.
    queries, candidates = tables(raw)
    excluded = [items(np.asarray(e)) - 1 if e is not None else [] for e in exclude]
    positions = numpy_ranking(queries[users(requests)], candidates[1:], 6, excluded)
    np.testing.assert_array_equal(found, items.vocabulary[positions])
    # Lists work too, and the indexed ids are the raw ones, OOV rows left out.
    np.testing.assert_array_equal(raw.recommend(["user-3"], k=6, exclude=exclude[:1]), found[:1])
    assert raw.candidate_index.candidate_ids.tolist() == items.vocabulary.tolist()


def test_an_unknown_query_gets_its_oov_bucket(pair):
    """The documented rule: an unknown query value is looked up like in `Vocabulary`."""
    raw, _, users, items = pair
    unknown = np.array(["never-seen", "also-new"])
    buckets = users(unknown)
    assert set(buckets.tolist()) <= {0, 1}
    queries, candidates = tables(raw)
    positions = numpy_ranking(queries[buckets], candidates[1:], 5, [[], []])
    np.testing.assert_array_equal(raw.recommend(unknown, k=5), items.vocabulary[positions])


def test_similar_items_takes_and_returns_raw_ids(pair):
    raw, _, _, items = pair
    found = raw.similar_items(["item-2", "item-11"], k=4)
    _, candidates = tables(raw)
    rows = items(np.array(["item-2", "item-11"]))
    positions = numpy_ranking(candidates[rows], candidates[1:], 4, [[r - 1] for r in rows])
    np.testing.assert_array_equal(found, items.vocabulary[positions])
    assert "item-2" not in found[0] and "item-11" not in found[1]


def test_unknown_candidate_ids_raise_for_an_id_tower(pair):
    raw, _, _, _ = pair
    with pytest.raises(ValueError, match=r"1 id\(s\) that the candidate vocabulary does not know"):
        raw.similar_items(["item-2", "no-such-item"], k=3)
    model, _, _, _ = trained(True, seed=2)
    with pytest.raises(ValueError, match=r"does not know, e.g. \['nope'\]"):
        model.index_candidates(np.array(["item-1", "nope"]))
    model.index_candidates(np.array(["item-1", "item-5", "item-8"]))  # raw ids by default
    assert model.candidate_index.candidate_ids.tolist() == ["item-1", "item-5", "item-8"]


def test_vocabularies_are_saved_with_the_model(pair, tmp_path):
    raw, _, _, items = pair
    restored = save_and_load(raw, tmp_path)
    requests = np.array(["user-5", "never-seen"])
    np.testing.assert_array_equal(
        restored.recommend(requests, k=7, exclude=[["item-3"], None]),
        raw.recommend(requests, k=7, exclude=[["item-3"], None]),
    )
    assert restored.query_vocabulary.get_config() == raw.query_vocabulary.get_config()
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(raw)))["config"]
    assert config["candidate_vocabulary"]["config"]["vocabulary"] == items.vocabulary.tolist()


def test_integer_raw_ids_in_validation_data_are_encoded_once():
    """Keras' fit evaluates validation data through `evaluate`: ids must not be encoded twice
    (integer raw ids would silently become other indices, or OOV)."""
    users = two_tower.Vocabulary([1000 + i for i in range(10)])
    items = two_tower.Vocabulary([5000 + i for i in range(20)])
    rng = np.random.default_rng(0)
    x = {"query": 1000 + rng.integers(0, 10, 100), "candidate": 5000 + rng.integers(0, 20, 100)}
    keras.utils.set_random_seed(0)
    model = two_tower.TwoTowerRetrieval.from_ids(
        embedding_dim=4, query_vocabulary=users, candidate_vocabulary=items
    )
    model.compile(optimizer="adam")
    history = model.fit(x, batch_size=50, epochs=1, verbose=0, validation_data=(x,))
    evaluated = model.evaluate(x, batch_size=50, verbose=0, return_dict=True)
    np.testing.assert_allclose(history.history["val_loss"][-1], evaluated["loss"], rtol=1e-6)
    encoded = {"query": users(x["query"]), "candidate": items(x["candidate"])}
    assert encoded["query"].min() >= 1  # all known: no OOV row in the reference
    reference = model.compute_loss(x=encoded, y_pred=model(encoded, training=False), training=False)
    np.testing.assert_allclose(evaluated["loss"], keras.ops.convert_to_numpy(reference), rtol=1e-5)


def feature_model(**kwargs):
    movies = two_tower.Vocabulary(["m-a", "m-b", "m-c", "m-d"])
    genres = two_tower.Vocabulary(["drama", "comedy", "horror"], padding="")
    users = two_tower.Vocabulary(["u1", "u2", "u3"])
    tower = two_tower.FeatureTower(
        categorical={"movie": movies.size + 2}, multivalued={"genres": genres.size}, output_dim=4
    )
    return two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(users.size, 4),
        tower,
        loss="full_softmax",
        catalogue_size=movies.size + 2,
        candidate_id_key="movie",
        query_vocabulary=users,
        candidate_vocabulary={"movie": movies, "genres": genres},
        **kwargs,
    )


def test_set_catalogue_places_raw_rows_at_their_indices():
    model = feature_model()
    # Rows in any order, one known movie (m-b) without a row.
    model.set_catalogue(
        {
            "movie": np.array(["m-d", "m-a", "m-c"]),
            "genres": np.array([["horror", ""], ["drama", "comedy"], ["", ""]]),
        }
    )
    catalogue = {n: keras.ops.convert_to_numpy(v) for n, v in model._catalogue.variables.items()}
    # Indices: OOV 0, m-a 1, m-b 2, m-c 3, m-d 4, then rows 5 and 6 up to catalogue_size.
    np.testing.assert_array_equal(catalogue["movie"], np.arange(7))
    expected_genres = np.full((7, 2), -1)
    expected_genres[4] = [3, -1]
    expected_genres[1] = [1, 2]
    np.testing.assert_array_equal(catalogue["genres"], expected_genres)
    model.compile(optimizer="adam")
    x = {
        "query": np.array(["u1", "u2", "u3", "u1"]),
        "candidate": {
            "movie": np.array(["m-a", "m-d", "m-c", "m-b"]),
            "genres": np.array([["drama", "comedy"], ["horror", ""], ["", ""], ["", ""]]),
        },
    }
    model.fit(x, batch_size=2, epochs=1, verbose=0)
    model.index_candidates()  # every known movie, by raw id: rows 1..4
    assert model.candidate_index.candidate_ids.tolist() == ["m-a", "m-b", "m-c", "m-d"]
    items = {"movie": np.array(["m-a"]), "genres": np.array([["drama", ""]])}
    found = model.similar_items(items, k=3)
    assert found.shape == (1, 3) and "m-a" not in found[0]  # its raw id is left out
    # Ids alone take their catalogue rows (raw ids through the id vocabulary).
    by_id = model.similar_items(["m-a", "m-d"], k=3, return_scores=True)
    rows = {
        "movie": np.array(["m-a", "m-d"]),
        "genres": np.array([["drama", "comedy"], ["horror", ""]]),
    }
    by_features = model.similar_items(rows, item_ids=["m-a", "m-d"], k=3, return_scores=True)
    np.testing.assert_array_equal(by_id[0], by_features[0])
    np.testing.assert_allclose(by_id[1], by_features[1], rtol=1e-6)
    with pytest.raises(ValueError, match=r"`items` holds 1 id\(s\) .* e.g. \['m-z'\]"):
        model.similar_items(["m-z"], k=3)
    model.index_candidates(["m-c", "m-a"])  # ids alone: their catalogue rows
    assert model.candidate_index.candidate_ids.tolist() == ["m-c", "m-a"]
    np.testing.assert_allclose(
        model.candidate_index.embeddings(),
        keras.ops.convert_to_numpy(
            model.embed_candidates({"movie": np.array([3, 1]), "genres": expected_genres[[3, 1]]})
        ),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match=r"Repeated: \['m-a'\]"):
        model.set_catalogue({"movie": np.array(["m-a", "m-a"]), "genres": np.zeros((2, 1), "U1")})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: two_tower.TwoTowerRetrieval.from_ids(
                3, 5, query_vocabulary=two_tower.Vocabulary()
            ),
            r"`query_vocabulary` has no values yet: call its `adapt\(data\)`",
        ),
        (
            lambda: two_tower.TwoTowerRetrieval.from_ids(
                3, 5, candidate_vocabulary=two_tower.Vocabulary(list("abcdef"))
            ),
            r"maps to 7 indices .* more than the candidate tower's vocabulary_size \(=5\)",
        ),
        (
            lambda: two_tower.TwoTowerRetrieval.from_ids(3, 5, query_vocabulary=["a", "b"]),
            "`query_vocabulary` must be a two_tower.Vocabulary",
        ),
        (lambda: two_tower.TwoTowerRetrieval.from_ids(3), "from_ids needs `num_candidates`"),
    ],
)
def test_bad_vocabularies_raise_when_the_model_is_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_raw_inputs_of_the_wrong_shape_or_kind_raise_naming_the_argument(pair):
    raw, _, _, _ = pair
    with pytest.raises(ValueError, match=r"`queries` of dtype int64 cannot be looked up"):
        raw.recommend(np.array([3, 4]), k=2)
    with pytest.raises(ValueError, match=r"`queries` is a dict of features \['user'\]"):
        raw.recommend({"user": np.array(["user-1"])}, k=2)
    model = feature_model()
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['genres'\]"):
        model.encode_candidates({"movie": np.array(["m-a"])})
    ragged = {"movie": ["m-a", "m-b"], "genres": [["drama"], ["comedy", "horror"]]}
    encoded = model.encode_candidates(ragged)  # padded with the vocabulary's padding: -1
    np.testing.assert_array_equal(encoded["genres"], [[1, -1], [2, 3]])
    users = two_tower.Vocabulary(["u1"])
    with pytest.raises(
        ValueError, match=r"`x\['query'\]` has rows of different lengths \(1 to 2\)"
    ):
        users.lookup([["u1"], ["u1", "u1"]], "x['query']")
