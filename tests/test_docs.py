"""The README quickstart and the guides' examples run (getting started, sparse training, scale)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import two_tower
from testing import save_and_load

ROOT = Path(__file__).parents[1]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    (quickstart,) = [b for b in python_blocks(ROOT / "README.md") if "TwoTowerRetrieval" in b]
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "retrieval.keras").is_file()


def load_subclass_from_getting_started():
    (block,) = [b for b in python_blocks(ROOT / "docs" / "getting-started.md") if "class " in b]
    namespace = {"keras": keras, "two_tower": two_tower}
    exec(block.replace('package="my_project"', 'package="two_tower_docs"'), namespace)
    return namespace["CosineRetrieval"]


def test_documented_subclass_scores_by_cosine(tmp_path):
    cosine_retrieval = load_subclass_from_getting_started()
    model = cosine_retrieval(keras.layers.Embedding(6, 4), keras.layers.Embedding(9, 4))
    model.compile(optimizer="adam")
    x = {"query": np.arange(12) % 6, "candidate": np.arange(12) % 9}
    model.fit(x, batch_size=6, epochs=1, verbose=0)
    model.index_candidates(np.arange(9), candidate_ids=np.arange(9) + 100)
    found, scores = model.recommend(np.arange(6), k=3, return_scores=True)

    queries = keras.ops.convert_to_numpy(model.query_tower.embeddings)
    candidates = keras.ops.convert_to_numpy(model.candidate_tower.embeddings)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    candidates = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    cosine = queries @ candidates.T
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(found, order + 100)
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, order, 1), atol=1e-5)
    assert np.all(np.abs(scores) <= 1.0 + 1e-5)

    loaded = save_and_load(model, tmp_path)
    assert type(loaded).__name__ == "CosineRetrieval"
    np.testing.assert_array_equal(loaded.recommend(np.arange(6), k=3), found)


@pytest.mark.slow
def test_sparse_training_guide_runs():
    (block,) = python_blocks(ROOT / "docs" / "sparse-training.md")
    namespace: dict = {}
    exec(compile(block, "sparse-training.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model.candidate_tower.embedding, two_tower.SparseEmbedding)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2 * 20


@pytest.mark.slow
def test_scale_guide_trains_from_disk():
    (block,) = [b for b in python_blocks(ROOT / "docs" / "scale.md") if "ShardDataset(" in b]
    namespace: dict = {}
    exec(block, namespace)
    history = namespace["model"].history.history
    assert len(history["loss"]) == 2 and np.all(np.isfinite(history["loss"]))
