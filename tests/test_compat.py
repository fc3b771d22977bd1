"""Saved models of earlier releases load and give the same top-k.

`tests/fixtures/compat/<release>/` holds small models (id towers with raw-id
vocabularies, row-sparse tables, feature towers, a history tower sharing the
candidate table), each saved with its index on each backend by
`tests/fixtures/compat/make_fixtures.py`, beside the queries and the top-k that
NumPy computed from the model's embeddings when it was saved. Every backend's
session loads all of them, whichever backend saved them.
"""

from pathlib import Path

import numpy as np
import pytest

import two_tower

FIXTURES = Path(__file__).parent / "fixtures" / "compat"
SAVED = sorted(FIXTURES.glob("*/*.keras"))


def test_fixtures_present():
    releases = {path.parent.name for path in SAVED}
    assert "0.1.0" in releases
    # Four kinds saved on each of three backends, per release.
    assert len(SAVED) == 12 * len(releases)


@pytest.mark.parametrize("path", SAVED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_saved_model_loads_with_same_top_k(path):
    expected = np.load(path.with_suffix(".npz"))
    queries = {
        name.removeprefix("query/"): expected[name]
        for name in expected.files
        if name.startswith("query/")
    }
    if list(queries) == ["queries"]:
        queries = queries["queries"]
    model = two_tower.saving.load_model(path)
    ids, scores = model.recommend(queries, k=expected["ids"].shape[1], return_scores=True)
    np.testing.assert_array_equal(ids, expected["ids"])
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-4, atol=1e-5)
