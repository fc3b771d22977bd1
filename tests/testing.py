"""A small test base and fixtures of our own (no `keras.src.testing`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np


def assert_all_close(actual: Any, expected: Any, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """`np.testing.assert_allclose` through `keras.ops.convert_to_numpy`."""
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(actual),
        keras.ops.convert_to_numpy(expected),
        atol=atol,
        rtol=rtol,
    )


def assert_config_round_trip(obj: Any) -> Any:
    """`from_config(get_config())` gives an object with the same JSON config."""
    config = obj.get_config()
    restored = obj.__class__.from_config(config)
    as_json = json.dumps(keras.saving.serialize_keras_object(obj), sort_keys=True)
    restored_json = json.dumps(keras.saving.serialize_keras_object(restored), sort_keys=True)
    assert json.loads(as_json)["config"] == json.loads(restored_json)["config"]
    return restored


def interactions(rows: int, users: int, items: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Seeded `(x, ratings)`: query and candidate ids with the candidates' in-sample
    frequency as `candidate_sampling_probability` (logQ), and ratings in [1, 5)."""
    rng = np.random.default_rng(0)
    candidates = rng.integers(0, items, rows)
    frequency = np.bincount(candidates, minlength=items) / rows
    x = {
        "query": rng.integers(0, users, rows),
        "candidate": candidates,
        "candidate_sampling_probability": frequency[candidates].astype("float32"),
    }
    return x, rng.uniform(1, 5, rows).astype("float32")


def negative_layers(items: int) -> dict[str, Any]:
    """A `FrequencyEstimator`, a `NegativeCache` and a Zipf `PopularitySampler` over
    `items`, as `TwoTowerRetrieval` keyword arguments (the multi-device tests)."""
    import two_tower

    return {
        "frequency_estimator": two_tower.negatives.FrequencyEstimator(num_buckets=items),
        "negative_cache": two_tower.negatives.NegativeCache(size=128, max_age=2),
        "negative_sampler": two_tower.negatives.PopularitySampler.from_weights(
            1.0 / np.arange(1, items + 1)
        ),
    }


def tutorial_split(data_dir: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The keras-rs tutorial's MovieLens 100K split: 80/20 by a permutation with seed 42."""
    from two_tower.datasets import movielens

    ratings = movielens.load_ratings(data_dir)
    records = {
        "user": ratings["user_id"].astype("int32"),
        "movie": ratings["movie_id"].astype("int32"),
    }
    return movielens.random_split(records, test_fraction=0.2, seed=42)


def fit_default_model(train: dict[str, np.ndarray]) -> Any:
    """`from_ids(944, 1683)` trained on the tutorial split's `train` with the defaults
    (seed 42), under whatever distribution and dtype policy are set."""
    import keras

    import two_tower

    keras.utils.set_random_seed(42)
    model = two_tower.TwoTowerRetrieval.from_ids(944, 1683)
    model.compile(
        optimizer=two_tower.defaults.optimizer(),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    model.fit(
        {"query": train["user"], "candidate": train["movie"]}, verbose=0, **two_tower.defaults.FIT
    )
    return model


def pairs_for(loss: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`x` without the logQ entry when `loss` does not use it (fit refuses it there)."""
    if loss in ("mse", "full_softmax"):
        return {key: value for key, value in x.items() if key != "candidate_sampling_probability"}
    return x


def missing_devices(found: int, needed: int, what: str, how: str) -> str | None:
    """Why a multi-device test module cannot run, or None when it can.

    Outside the `tests-multidevice` session the reason becomes a skip; in it
    (`TWO_TOWER_MULTIDEVICE` set) too few devices is a failure, not a skip.
    """
    if found >= needed:
        return None
    message = f"needs {needed} {what}, found {found}: run the tests-multidevice session ({how})"
    if os.environ.get("TWO_TOWER_MULTIDEVICE"):
        import pytest

        pytest.fail(message)
    return message


def run_script(script: Path, data_dir: Path) -> Any:
    """Runs `script` in a fresh Python process, in its folder, on this session's
    backend, with the MovieLens folder `data_dir` (the one holding `u.data`); it
    must succeed. Returns the `subprocess.CompletedProcess`, output as text."""
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent,
        env=dict(
            os.environ,
            KERAS_BACKEND=keras.backend.backend(),
            TWO_TOWER_DATA_DIR=str(Path(data_dir).parent),
        ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def save_and_load(model: keras.Model, folder: Path) -> Any:
    path = os.path.join(folder, "model.keras")
    model.save(path)
    return keras.saving.load_model(path)


@keras.saving.register_keras_serializable(package="two_tower_tests")
class MLPTower(keras.layers.Layer):
    """A hand-written custom tower: embedding, then a dense projection."""

    def __init__(self, vocabulary_size: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.dim = dim
        self.embedding = keras.layers.Embedding(vocabulary_size, 8)
        self.projection = keras.layers.Dense(dim)

    def build(self, input_shape: Any) -> None:
        self.embedding.build(input_shape)
        self.projection.build((*input_shape, 8))

    def call(self, inputs: Any) -> Any:
        return self.projection(self.embedding(inputs))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"vocabulary_size": self.vocabulary_size, "dim": self.dim})
        return config


def integer_model(
    num_users: int, num_items: int, dim: int, seed: int = 0
) -> tuple[Any, np.ndarray, np.ndarray]:
    """An Embedding-tower model whose tables hold small integers: exact scores, many ties.

    Returns the model and its query and candidate tables.
    """
    import two_tower

    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(num_users, dim), keras.layers.Embedding(num_items, dim)
    )
    rng = np.random.default_rng(seed)
    users = rng.integers(-2, 3, size=(num_users, dim)).astype("float32")
    items = rng.integers(-2, 3, size=(num_items, dim)).astype("float32")
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    model.query_tower.embeddings.assign(users)
    model.candidate_tower.embeddings.assign(items)
    return model, users, items


def numpy_ranking(
    query_vectors: np.ndarray, items: np.ndarray, k: int, excluded_positions: Any
) -> np.ndarray:
    """Top-k positions per query in float64: score descending, then position ascending."""
    scores = query_vectors.astype("float64") @ items.astype("float64").T
    out = []
    for row, skip in enumerate(excluded_positions):
        positions = np.setdiff1d(np.arange(len(items)), list(skip))
        out.append(positions[np.lexsort((positions, -scores[row, positions]))[:k]])
    return np.array(out)


# ----------------------------------------------------------- MovieLens fixtures
GENRE_FLAGS = 19

USERS = [
    ("1", "24", "M", "technician", "85711"),
    ("2", "53", "F", "other", "94043"),
    ("3", "17", "M", "doctor", "32067"),
]
MOVIES = [
    ("1", "Toy Story (1995)", [3, 4, 5]),  # Animation, Children, Comedy (u.item columns)
    ("2", "Café (1996)", [8]),  # Drama, with a Latin-1 character
    ("3", "unknown", [0]),  # Unknown
    ("4", "Star Wars (1977)", [1, 2, 14, 15, 17]),
]
RATINGS = [
    ("1", "4", "5", "881250949"),
    ("2", "1", "3", "891717742"),
    ("3", "2", "1", "878887116"),
    ("1", "3", "2", "880606923"),
    ("2", "4", "4", "886397596"),
]


def write_movielens(folder: Path, ratings: list[tuple[str, ...]] | None = None) -> Path:
    """Writes a tiny MovieLens 100K in the GroupLens layout; returns the folder."""
    ratings = RATINGS if ratings is None else ratings
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join("\t".join(r) + "\n" for r in ratings))
    (folder / "u.user").write_text("".join("|".join(u) + "\n" for u in USERS))
    lines = []
    for movie_id, title, genres in MOVIES:
        flags = ["1" if i in genres else "0" for i in range(GENRE_FLAGS)]
        lines.append("|".join([movie_id, title, "01-Jan-1995", "", "http://x"] + flags))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("ISO-8859-1"))
    (folder / "u.info").write_text(
        f"{len(USERS)} users\n{len(MOVIES)} items\n{len(ratings)} ratings\n"
    )
    return folder


def zip_folder(folder: Path, archive: Path, inner: str = "ml-100k") -> Path:
    """Zips `folder`'s files under `inner/`, as the official MovieLens zips are laid out."""
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"{inner}/{path.name}")
    return archive


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve_release(
    monkeypatch: Any, url: str, variant: str = "100k", sha256: str | None = None
) -> None:
    """Points `variant`'s download at `url` (and its official sha256 at `sha256`)."""
    from two_tower.datasets import movielens

    release = movielens.RELEASES[variant]
    changed = release._replace(url=url, sha256=sha256 or release.sha256)
    monkeypatch.setitem(movielens.RELEASES, variant, changed)


# Every ```python block of the README and the guides runs in some test session.
# A block is named by its file and its position there (0 = the first); each test
# asks for its own blocks by its name, so this table is what runs. A new block
# fails tests/test_docs.py::test_every_python_block_in_the_docs_runs until it is
# listed here or in DOC_BLOCKS_NOT_RUN with the reason.
_GUIDES = "test_docs.py::test_getting_started_and_serving_guides_run"
DOC_BLOCK_RUNNERS: dict[str, dict[int, str]] = {
    # The quickstart and its save/load lines run as one script, as a reader runs them.
    "README.md": dict.fromkeys(range(2), "test_docs.py::test_readme_quickstart_runs"),
    "docs/getting-started.md": dict.fromkeys(range(7), _GUIDES),
    "docs/serving.md": dict.fromkeys(range(5), _GUIDES),
    "docs/your-data.md": dict.fromkeys(
        range(10), "test_your_data_guide.py::test_your_data_guide_runs"
    ),
    "docs/history.md": dict.fromkeys(
        range(3), "test_docs.py::test_history_guide_beats_ease_on_the_temporal_split"
    ),
    "docs/export.md": dict.fromkeys(range(3), "test_export.py::test_export_guide_runs"),
    "docs/sequential.md": dict.fromkeys(
        range(3), "test_sequential_guide.py::test_sequential_guide_runs"
    ),
    "docs/subclassing.md": {0: "test_docs.py::test_subclassing_guide_runs"},
    "docs/sparse-training.md": {0: "test_docs.py::test_sparse_training_guide_runs"},
    "docs/negatives.md": {
        0: "test_negatives.py::test_negatives_guide_runs",
        1: "test_negatives.py::test_negatives_guide_runs",
        2: "test_negatives.py::test_negatives_guide_runs",
    },
    "docs/open-ids.md": {
        0: "test_hashed_embeddings.py::test_open_ids_guide_runs",
        1: "test_table_growth.py::test_growth_guide_runs",
    },
    "docs/scale.md": {
        0: "test_docs.py::test_scale_guide_loads_tables",
        1: "test_docs.py::test_scale_guide_trains_from_disk",
    },
    "docs/distributed.md": {
        0: "test_multidevice_jax.py::test_distributed_guide_runs_on_jax",
        1: "test_multidevice_jax.py::test_distributed_guide_runs_on_jax",
        3: "test_docs.py::test_distributed_guide_runs_on_tensorflow",
        4: "test_multidevice_torch.py::test_distributed_guide_runs_under_torchrun",
    },
}
DOC_BLOCKS_NOT_RUN: dict[tuple[str, int], str] = {
    ("docs/distributed.md", 2): (
        "two processes on two hosts; test_multidevice_jax.py::"
        "test_two_processes_train_like_one_process makes the same calls on 127.0.0.1"
    ),
}
REPOSITORY = Path(__file__).parents[1]


def python_blocks(path: str) -> list[str]:
    """The ```python blocks of a Markdown file of the repository, in order."""
    return re.findall(r"```python\n(.*?)```", (REPOSITORY / path).read_text(), re.S)


def doc_blocks(path: str, test: str) -> list[str]:
    """The blocks of `path` that DOC_BLOCK_RUNNERS gives to `test`, in order."""
    blocks = python_blocks(path)
    mine = [blocks[i] for i, runner in sorted(DOC_BLOCK_RUNNERS[path].items()) if runner == test]
    assert mine, f"DOC_BLOCK_RUNNERS gives no block of {path} to {test}"
    return mine


def run_doc_blocks(path: str, test: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Runs the blocks of `path` given to `test` in `namespace`, as one script."""
    for block in doc_blocks(path, test):
        exec(compile(block, path, "exec"), namespace)
    return namespace
