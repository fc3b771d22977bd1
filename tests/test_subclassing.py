"""The docs/subclassing.md example: feature towers and a learned-temperature cosine."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from testing import save_and_load

ROOT = Path(__file__).parents[1]


def documented_model():
    (block,) = re.findall(
        r"```python\n(.*?)```", (ROOT / "docs" / "subclassing.md").read_text(), re.S
    )
    namespace = {}
    exec(block.replace('package="my_project"', 'package="two_tower_subclassing_docs"'), namespace)
    return namespace["model"]


def data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    query = {
        "user": rng.integers(0, 1000, n).astype("int32"),
        "occupation": rng.integers(0, 21, n).astype("int32"),
        "age": rng.random(n).astype("float32"),
    }
    candidate = {
        "movie": rng.integers(0, 2000, n).astype("int32"),
        "genres": rng.integers(-1, 19, (n, 3)).astype("int32"),
    }
    return query, candidate


@pytest.mark.slow
def test_documented_subclass_trains_learns_its_scale_and_ranks_by_scaled_cosine(tmp_path):
    model = documented_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    query, candidate = data()
    before = float(keras.ops.convert_to_numpy(model.log_scale))
    model.fit({"query": query, "candidate": candidate}, batch_size=100, epochs=2, verbose=0)
    assert float(keras.ops.convert_to_numpy(model.log_scale)) != before

    catalogue = {
        "movie": np.arange(50, dtype="int32"),
        "genres": np.tile([[1, 2, -1]], (50, 1)).astype("int32"),
    }
    model.index_candidates(catalogue, np.arange(50) + 10_000)
    users = {key: value[:4] for key, value in query.items()}
    found, scores = model.recommend(users, k=5, return_scores=True)

    q = keras.ops.convert_to_numpy(model.embed_queries(users))
    c = keras.ops.convert_to_numpy(model.embed_candidates(catalogue))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    expected = np.exp(float(keras.ops.convert_to_numpy(model.log_scale))) * q @ c.T
    order = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(found, order + 10_000)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, 1), rtol=1e-4, atol=1e-5)

    restored = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(restored.recommend(users, k=5), found)
