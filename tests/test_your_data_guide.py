"""The "your own data" guide (docs/your-data.md) runs as written, on every backend.

The guide's training blocks run in this process, as one script; `towers.py` is
written where the guide says to put it, and `serve.py` runs in a fresh process
that loads the saved model, as a service would.
"""

import re
import sys

import keras
import numpy as np
import pytest

from testing import REPOSITORY, doc_blocks, run_script

GUIDE = "docs/your-data.md"
TEST = "test_your_data_guide.py::test_your_data_guide_runs"
KS = (10, 50, 100)


def text_blocks():
    """The guide's ```text blocks (what its blocks print), in order."""
    return re.findall(r"```text\n(.*?)```", (REPOSITORY / GUIDE).read_text(), re.S)


def numpy_accuracy(scores, test_pairs, train_pairs, ks=KS):
    """Top-k accuracy of `[users, items]` scores, train pairs left out, ties to the positive.

    A test pair is a hit at k when fewer than k items that the user has not
    interacted with in training score strictly above its item.
    """
    seen = np.zeros(scores.shape, dtype=bool)
    seen[train_pairs] = True
    users, items = test_pairs
    ranks = []
    for start in range(0, len(users), 2048):
        rows = slice(start, start + 2048)
        row_scores = scores[users[rows]]
        positive = row_scores[np.arange(len(row_scores)), items[rows]][:, None]
        ranks.append(np.sum((row_scores > positive) & ~seen[users[rows]], axis=1))
    rank = np.concatenate(ranks)
    return {f"accuracy_at_{k}": float(np.mean(rank < k)) for k in ks}


def printed_row(line):
    """`| name | 0.090 | ... |` as floats."""
    return [float(cell) for cell in line.strip("|").split("|")[1:]]


@pytest.mark.slow
@pytest.mark.real_data
def test_your_data_guide_runs(real_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the guide saves my_model.keras to the current folder
    monkeypatch.setenv("TWO_TOWER_DATA_DIR", str(real_data_dir.parent))
    monkeypatch.syspath_prepend(str(tmp_path))  # `from towers import UserTower`
    blocks = doc_blocks(GUIDE, TEST)
    (towers,) = [block for block in blocks if block.startswith("# towers.py\n")]
    (serve,) = [block for block in blocks if block.startswith("# serve.py")]
    assert blocks.index(towers) < blocks.index(serve) == len(blocks) - 1
    (tmp_path / "towers.py").write_text(towers)
    namespace: dict = {}
    try:
        for block in blocks[:-1]:
            if block is not towers:
                exec(compile(block, GUIDE, "exec"), namespace)
    finally:
        sys.modules.pop("towers", None)
    printed = capsys.readouterr().out

    # What the guide shows as printed is what its blocks print: the tables, the
    # vocabularies, the popularity row exactly and the model's row within 0.01
    # (the model's figures differ a little between backends).
    shown = text_blocks()
    assert len(shown) == 4, shown
    assert shown[0] in printed and shown[1] in printed, printed
    documented = dict(line.split(" | ", 1) for line in shown[2].splitlines()[2:])
    run = dict(line.split(" | ", 1) for line in printed.splitlines() if line.startswith("| "))
    assert documented["| popularity"] == run["| popularity"], printed
    np.testing.assert_allclose(
        printed_row(documented["| two-tower model"]),
        printed_row(run["| two-tower model"]),
        atol=0.01,
    )

    # The table's figures, recomputed in NumPy from the raw ids of the split.
    table = namespace["table"]
    ratings, in_train = namespace["ratings"], namespace["in_train"]
    user_row = {user: row for row, user in enumerate(namespace["profiles"]["user_id"].to_pylist())}
    item_row = {item: row for row, item in enumerate(namespace["movies"]["movie_id"].tolist())}
    users = np.array([user_row[user] for user in ratings["user_id"].tolist()])
    items = np.array([item_row[item] for item in ratings["movie_id"].tolist()])
    train_pairs = (users[in_train], items[in_train])
    test_pairs = (users[~in_train], items[~in_train])
    counts = np.bincount(items[in_train], minlength=len(item_row)).astype("float64")
    popularity = numpy_accuracy(np.tile(counts, (len(user_row), 1)), test_pairs, train_pairs)
    for key, value in popularity.items():
        assert table["popularity"][key] == pytest.approx(value, abs=1e-5), key
    scores = (
        namespace["user_embeddings"] @ keras.ops.convert_to_numpy(namespace["item_embeddings"]).T
    )
    model = numpy_accuracy(scores, test_pairs, train_pairs)
    for key, value in model.items():
        assert table["two-tower model"][key] == pytest.approx(value, abs=2e-3), key
    # The model beats popularity clearly (measured: 1.8x at top-10, 1.5x at top-100).
    for k in (10, 100):
        assert model[f"accuracy_at_{k}"] >= 1.25 * popularity[f"accuracy_at_{k}"], (model, k)

    # A fresh process loads the saved model and recommends the same raw movie ids.
    before = namespace["before"]
    assert before.shape == (1, 10) and before.dtype.kind == "U"
    script = tmp_path / "serve.py"
    script.write_text(serve + '\nprint("RELOADED", "|".join(ids[0]))\n')
    completed = run_script(script, real_data_dir)
    lines = completed.stdout.splitlines()
    word, reloaded = lines[-1].split(" ")
    assert word == "RELOADED"
    assert reloaded.split("|") == before[0].tolist()

    # The printed titles are those of the ids, none rated by user 42; Star Wars is
    # not among its own neighbours; the new student gets five different movies.
    titles = dict(
        zip(namespace["movies"]["movie_id"], namespace["movies"]["movie_title"], strict=True)
    )
    seen = set(namespace["seen_by_42"].tolist())
    assert not set(before[0].tolist()) & seen
    headings = [i for i, line in enumerate(lines) if not line.startswith("  ")]
    assert [lines[i] for i in headings[:3]] == [
        "For user 42:",
        "Like Star Wars (1977):",
        "For a new student:",
    ], completed.stdout
    assert lines[1:11] == ["  " + titles[movie] for movie in before[0]]
    similar = lines[headings[1] + 1 : headings[2]]
    assert len(similar) == 5 and "  Star Wars (1977)" not in similar
    newcomer = lines[headings[2] + 1 : headings[3]]
    assert len(set(newcomer)) == 5
    shown_headings = [line for line in shown[3].splitlines() if not line.startswith("  ")]
    assert shown_headings == [lines[i] for i in headings[:3]], shown[3]
