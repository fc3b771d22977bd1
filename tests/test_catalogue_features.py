"""Catalogue losses and FactorizedTopK over dict-feature candidate towers (`set_catalogue`)."""

import keras
import numpy as np
import pytest

import two_tower
from testing import assert_all_close

NUM_MOVIES = 6
DECADES = np.array([0, 1, 1, 2, 0, 2], "int32")


def towers():
    query = two_tower.FeatureTower(
        categorical={"user": 4}, combiner="sum", output_dim=None, embedding_dim=3
    )
    candidate = two_tower.FeatureTower(
        categorical={"movie": NUM_MOVIES, "decade": 3},
        combiner="sum",
        output_dim=None,
        embedding_dim=3,
    )
    return query, candidate


def catalogue():
    return {"movie": np.arange(NUM_MOVIES), "decade": DECADES}


def pairs():
    movies = np.array([3, 5, 1, 3], "int32")
    return {
        "query": {"user": np.array([0, 1, 2, 3], "int32")},
        "candidate": {"movie": movies, "decade": DECADES[movies]},
    }


def model_with(loss="full_softmax", **kwargs):
    query, candidate = towers()
    model = two_tower.TwoTowerRetrieval(
        query,
        candidate,
        loss=loss,
        catalogue_size=NUM_MOVIES,
        candidate_id_key="movie",
        query_id_key="user",
        **kwargs,
    )
    model.set_catalogue(catalogue())
    return model


def tables(tower):
    return {name: keras.ops.convert_to_numpy(e.embeddings) for name, e in tower.embeddings.items()}


def test_full_softmax_over_a_dict_catalogue_matches_numpy():
    model = model_with()
    model.compile(optimizer="sgd")
    x = pairs()
    loss = model.evaluate(x, batch_size=4, verbose=0)
    users = tables(model.query_tower)["user"][x["query"]["user"]]
    movie_tables = tables(model.candidate_tower)
    catalogue_embeddings = movie_tables["movie"] + movie_tables["decade"][DECADES]
    logits = users.astype("float64") @ catalogue_embeddings.T
    log_z = np.log(np.exp(logits).sum(axis=1))
    positives = logits[np.arange(4), x["candidate"]["movie"]]
    assert_all_close(loss, np.mean(log_z - positives), atol=1e-5)


def test_the_catalogue_features_are_what_the_loss_embeds():
    # Same ids, other decades: the full-catalogue loss must change with them.
    model = model_with()
    model.compile(optimizer="sgd")
    before = model.evaluate(pairs(), batch_size=4, verbose=0)
    model.set_catalogue({"movie": np.arange(NUM_MOVIES), "decade": np.zeros(NUM_MOVIES, "int32")})
    after = model.evaluate(pairs(), batch_size=4, verbose=0)
    assert abs(before - after) > 1e-6


def test_sampled_softmax_and_metrics_train_on_a_dict_catalogue():
    model = model_with("sampled_softmax", num_sampled_negatives=3)
    x = pairs()
    model.compile(
        optimizer="adam",
        metrics=[
            two_tower.FactorizedTopK(
                ks=(1, 6),
                num_queries=4,
                catalogue_size=NUM_MOVIES,
                exclude_query_ids=[0],
                exclude_candidate_ids=[3],
            )
        ],
    )
    history = model.fit(x, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    results = model.evaluate(x, batch_size=4, verbose=0, return_dict=True)
    # The catalogue has 6 movies, so every positive is in the top 6.
    assert_all_close(results["top_k_accuracy_at_6"], 1.0)


def test_factorized_top_k_with_dict_features_matches_numpy():
    model = model_with()
    model.compile(
        optimizer="sgd",
        metrics=[
            two_tower.FactorizedTopK(
                ks=(1, 2),
                num_queries=4,
                catalogue_size=NUM_MOVIES,
                exclude_query_ids=[1, 2],
                exclude_candidate_ids=[0, 4],
            )
        ],
    )
    x = pairs()
    results = model.evaluate(x, batch_size=4, verbose=0, return_dict=True)
    users = tables(model.query_tower)["user"][x["query"]["user"]]
    movie_tables = tables(model.candidate_tower)
    scores = users @ (movie_tables["movie"] + movie_tables["decade"][DECADES]).T
    scores[1, 0] = scores[2, 4] = -np.inf
    positives = x["candidate"]["movie"]
    rank = (scores > scores[np.arange(4), positives][:, None]).sum(axis=1)
    assert_all_close(results["top_k_accuracy_at_1"], np.mean(rank < 1))
    assert_all_close(results["top_k_accuracy_at_2"], np.mean(rank < 2))


def test_the_catalogue_is_saved_with_the_model(tmp_path):
    model = model_with()
    model.compile(optimizer="adam")
    model.fit(pairs(), batch_size=4, epochs=1, verbose=0)
    changed = {"movie": np.arange(NUM_MOVIES), "decade": DECADES[::-1].copy()}
    model.set_catalogue(changed)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    for name, values in changed.items():
        stored = keras.ops.convert_to_numpy(loaded._catalogue.variables[name].value)
        np.testing.assert_array_equal(stored, values)
    assert_all_close(
        loaded.evaluate(pairs(), batch_size=4, verbose=0),
        model.evaluate(pairs(), batch_size=4, verbose=0),
        atol=1e-5,
    )


def test_dict_candidates_without_a_catalogue_raise():
    query, candidate = towers()
    model = two_tower.TwoTowerRetrieval(
        query, candidate, loss="full_softmax", catalogue_size=NUM_MOVIES, candidate_id_key="movie"
    )
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"set_catalogue\(features\)"):
        model.fit(pairs(), batch_size=4, epochs=1, verbose=0)


def test_candidate_ids_out_of_the_catalogue_raise_on_every_backend():
    model = model_with()
    model.compile(optimizer="sgd")
    x = pairs()
    x["candidate"]["movie"] = np.array([3, 6, 1, 3], "int32")
    with pytest.raises(ValueError, match=r"Candidate ids must lie in \[0, 6\).*from 1 to 6"):
        model.fit(x, batch_size=4, epochs=1, verbose=0)


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ([1, 2, 3], "non-empty dict of arrays"),
        ({}, "non-empty dict of arrays"),
        ({"movie": np.arange(NUM_MOVIES), "decade": np.arange(5)}, r"'decade'.*6 rows.*\(5,\)"),
        ({"movie": np.arange(NUM_MOVIES), "decade": np.array(list("abcdef"))}, r"'decade'.*<U1"),
        ({"movie": np.arange(NUM_MOVIES)[::-1], "decade": DECADES}, r"'movie'.*arange\(6\)"),
    ],
)
def test_bad_catalogues_raise(features, match):
    query, candidate = towers()
    model = two_tower.TwoTowerRetrieval(
        query, candidate, loss="full_softmax", catalogue_size=NUM_MOVIES, candidate_id_key="movie"
    )
    with pytest.raises(ValueError, match=match):
        model.set_catalogue(features)


def test_replacing_the_catalogue_keeps_its_shapes():
    model = model_with()
    wider = {"movie": np.arange(NUM_MOVIES), "decade": np.zeros((NUM_MOVIES, 2), "int32")}
    with pytest.raises(ValueError, match="only replace the values"):
        model.set_catalogue(wider)


def test_set_catalogue_needs_a_catalogue_size():
    query, candidate = towers()
    model = two_tower.TwoTowerRetrieval(query, candidate)
    with pytest.raises(ValueError, match="catalogue_size=None"):
        model.set_catalogue(catalogue())


def test_index_candidates_defaults_to_the_catalogue():
    model = model_with()
    model.index_candidates()
    expected = model.candidate_tower(catalogue())
    stored = model.candidate_index.embeddings()
    assert_all_close(stored, keras.ops.convert_to_numpy(expected), atol=1e-6)
    ids = model.recommend({"user": np.array([2])}, k=NUM_MOVIES)
    np.testing.assert_array_equal(np.sort(ids[0]), np.arange(NUM_MOVIES))


def test_index_candidates_without_candidates_or_catalogue_raises():
    query, candidate = towers()
    model = two_tower.TwoTowerRetrieval(query, candidate)
    with pytest.raises(ValueError, match="or a catalogue given earlier with `set_catalogue`"):
        model.index_candidates()
