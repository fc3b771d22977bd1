"""docs/sequential.md, run as a reader runs it, on a small file in SASRec's format."""

import keras
import numpy as np
import pytest

from testing import run_doc_blocks

ITEMS = 300


def write_sequences(folder, users=400, seed=0):
    """`user item` lines, each user's in time order: a walk i -> i + 1 (mod 300) with
    a random start, so the next item is learnable and popularity is no help."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        start, length = rng.integers(0, ITEMS), rng.integers(4, 12)
        lines += [f"{user} {(start + step) % ITEMS + 1}" for step in range(length)]
    path = folder / "sasrec-video" / "Video.txt"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_sequential_guide_runs(tmp_path, monkeypatch):
    write_sequences(tmp_path)
    monkeypatch.setenv("TWO_TOWER_DATA_DIR", str(tmp_path))
    keras.config.set_max_epochs(12)
    try:
        namespace = run_doc_blocks(
            "docs/sequential.md", "test_sequential_guide.py::test_sequential_guide_runs", {}
        )
    finally:
        keras.config.set_max_epochs(None)
    results = namespace["results"]
    model, popularity = results["SequenceTower"], results["popularity"]
    # The walk is learnable: the model ranks the next item far above popularity.
    assert model["full"]["hr@10"] > 0.5 > popularity["full"]["hr@10"] + 0.25
    assert model["sampled"]["ndcg@10"] > popularity["sampled"]["ndcg@10"] + 0.2
    assert namespace["validate"].best_epoch is not None
    recommended = namespace["recommended"]
    assert recommended.shape == (3, 10)
    requests, raw_items = namespace["requests"], namespace["raw_items"]
    for row, history in zip(recommended, requests, strict=True):
        assert not set(row.tolist()) & set(raw_items[history[history >= 0]].tolist())
