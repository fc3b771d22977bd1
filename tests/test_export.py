"""`TwoTowerRetrieval.export`: the SavedModel and the ONNX model return `recommend`'s ids.

Each artefact is loaded in a fresh process where Keras and two_tower cannot be
imported (`tf.saved_model.load`, `onnxruntime.InferenceSession`), for an id
model (string vocabularies), a feature model (an int64 vocabulary and a numeric
feature), a history model and a sequence model trained on packed rows only, with
exclusions, unknown values and tied scores (weights on a 1/8 grid, so scores are
exact on every backend, and repeated rows).

Exporting needs TensorFlow, tf2onnx and onnx (the `export` extra), and the checks
onnxruntime: `tests-tensorflow` exports in its own process, and `cross-backend`
runs this file again under JAX and torch, which export through a TensorFlow
child process. The argument checks run in every session.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import keras
import numpy as np
import pytest

import custom_layers
import two_tower
from testing import doc_blocks
from two_tower.backends import backend_module
from two_tower.export import _onnx

EXPORTS = all(
    importlib.util.find_spec(name) is not None
    for name in ("tensorflow", "tf2onnx", "onnx", "onnxruntime")
)
needs_export = pytest.mark.skipif(
    not EXPORTS,
    reason="export needs tensorflow, tf2onnx, onnx and onnxruntime: tests-tensorflow, and "
    "cross-backend under JAX and torch",
)
IN_PROCESS = keras.backend.backend() == "tensorflow"
USERS, ITEMS, DIM, K, MAX_K, QUERIES = 40, 300, 8, 10, 20, 300

SEPARATOR = "\n=== and ===\n"  # between the distinct errors of a repeated request
# Loads artefacts with Keras and two_tower made unimportable, as on a server. Each
# job: an artefact, its inputs (an .npz) and where its ids and scores (or error) go.
RUN = textwrap.dedent(
    """
    import json, sys
    import numpy as np

    SEPARATOR = @SEPARATOR@
    for name in ("keras", "tf_keras", "two_tower"):
        sys.modules[name] = None  # as if not installed
    text = lambda v: v.astype(object) if v.dtype.kind == "U" else v
    for job in json.load(open(sys.argv[1])):
        case = np.load(job["case"])
        feeds = {name: case["in_" + name] for name in job["names"]}
        k, exclude = case["k"], case["exclude"]
        errors, loaded = set(), None
        for _ in range(job["repeat"]):  # a request whose answer could vary between runs
            try:
                if job["format"] == "tf_saved_model":
                    import tensorflow as tf

                    loaded = loaded or tf.saved_model.load(job["path"])
                    serve = loaded.signatures["serving_default"]
                    found = serve(**{n: tf.constant(v) for n, v in feeds.items()},
                                  k=tf.constant(k), exclude=tf.constant(exclude))
                    ids, scores = found["ids"].numpy(), found["scores"].numpy()
                else:
                    import onnxruntime

                    loaded = loaded or onnxruntime.InferenceSession(job["path"])
                    inputs = {n: text(v) for n, v in feeds.items()}
                    ids, scores = loaded.run(
                        ["ids", "scores"], {**inputs, "k": k, "exclude": text(exclude)})
            except Exception as error:
                errors.add(f"{type(error).__name__}: {error}")
        if errors:  # every distinct error
            json.dump({"error": SEPARATOR.join(sorted(errors))}, open(job["out"], "w"))
            continue
        if ids.dtype == object:
            ids = np.array([[v.decode() if isinstance(v, bytes) else v for v in row]
                            for row in ids])
        np.savez(job["out"], ids=ids, scores=scores)
    loaded = [m for m, v in sys.modules.items() if v is not None]
    assert not [m for m in loaded if m.split(".")[0] in ("keras", "two_tower")], loaded
    """
).replace("@SEPARATOR@", repr(SEPARATOR))


class Elsewhere:
    """Requests to serve from a process without Keras, run together by `run`."""

    def __init__(self, folder):
        self.folder = folder
        self.jobs = []

    def add(self, format, path, inputs, k, exclude, repeat=1):
        """Queues a request, made `repeat` times; returns its key in `run`'s results."""
        key = len(self.jobs)
        case = self.folder / f"case-{key}.npz"
        np.savez(
            case,
            k=np.array(k, "int32"),
            exclude=exclude,
            **{f"in_{name}": value for name, value in inputs.items()},
        )
        self.jobs.append(
            {
                "format": format,
                "path": str(path),
                "case": str(case),
                "out": str(self.folder / f"out-{key}.npz"),
                "names": list(inputs),
                "repeat": repeat,
            }
        )
        return key

    def run(self):
        """`(ids, scores)` per request, or the error's text where it raised."""
        (self.folder / "jobs.json").write_text(json.dumps(self.jobs))
        (self.folder / "run.py").write_text(RUN)
        result = subprocess.run(
            [sys.executable, str(self.folder / "run.py"), str(self.folder / "jobs.json")],
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        found = []
        for job in self.jobs:
            try:
                arrays = np.load(job["out"])
                found.append((arrays["ids"], arrays["scores"]))
            except ValueError:  # not an .npz: the error's JSON
                found.append(json.loads(Path(job["out"]).read_text())["error"])
        return found


def on_grid(model, tie_rows):
    """Weights on a 1/8 grid (exact scores everywhere); rows 1, 8, 15, ... of the
    tables with `tie_rows` rows copy row 0, so their candidates tie."""
    for variable in model.trainable_variables:
        values = np.round(keras.ops.convert_to_numpy(variable) * 8) / 8
        if values.ndim == 2 and values.shape[0] == tie_rows:
            values[1::7] = values[0]
        variable.assign(values)


def as_queries(inputs):
    """The signature's inputs as `recommend` takes them: one array is not a dict."""
    return inputs["query"] if list(inputs) == ["query"] else inputs


def padded(rows, padding):
    width = max(1, max(len(row) for row in rows))
    return np.array([list(row) + [padding] * (width - len(row)) for row in rows])


def exclusions(rng, ids, count, padding, unknown):
    """Per query: none, a few ids, or a few ids and an unknown one."""
    rows = []
    for i in range(count):
        row = list(rng.choice(ids, size=i % 4, replace=False))
        if i % 5 == 4:
            row.append(unknown)
        rows.append(row)
    return rows, padded(rows, padding)


# UTF-8 beyond ASCII in some ids: TensorFlow and ONNX hold strings as bytes.
MOVIES = [f"movie-{i}" if i % 3 else f"film-é-{i}" for i in range(ITEMS)]


def id_model():
    """String vocabularies on both sides; queries include an unknown user (OOV row)."""
    users = two_tower.Vocabulary([f"user-{i}" for i in range(USERS)])
    movies = two_tower.Vocabulary(MOVIES)
    model = two_tower.TwoTowerRetrieval.from_ids(
        embedding_dim=DIM,
        query_vocabulary=users,
        candidate_vocabulary=movies,
        # Blocks of 64: the artefact merges 5 blocks' bests, ties across them included.
        candidate_index=two_tower.BruteForceIndex(chunk_size=64),
    )
    rng = np.random.default_rng(0)
    x = {
        "query": np.array([f"user-{i}" for i in rng.integers(0, USERS, 600)]),
        "candidate": np.array(MOVIES)[rng.integers(0, ITEMS, 600)],
    }
    model.compile(optimizer="adam")
    model.fit(x, batch_size=100, epochs=1, verbose=0)
    on_grid(model, ITEMS + 1)  # the candidate table: the OOV row, then the movies
    model.index_candidates()
    names = [f"user-{i}" for i in range(USERS)] + ["stranger"]
    queries = {"query": np.array([names[i] for i in rng.integers(0, len(names), QUERIES)])}
    return model, queries, queries["query"], "nobody"


def feature_model():
    """A dict query tower: an int64-vocabulary user id and a numeric feature."""
    user_ids = np.arange(USERS, dtype="int64") * 1000 + 7
    users = two_tower.Vocabulary(user_ids)
    query_tower = two_tower.FeatureTower(
        categorical={"user": users.size},
        numeric=["age"],
        embedding_dim=4,
        hidden_units=(16,),
        output_dim=DIM,
    )
    model = two_tower.TwoTowerRetrieval(  # a candidate layer class of the user's own
        query_tower, custom_layers.DoubledEmbedding(ITEMS, DIM), query_vocabulary={"user": users}
    )
    rng = np.random.default_rng(1)
    x = {
        "query": {
            "user": rng.choice(user_ids, 600),
            "age": (rng.integers(0, 16, 600) / 8).astype("float32"),
        },
        "candidate": rng.integers(0, ITEMS, 600),
    }
    model.compile(optimizer="adam")
    model.fit(x, batch_size=100, epochs=1, verbose=0)
    on_grid(model, ITEMS)
    model.index_candidates(np.arange(ITEMS), candidate_ids=np.arange(ITEMS) * 3 + 2**40)
    queries = {
        "user": np.concatenate([rng.choice(user_ids, QUERIES - 1), [123456789]]),
        "age": (rng.integers(0, 16, QUERIES) / 8).astype("float32"),
    }
    return model, queries, queries["user"], -5


def history_model():
    """A history tower (mean pooling over the candidate tower's table), -1 padding, in
    a user's subclass that scores with its own `compute_similarities`."""
    items = two_tower.IdEmbeddingTower(ITEMS, embedding_dim=DIM)
    model = custom_layers.ScaledRetrieval(
        two_tower.HistoryTower(max_length=5, pooling="mean"),
        items,
        loss="full_softmax",
        catalogue_size=ITEMS,
    )
    rng = np.random.default_rng(2)

    def histories(count):
        rows = rng.integers(0, ITEMS, (count, 5))
        lengths = rng.integers(0, 6, count)
        rows[np.arange(5)[None, :] >= lengths[:, None]] = -1
        return rows

    x = {"query": {"history": histories(600)}, "candidate": rng.integers(0, ITEMS, 600)}
    model.compile(optimizer="adam")
    model.fit(x, batch_size=100, epochs=1, verbose=0)
    on_grid(model, ITEMS)
    model.index_candidates(np.arange(ITEMS))
    queries = {"history": histories(QUERIES)}
    return model, queries, queries["history"][:, 0], 10**9


def sequence_model():
    """A `SequenceTower` trained on packed rows only: the artefact takes the serving
    histories (most recent first, -1 padded), not the training rows."""
    model = two_tower.TwoTowerRetrieval.for_sequences(
        ITEMS, max_length=5, embedding_dim=DIM, num_sampled_negatives=20
    )
    rng = np.random.default_rng(4)
    users = np.sort(rng.integers(0, USERS, 600))
    log = two_tower.InteractionLog(users, rng.integers(0, ITEMS, 600), np.arange(600))
    model.compile(optimizer="adam")
    model.fit(two_tower.datasets.SequenceDataset(log, max_length=5, batch_size=16), verbose=0)
    on_grid(model, ITEMS)
    model.index_candidates(np.arange(ITEMS))
    queries = {"history": log.history(rng.integers(0, USERS, QUERIES), np.full(QUERIES, 600), 5)}
    return model, queries, queries["history"][:, 0], 10**9


MODELS = {
    "ids": id_model,
    "features": feature_model,
    "history": history_model,
    "sequence": sequence_model,
}


FORMATS = {"tf_saved_model": "saved", "onnx": "model.onnx"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Each model exported in both formats and served from one process without Keras.

    Returns `(models, answers)`: name -> `(model, queries)`, and (name, format,
    request) -> what the artefact answered.
    """
    if not EXPORTS:
        pytest.skip(needs_export.kwargs["reason"])
    elsewhere = Elsewhere(tmp_path_factory.mktemp("requests"))
    models, keys = {}, {}
    for name, make in MODELS.items():
        keras.utils.set_random_seed(0)
        model, queries, _, unknown = make()
        folder = tmp_path_factory.mktemp(name)
        models[name] = (model, queries, unknown, folder)
        ids = model.candidate_index.candidate_ids
        padding = "" if ids.dtype.kind == "U" else -1
        _, exclude = exclusions(np.random.default_rng(3), ids, QUERIES, padding, unknown)
        for format, file in FORMATS.items():
            model.export(folder / file, format=format, max_k=MAX_K, verbose=False)
            keys[name, format, "all"] = elsewhere.add(format, folder / file, queries, K, exclude)
    # Exclusions that leave the first query 5 candidates, the second all of them.
    model, queries, _, folder = models["features"]
    two = {name: value[:2] for name, value in queries.items()}
    ids = model.candidate_index.candidate_ids
    for format, file in FORMATS.items():
        exclude = padded([list(ids[5:]), []], -1)
        keys["features", format, "too few"] = elsewhere.add(format, folder / file, two, K, exclude)
    # k above max_k.
    model, queries, _, folder = models["ids"]
    three = {"query": queries["query"][:3]}
    for format, file in FORMATS.items():
        exclude = np.full((3, 0), "")
        keys["ids", format, "k"] = elsewhere.add(format, folder / file, three, MAX_K + 1, exclude)
    # An `exclude` with fewer rows than queries, many times: the check must run before
    # any op that reads `exclude` (a gather once raised first, now and then).
    for format, file in FORMATS.items():
        exclude = np.full((2, 1), "")
        keys["ids", format, "rows"] = elsewhere.add(
            format, folder / file, three, K, exclude, repeat=100
        )
    if IN_PROCESS:  # TensorFlow exports here, where the threshold can be lowered
        model, queries, unknown, folder = models["ids"]
        ids = model.candidate_index.candidate_ids
        _, exclude = exclusions(np.random.default_rng(3), ids, QUERIES, "", unknown)
        with mock.patch.object(_onnx, "EXTERNAL_DATA_BYTES", 1):
            model.export(folder / "external.onnx", format="onnx", max_k=MAX_K, verbose=False)
        keys["ids", "external", "all"] = elsewhere.add(
            "onnx", folder / "external.onnx", queries, K, exclude
        )
    answers = elsewhere.run()
    return models, {key: answers[index] for key, index in keys.items()}


xdist_export = pytest.mark.xdist_group("export")  # one worker builds `served`


@needs_export
@pytest.mark.slow
@xdist_export
@pytest.mark.parametrize("format", list(FORMATS))
@pytest.mark.parametrize("name", list(MODELS))
def test_the_artefact_returns_recommends_ids(served, name, format):
    models, answers = served
    model, queries, unknown, _ = models[name]
    ids = model.candidate_index.candidate_ids
    padding = "" if ids.dtype.kind == "U" else -1
    rows, _ = exclusions(np.random.default_rng(3), ids, QUERIES, padding, unknown)
    expected, expected_scores = model.recommend(
        as_queries(queries),
        k=K,
        exclude=rows,
        ignore_unknown_exclusions=True,
        return_scores=True,
    )
    found, scores = answers[name, format, "all"]
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)
    # The ties are there and broken the same way: equal scores in one row.
    assert np.any(expected_scores[:, 1:] == expected_scores[:, :-1])


@needs_export
@pytest.mark.slow
@xdist_export
@pytest.mark.parametrize("format", list(FORMATS))
def test_exclusions_that_leave_too_few_candidates_pad_the_row(served, format):
    models, answers = served
    model, queries, _, _ = models["features"]
    ids = model.candidate_index.candidate_ids
    two = {name: value[:2] for name, value in queries.items()}
    found, scores = answers["features", format, "too few"]
    expected = model.recommend(two, k=5, exclude=[list(ids[5:]), []])
    np.testing.assert_array_equal(found[0, :5], expected[0])
    assert set(found[0, :5]) == set(ids[:5])
    np.testing.assert_array_equal(found[0, 5:], [-1] * (K - 5))
    assert np.all(np.isneginf(scores[0, 5:]))
    np.testing.assert_array_equal(found[1], model.recommend(two, k=K)[1])


@needs_export
@pytest.mark.slow
@xdist_export
def test_k_above_max_k_raises_in_the_saved_model_and_is_clamped_by_onnx(served):
    models, answers = served
    model, queries, _, _ = models["ids"]
    error = answers["ids", "tf_saved_model", "k"]
    assert isinstance(error, str) and "`k` must be in [1, 20]" in error, error
    found, _ = answers["ids", "onnx", "k"]
    np.testing.assert_array_equal(found, model.recommend(queries["query"][:3], k=MAX_K))


@needs_export
@pytest.mark.slow
@xdist_export
@pytest.mark.parametrize("format", list(FORMATS))
def test_an_exclude_without_a_row_per_query_fails(served, format):
    error = served[1]["ids", format, "rows"]
    assert isinstance(error, str), "three queries and two exclusion rows must fail"
    if format == "tf_saved_model":  # one distinct error in 100 requests, the check's
        assert SEPARATOR not in error, error
        assert "`exclude` must have one row per query" in error, error


@needs_export
@pytest.mark.slow
@xdist_export
@pytest.mark.skipif(not IN_PROCESS, reason="lowers a threshold in this process: TensorFlow only")
def test_a_large_catalogue_goes_to_onnx_external_data(served):
    models, answers = served
    model, _, _, folder = models["ids"]
    (data,) = folder.glob("external.onnx.*.data")
    assert data.stat().st_size >= (ITEMS + 1) * DIM * 4  # the embeddings, at least
    assert (folder / "external.onnx").stat().st_size < (folder / "model.onnx").stat().st_size
    np.testing.assert_array_equal(
        answers["ids", "external", "all"][0], answers["ids", "onnx", "all"][0]
    )
    model.export(folder / "external.onnx", format="onnx", verbose=False)  # inline again
    assert not data.exists()  # the earlier export's data does not linger


@needs_export
@pytest.mark.slow
@xdist_export
def test_exporting_again_replaces_the_artefact(served):
    model, queries, _, folder = served[0]["history"]
    import tensorflow as tf

    model.export(folder / "again", max_k=3, verbose=False)
    model.export(folder / "again", max_k=5, verbose=False)
    serve = tf.saved_model.load(str(folder / "again")).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[1, 5\]"):
        serve(
            history=tf.constant(queries["history"][:1]),
            k=tf.constant(6),
            exclude=tf.zeros((1, 0), tf.int64),
        )
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@needs_export
@pytest.mark.slow
@xdist_export
def test_export_guide_runs(tmp_path, monkeypatch):
    """docs/export.md: the export here; the TensorFlow and ONNX Runtime blocks in a
    process without Keras, answering as `recommend` does."""
    monkeypatch.chdir(tmp_path)
    export, tensorflow, onnx = doc_blocks(
        "docs/export.md", "test_export.py::test_export_guide_runs"
    )
    namespace = {}
    exec(compile(export, "docs/export.md", "exec"), namespace)
    script = "\n".join(
        [
            "import sys",
            "for name in ('keras', 'tf_keras', 'two_tower'):",
            "    sys.modules[name] = None",
            tensorflow,
            "np_ids = found['ids'].numpy()",
            "import numpy",
            "numpy.save('tf_ids.npy', numpy.char.decode(np_ids.astype('S'), 'utf-8'))",
            onnx,
            "numpy.save('onnx_ids.npy', ids.astype(str))",
        ]
    )
    (tmp_path / "serve.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "serve.py"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = namespace["model"].recommend(["user-3", "user-7"], k=3, exclude=[["movie-1"], []])
    np.testing.assert_array_equal(np.load(tmp_path / "tf_ids.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "onnx_ids.npy"), expected)
    assert "movie-1" not in expected[0]


# ------------------------------------------------------------ every session


def small_model(**kwargs):
    model = two_tower.TwoTowerRetrieval.from_ids(5, 8, **kwargs)
    model.embed_queries(np.arange(2))
    model.index_candidates(np.arange(8))
    return model


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"format": "savedmodel"}, r"`format` must be one of 'tf_saved_model', 'onnx'"),
        ({"max_k": 0}, r"`max_k` must be an integer in \[1, 8\]"),
        ({"max_k": 9}, r"`max_k` must be an integer in \[1, 8\]"),
        ({"max_k": True}, r"`max_k` must be an integer"),
        ({"exclusion_padding": 3}, r"`exclusion_padding` \(3\) is an indexed candidate id"),
        ({"exclusion_padding": "x"}, r"`exclusion_padding` must be an integer"),
        ({"input_signature": [1]}, r"`input_signature` must be None"),
        ({"opset_version": 17}, r"takes no further options. Received \['opset_version'\]"),
        ({"verbose": "yes"}, r"`verbose` must be True or False"),
    ],
)
def test_bad_export_arguments_raise_before_anything_is_written(tmp_path, arguments, match):
    model = small_model()
    with pytest.raises(ValueError, match=match):
        model.export(tmp_path / "out", **arguments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss-cpu")
def test_an_approximate_index_is_refused(tmp_path):
    model = two_tower.TwoTowerRetrieval.from_ids(
        5, 64, candidate_index=two_tower.FaissIndex(nlist=2)
    )
    model.embed_queries(np.arange(2))
    model.index_candidates(np.arange(64))
    with pytest.raises(
        ValueError, match="must be a two_tower.BruteForceIndex. Received FaissIndex"
    ):
        model.export(tmp_path / "out")


def test_an_empty_index_and_an_uncalled_query_tower_are_refused(tmp_path):
    model = two_tower.TwoTowerRetrieval.from_ids(5, 8)
    with pytest.raises(ValueError, match="The index is empty: call `index_candidates`"):
        model.export(tmp_path / "out")
    model.index_candidates(np.arange(8))
    with pytest.raises(ValueError, match="call the model on queries"):
        model.export(tmp_path / "out")


def test_several_oov_buckets_are_refused(tmp_path):
    users = two_tower.Vocabulary(["a", "b"], num_oov_buckets=2)
    model = two_tower.TwoTowerRetrieval.from_ids(
        num_candidates=8, embedding_dim=4, query_vocabulary=users
    )
    model.embed_queries(np.arange(2))
    model.index_candidates(np.arange(8))
    with pytest.raises(ValueError, match="has 2 OOV buckets.*num_oov_buckets=1"):
        model.export(tmp_path / "out")


def test_a_failed_export_leaves_the_old_artefact(tmp_path, monkeypatch):
    model = small_model()
    target = tmp_path / "saved"
    target.mkdir()
    (target / "saved_model.pb").write_text("the old one")

    def half_written(model, plan, path, format):
        os.makedirs(path)
        with open(os.path.join(path, "saved_model.pb"), "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    monkeypatch.setattr(backend_module(), "export_artefact", half_written)
    with pytest.raises(OSError, match="disk full"):
        model.export(target)
    assert (target / "saved_model.pb").read_text() == "the old one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


class LocalTower(keras.layers.Layer):
    """A query tower whose class a new process could not import (as in a notebook)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = keras.layers.Embedding(5, 8)

    def call(self, ids):
        return self.table(ids)


LocalTower.__module__ = "__main__"


@pytest.mark.skipif(IN_PROCESS, reason="TensorFlow exports in its own process: any class works")
def test_classes_a_new_process_cannot_import_are_named(tmp_path):
    model = two_tower.TwoTowerRetrieval(LocalTower(), keras.layers.Embedding(8, 8))
    model.embed_queries(np.arange(2))
    model.index_candidates(np.arange(8))
    with pytest.raises(ValueError, match=r"\['__main__.LocalTower'\]. Move them to a module"):
        model.export(tmp_path / "out")

    def made_in_a_function():
        class Inner(keras.layers.Embedding):
            pass

        return Inner

    model = two_tower.TwoTowerRetrieval(made_in_a_function()(5, 8), keras.layers.Embedding(8, 8))
    model.embed_queries(np.arange(2))
    model.index_candidates(np.arange(8))
    with pytest.raises(ValueError, match=r"made_in_a_function.<locals>.Inner'\]. Move them"):
        model.export(tmp_path / "out")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here"
)
def test_without_tensorflow_the_export_extra_is_named(tmp_path):
    with pytest.raises(ImportError, match=r'pip install "two-tower\[export\]"'):
        small_model().export(tmp_path / "out")


@needs_export
@pytest.mark.skipif(not IN_PROCESS, reason="lowers a limit in this process: TensorFlow only")
def test_onnx_refuses_more_inline_bytes_than_protobuf_holds(tmp_path, monkeypatch):
    from two_tower.backends import tensorflow_export

    monkeypatch.setattr(tensorflow_export, "INLINE_BYTES", 100)
    with pytest.raises(ValueError, match=r"more than protobuf's 2 GB.*format='tf_saved_model'"):
        small_model().export(tmp_path / "model.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("feature", ["k", "exclude", "positions", "embeddings_0"])
def test_query_features_named_like_the_signature_are_refused(tmp_path, feature):
    tower = two_tower.FeatureTower(categorical={feature: 5}, output_dim=4)
    model = two_tower.TwoTowerRetrieval(tower, keras.layers.Embedding(8, 4))
    model.embed_queries({feature: np.arange(2)})
    model.index_candidates(np.arange(8))
    with pytest.raises(ValueError, match=rf"Query features named \['{feature}'\] clash"):
        model.export(tmp_path / "out")


@needs_export
@pytest.mark.skipif(not IN_PROCESS, reason="lowers a limit in this process: TensorFlow only")
def test_id_lookups_larger_than_a_graph_holds_are_refused(tmp_path, monkeypatch):
    from two_tower.backends import tensorflow_export

    monkeypatch.setattr(tensorflow_export, "INLINE_BYTES", 10)
    with pytest.raises(ValueError, match=r"id lookups .* at most 2 GB"):
        small_model().export(tmp_path / "saved")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_saved_model_is_not_replaced(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not a SavedModel \(it holds \['notes.txt'\]\)"):
        small_model().export(project)
    assert (project / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"ends in .onnx. Received .*notes.txt"):
        small_model().export(project / "notes.txt", format="onnx")
    assert (project / "notes.txt").read_text() == "mine"


def test_a_mixed_precision_index_is_refused(tmp_path):
    model = two_tower.TwoTowerRetrieval.from_ids(
        5, 8, candidate_index=two_tower.BruteForceIndex(dtype="mixed_float16")
    )
    model.embed_queries(np.arange(2))
    model.index_candidates(np.arange(8))
    with pytest.raises(ValueError, match=r"scores in float16 .*BruteForceIndex\(dtype='float32'\)"):
        model.export(tmp_path / "out")
