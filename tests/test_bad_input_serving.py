"""Bad input to the serving side (FaissIndex, BruteForceIndex blocks, saved files).

Issue 30's sweep: each plausible mistake with `FaissIndex`, block input to
`BruteForceIndex.index`, `FaissIndex.save`/`load` and `two_tower.saving` is
either a clear error (named argument or file member, what was received, what
was expected) or an accepted input whose result equals a NumPy reference. The
same on every backend: this file runs in every backend session.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import two_tower
from two_tower import saving

faiss = pytest.importorskip("faiss")

DIM = 8
posix_only = pytest.mark.skipif(os.name != "posix", reason="needs fork and SIGKILL")


def catalogue(n=300, dim=DIM, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")


def numpy_top_k(queries, rows, k):
    scores = np.asarray(queries, "float64") @ np.asarray(rows, "float64").T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def exhaustive(**kwargs):
    """A FaissIndex probing every list: its results are the exact top k."""
    return two_tower.FaissIndex(nlist=4, nprobe=4, **kwargs)


# --------------------------------------------------------------------------
# FaissIndex arguments


def test_numpy_scalars_are_accepted_and_kept_as_python_numbers():
    rows = catalogue()
    ann = two_tower.FaissIndex(
        nlist=np.int64(4),
        nprobe=np.int32(4),
        train_size=np.int64(200),
        seed=np.int64(3),
        target_recall=np.float32(0.5),
        calibration_k=np.int64(5),
    )
    config = ann.get_config()
    json.dumps(config)  # NumPy scalars would not serialise
    layer_keys = ("name", "trainable", "dtype")  # a keras Layer's own
    options = {k: v for k, v in config.items() if v is not None and k not in layer_keys}
    assert {type(value) for value in options.values()} <= {int, float}
    assert config["target_recall"] == pytest.approx(0.5)
    ann.index(rows, np.arange(300) + 100)
    ids, _ = ann.search(rows[:3], k=np.int64(5))
    np.testing.assert_array_equal(ids, numpy_top_k(rows[:3], rows, 5) + 100)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nlist": 4.0}, r"FaissIndex: `nlist` must be an integer >= 1\. Received: nlist=4\.0"),
        ({"nprobe": True}, r"`nprobe` must be an integer >= 1\. Received: nprobe=True \(bool\)"),
        ({"train_size": 0}, r"`train_size` must be an integer >= 1\. Received: train_size=0"),
        ({"pq_subquantizers": "4"}, r"`pq_subquantizers` must be an integer >= 1"),
        ({"calibration_k": np.float32(5)}, r"`calibration_k` must be an integer >= 1"),
        ({"seed": -1}, r"`seed` must be an integer >= 0\. Received: seed=-1"),
        ({"seed": 1.5}, r"`seed` must be an integer >= 0\. Received: seed=1\.5 \(float\)"),
        ({"target_recall": 0}, r"`target_recall` must be a finite number in \(0, 1\]"),
        ({"target_recall": np.float32("nan")}, r"`target_recall` must be a finite number"),
        ({"target_recall": "0.9"}, r"Received: target_recall='0\.9' \(str\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        two_tower.FaissIndex(**kwargs)


def test_seed_none_draws_a_seed_and_seeds_beyond_faiss_range_work():
    rows = catalogue()
    expected = numpy_top_k(rows[:4], rows, 5)
    for seed in (None, 2**40):
        ann = exhaustive(seed=seed)
        ann.index(rows)
        assert ann.get_config()["seed"] == seed
        np.testing.assert_array_equal(ann.search(rows[:4], k=5)[0], expected)


def test_too_few_training_rows_are_named():
    rows = catalogue(2000)
    with pytest.raises(ValueError, match=r"`train_size` \(=5\) must be at least 10.*`nlist`"):
        two_tower.FaissIndex(nlist=10, train_size=5).index(rows)
    with pytest.raises(ValueError, match=r"`train_size` \(=100\) must be at least 256.*IVF-PQ"):
        two_tower.FaissIndex(nlist=4, pq_subquantizers=4, train_size=100).index(rows)
    with pytest.raises(ValueError, match=r"IVF-PQ needs at least 256 candidates.*Received 100"):
        two_tower.FaissIndex(pq_subquantizers=4).index(rows[:100])
    with pytest.raises(ValueError, match=r"`nlist` \(=400\) must not exceed the candidates"):
        two_tower.FaissIndex(nlist=400).index(rows[:300])


def test_ivf_pq_on_few_rows_is_accepted_and_probing_all_lists_finds_the_neighbours():
    # 300 rows train 256 centroids per codebook: faiss warns (on stderr) that
    # codes are coarse; accepted. Each row's own code is its nearest.
    rows = catalogue(300)
    ann = two_tower.FaissIndex(nlist=2, nprobe=2, pq_subquantizers=8)
    ann.index(rows)
    ids, _ = ann.search(rows[:20], k=10)
    hits = [
        len(np.intersect1d(a, b))
        for a, b in zip(ids, numpy_top_k(rows[:20], rows, 10), strict=True)
    ]
    assert np.mean(hits) / 10 >= 0.5


# --------------------------------------------------------------------------
# FaissIndex.search


@pytest.fixture(scope="module")
def ann():
    index = exhaustive()
    index.index(catalogue(), np.arange(300) + 7)
    return index


@pytest.mark.parametrize(
    "queries, k, error, message",
    [
        (
            np.ones((2, DIM)),
            301,
            ValueError,
            r"`k` must be an integer in \[1, 300\]\. Received: k=301",
        ),
        (
            np.ones((2, DIM)),
            3.0,
            ValueError,
            r"`k` must be an integer in \[1, 300\]\. Received: k=3\.0",
        ),
        (np.ones((2, DIM)), 0, ValueError, r"`k` must be an integer in \[1, 300\]"),
        (
            np.ones((2, 4)),
            3,
            ValueError,
            r"`query_embeddings` must have shape \[queries, 8\].*\(2, 4\)",
        ),
        (np.ones(DIM), 3, ValueError, r"must have shape \[queries, 8\].*Received shape: \(8,\)"),
        (np.full((2, DIM), "a"), 3, ValueError, r"`query_embeddings` must be a numeric.*dtype <U1"),
        (np.ones((2, DIM), bool), 3, ValueError, r"must be a numeric.*dtype bool"),
        (np.full((2, DIM), np.nan), 3, ValueError, r"`query_embeddings` contain NaN"),
        (np.full((2, DIM), 1e39), 3, ValueError, r"NaN or infinite values \(or overflow float32\)"),
    ],
)
def test_bad_queries_are_named(ann, queries, k, error, message):
    with pytest.raises(error, match=message):
        ann.search(queries, k=k)


def test_accepted_queries_match_numpy(ann):
    rows = catalogue()
    ints = np.arange(2 * DIM).reshape(2, DIM) % 3 - 1
    for queries in (rows[:2].astype("float64"), rows[:2].tolist(), ints):
        ids, _ = ann.search(queries, k=4)
        np.testing.assert_array_equal(ids, numpy_top_k(queries, rows, 4) + 7)
    ids, scores = ann.search(np.zeros((0, DIM), "float32"), k=4)
    assert scores.shape == ids.shape == (0, 4)
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 300\]"):
        ann.nprobe_for(0)


# --------------------------------------------------------------------------
# Catalogue blocks: FaissIndex.index and BruteForceIndex.index


def blocks_of(rows, cuts):
    edges = [0, *cuts, len(rows)]
    return [rows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


@pytest.mark.parametrize("kind", ["list", "tuple", "generator", "pairs"])
def test_blocks_give_the_same_index_as_one_array(kind):
    rows, ids = catalogue(), np.arange(300) * 3
    blocks = blocks_of(rows, [100, 100, 250])  # an empty block too
    if kind == "pairs":
        edges = [0, 100, 100, 250, 300]
        given_blocks = [
            (b, ids[a:c]) for b, a, c in zip(blocks, edges[:-1], edges[1:], strict=True)
        ]
        given_ids = None
    else:
        given_blocks, given_ids = blocks, ids
    wrap = {"list": list, "tuple": tuple, "generator": iter, "pairs": list}[kind]
    expected = ids[numpy_top_k(rows[:5], rows, 6)]
    exact = two_tower.BruteForceIndex(chunk_size=64)
    exact.index(wrap(given_blocks), given_ids)
    np.testing.assert_array_equal(exact.search(rows[:5], k=6)[0], expected)
    approximate = exhaustive()
    approximate.index(wrap(given_blocks), given_ids)
    np.testing.assert_array_equal(approximate.search(rows[:5], k=6)[0], expected)


def test_a_list_of_number_pairs_is_one_dim_2_catalogue_not_blocks():
    """Only a pair whose first item is 2-D is an (embeddings, ids) block."""
    rows = [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8)]
    expected = numpy_top_k(np.array([[1.0, 1.0]]), np.array(rows), 2)
    index = two_tower.BruteForceIndex()
    index.index(rows)
    np.testing.assert_array_equal(index.search(np.array([[1.0, 1.0]]), k=2)[0], expected)


@pytest.mark.parametrize(
    "blocks, ids, message",
    [
        (
            [catalogue(5), catalogue(5, dim=4)],
            None,
            r"Catalogue block 1 has dim 4; the first block has dim 8",
        ),
        ([catalogue(5), np.full((5, DIM), "x")], None, r"numeric .* dtype <U1 in block 1"),
        ([catalogue(5), catalogue(5)[0]], None, r"2D \[candidates, dim\].*\(8,\) in block 1"),
        ([np.zeros((0, DIM))], None, r"Cannot index an empty catalogue"),
        ([catalogue(5), catalogue(5)], np.arange(9), r"one id per embedding row.*\(9,\) for 10"),
        (
            [catalogue(5), catalogue(5)],
            iter(range(10)),
            r"not an iterator\. Received: range_iterator",
        ),
        (
            [(catalogue(2), [1, 2]), (catalogue(2), ["a", "b"])],
            None,
            r"block 1 has string ids but the blocks before it have integer ids",
        ),
        (
            [(catalogue(2), [1, 2]), catalogue(2)],
            None,
            r"all be arrays or all be \(embeddings, ids\) pairs",
        ),
        (
            [(catalogue(2), [1, 2]), (catalogue(2), [3])],
            None,
            r"block 1 has 2 embeddings but 1 ids",
        ),
        (
            [(catalogue(2), [1, 2]), (catalogue(2), [2, 3])],
            None,
            r"must be unique\. Received duplicates: \[2\]",
        ),
        (
            (catalogue(2), np.arange(2)),
            None,
            r"is one \(embeddings, ids\) pair\. Pass `index\(embeddings, candidate_ids=ids\)`",
        ),
        ({"rows": catalogue(2)}, None, r"array, or row blocks of one\. Received a dict"),
    ],
)
def test_bad_blocks_are_named(blocks, ids, message):
    for index in (two_tower.BruteForceIndex(), two_tower.FaissIndex()):
        with pytest.raises(ValueError, match=message):
            index.index(blocks, ids)


def test_unsigned_and_signed_integer_ids_across_pairs_stay_integers():
    rows = catalogue(4)
    exact = two_tower.BruteForceIndex()
    exact.index([(rows[:2], np.array([1, 2], "int32")), (rows[2:], np.array([3, 4], "uint64"))])
    assert exact.candidate_ids.dtype == np.int64
    np.testing.assert_array_equal(exact.candidate_ids, [1, 2, 3, 4])


def test_brute_force_scalars_accept_numpy_and_name_bad_values():
    index = two_tower.BruteForceIndex(chunk_size=np.int64(64), query_batch_size=np.int32(4))
    config = index.get_config()
    assert type(config["chunk_size"]) is int and type(config["query_batch_size"]) is int
    json.dumps(config)
    with pytest.raises(
        ValueError,
        match=r"BruteForceIndex: `chunk_size` must be an integer in \[1, 16777216\]\. "
        r"Received: chunk_size=64\.0",
    ):
        two_tower.BruteForceIndex(chunk_size=64.0)
    with pytest.raises(ValueError, match=r"`query_batch_size` must be an integer >= 1.*=0 \(int\)"):
        two_tower.BruteForceIndex(query_batch_size=0)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda s: sum(s) >= 8),
    pairs=st.booleans(),
    k=st.integers(1, 8),
)
def test_any_split_into_blocks_indexes_the_catalogue(sizes, pairs, k):
    rows = catalogue(sum(sizes), seed=len(sizes))
    ids = (np.arange(len(rows)) * 7 + 5)[::-1].copy()
    blocks = blocks_of(rows, list(np.cumsum(sizes)[:-1]))
    if pairs:
        starts = np.concatenate([[0], np.cumsum(sizes)])
        given_blocks = [(b, ids[a : a + len(b)]) for b, a in zip(blocks, starts[:-1], strict=True)]
        given_ids = None
    else:
        given_blocks, given_ids = blocks, ids
    queries = rows[:3]
    expected = ids[numpy_top_k(queries, rows, k)]
    ann = two_tower.FaissIndex(nlist=1, nprobe=1)  # one list: exact
    ann.index(given_blocks, given_ids)
    np.testing.assert_array_equal(ann.search(queries, k=k)[0], expected)


# --------------------------------------------------------------------------
# FaissIndex.save and load


@pytest.fixture
def saved(tmp_path):
    index = exhaustive()
    index.index(catalogue(), np.arange(300) + 7)
    folder = tmp_path / "ann"
    index.save(folder)
    return folder


def member(folder, prefix):
    (name,) = [name for name in os.listdir(folder) if name.startswith(prefix)]
    return folder / name


def to_legacy(folder):
    """The layout `save` wrote before manifests: index.faiss and candidate_ids.npy."""
    member(folder, "index-").rename(folder / "index.faiss")
    member(folder, "candidate_ids-").rename(folder / "candidate_ids.npy")
    (folder / "faiss_index.json").unlink()


def test_save_writes_a_manifest_and_load_restores(saved):
    names = sorted(os.listdir(saved))
    assert names[0].startswith("candidate_ids-") and names[1] == "faiss_index.json"
    manifest = json.loads((saved / "faiss_index.json").read_text())
    assert manifest["num_candidates"] == 300 and manifest["dim"] == DIM
    rows = catalogue()
    ids, _ = two_tower.FaissIndex.load(saved, nprobe=np.int64(4)).search(rows[:3], k=5)
    np.testing.assert_array_equal(ids, numpy_top_k(rows[:3], rows, 5) + 7)


def flip_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def save_ids(path, ids):
    with open(path, "wb") as handle:
        np.save(handle, ids)


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (
            lambda f: member(f, "index-").write_bytes(member(f, "index-").read_bytes()[:100]),
            ValueError,
            r"index-\w+\.faiss is truncated or damaged: 100 bytes, \d+ recorded at save",
        ),
        (
            lambda f: flip_middle(member(f, "index-")),
            ValueError,
            r"index-\w+\.faiss is damaged or was edited: its SHA-256 differs",
        ),
        (
            lambda f: save_ids(member(f, "candidate_ids-"), np.arange(299)),
            ValueError,
            r"candidate_ids-\w+\.npy is truncated or damaged",
        ),
        (
            lambda f: member(f, "candidate_ids-").unlink(),
            FileNotFoundError,
            r"candidate_ids-\w+\.npy, named in faiss_index\.json, is missing",
        ),
        (
            lambda f: (f / "faiss_index.json").write_text("{"),
            ValueError,
            r"faiss_index\.json is damaged or not a FaissIndex manifest",
        ),
    ],
)
def test_damaged_saves_name_the_file(saved, damage, error, message):
    damage(saved)
    with pytest.raises(error, match=re.escape(str(saved)) + ".*" + message):
        two_tower.FaissIndex.load(saved)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: (f / "index.faiss").write_bytes((f / "index.faiss").read_bytes()[:100]),
            r"index\.faiss is truncated or corrupt \(faiss: .*read error",
        ),
        (
            lambda f: (f / "index.faiss").write_bytes(b"\x00" * 64),
            r"index\.faiss is truncated or corrupt \(faiss: ",
        ),
        (
            lambda f: save_ids(f / "candidate_ids.npy", np.arange(299)),
            r"holds 300 vectors but candidate_ids\.npy holds ids of shape \(299,\)",
        ),
        (
            lambda f: save_ids(f / "candidate_ids.npy", np.zeros(300, "int64")),
            r"candidate_ids\.npy: `candidate_ids` must be unique",
        ),
        (
            lambda f: save_ids(f / "candidate_ids.npy", np.arange(300.0)),
            r"candidate_ids\.npy: `candidate_ids` must be integers or strings",
        ),
        (
            lambda f: (f / "candidate_ids.npy").write_bytes(
                (f / "candidate_ids.npy").read_bytes()[:500]
            ),
            r"candidate_ids\.npy is not a readable array of ids",
        ),
    ],
)
def test_damaged_saves_without_a_manifest_name_the_file(saved, damage, message):
    to_legacy(saved)
    damage(saved)
    with pytest.raises(ValueError, match=re.escape(str(saved)) + ".*" + message):
        two_tower.FaissIndex.load(saved)


def test_a_folder_saved_before_manifests_still_loads(saved):
    to_legacy(saved)
    rows = catalogue()
    ids, _ = two_tower.FaissIndex.load(saved, nprobe=4).search(rows[:3], k=5)
    np.testing.assert_array_equal(ids, numpy_top_k(rows[:3], rows, 5) + 7)
    # Saving into it replaces the old layout.
    two_tower.FaissIndex.load(saved).save(saved)
    assert "index.faiss" not in os.listdir(saved) and len(os.listdir(saved)) == 3


def test_save_and_load_paths_are_named(saved, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"file\.txt is a file; pass a folder"):
        two_tower.FaissIndex.load(saved).save(file)
    with pytest.raises(FileNotFoundError, match=r"file\.txt: it is a file, not a folder"):
        two_tower.FaissIndex.load(file)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder"):
        two_tower.FaissIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"index\.faiss is missing: not a saved FaissIndex"):
        two_tower.FaissIndex.load(tmp_path / "empty")


KILLED_FAISS_SAVES = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    from two_tower.retrieval import faiss_index
    from two_tower.retrieval.faiss_index import FaissIndex

    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(300, 8)).astype("float32")
    queries = rows[:3]
    old, new = FaissIndex(nlist=4, nprobe=4), FaissIndex(nlist=4, nprobe=4)
    old.index(rows, np.arange(300))
    new.index(rows[::-1].copy(), np.arange(300) + 10_000)
    old.save(folder)
    answers = {"old": old.search(queries, 5)[0].tolist(), "new": new.search(queries, 5)[0].tolist()}

    def kill_at(point):
        # Every step of `save` counts: before and after each write, flush,
        # rename and cleanup, and a faiss file cut in the middle of its write.
        step = iter(range(10**6))

        def wrap(function):
            def wrapped(*args, **kwargs):
                if next(step) == point:
                    os.kill(os.getpid(), signal.SIGKILL)
                result = function(*args, **kwargs)
                if next(step) == point:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            return wrapped

        faiss = faiss_index._faiss()
        write_index = faiss.write_index

        def write_half(index, path):
            write_index(index, path)
            if next(step) == point:
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        faiss.write_index = wrap(write_half)
        np.save = wrap(np.save)
        for name in ("_fsync", "_size_and_hash", "_remove_stale_files"):
            setattr(faiss_index, name, wrap(getattr(faiss_index, name)))
        faiss_index.os.replace = wrap(os.replace)
        new.save(folder)

    found = []
    for point in range(200):
        child = os.fork()
        if child == 0:
            kill_at(point)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        ids = FaissIndex.load(folder).search(queries, 5)[0].tolist()
        version = [key for key, value in answers.items() if value == ids]
        found.append({"killed": os.WIFSIGNALED(status), "version": version,
                      "files": len(os.listdir(folder))})
        if not os.WIFSIGNALED(status):
            break
        old.save(folder)  # back to the old version for the next kill
    print(json.dumps(found))
    """
)


@pytest.mark.slow
@posix_only
def test_a_faiss_save_killed_at_any_point_leaves_the_old_or_the_new_index(tmp_path):
    folder = tmp_path / "ann"
    # One thread: the child forks a process for each kill point.
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), OMP_NUM_THREADS="1")
    child = subprocess.run(
        [sys.executable, "-c", KILLED_FAISS_SAVES, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    found = json.loads(child.stdout.splitlines()[-1])
    killed = [entry for entry in found if entry["killed"]]
    assert len(killed) >= 15 and not found[-1]["killed"], found
    assert all(len(entry["version"]) == 1 for entry in found), found
    versions = [entry["version"][0] for entry in killed]
    assert {"old", "new"} <= set(versions), versions  # killed before and after the commit
    assert found[-1]["version"] == ["new"] and found[-1]["files"] == 3
    # Killed saves left files behind; each next save removed them.
    assert max(entry["files"] for entry in killed) > 3


# --------------------------------------------------------------------------
# Damaged `.keras` files


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    model = two_tower.TwoTowerRetrieval(keras.layers.Embedding(9, 4), keras.layers.Embedding(40, 4))
    model.embed_queries(np.arange(2))
    model.index_candidates(np.arange(40), np.arange(40) + 100)
    path = tmp_path_factory.mktemp("keras") / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
        comment = archive.comment
    return path, members, comment, model.recommend(np.arange(9), k=5)


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def rezip(path, members, comment):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.comment = comment


EMBEDDINGS = "assets/candidate_index/candidate_embeddings.npy"
IDS = "assets/candidate_index/candidate_ids.npy"


def cut(data):
    return data[: len(data) // 2]


# (name, change to the members, message with a manifest, message without one)
DAMAGE = [
    (
        "config cut",
        {"config.json": cut},
        r"'config\.json' holds \d+ bytes, \d+ recorded at save",
        r"'config\.json' is not valid JSON",
    ),
    (
        "config a list",
        {"config.json": lambda d: b"[]"},
        r"'config\.json' holds 2 bytes",
        r"'config\.json' holds a list, not a model config",
    ),
    (
        "weights garbage",
        {"model.weights.h5": lambda d: bytes(len(d))},
        r"'model\.weights\.h5' differs from what was saved \(SHA-256",
        r"'model\.weights\.h5' is not an HDF5 file",
    ),
    (
        "weights cut",
        {"model.weights.h5": cut},
        r"'model\.weights\.h5' holds \d+ bytes",
        r"'model\.weights\.h5' is not a readable HDF5 file \(.*truncated",
    ),
    (
        "weights missing",
        {"model.weights.h5": None},
        r"'model\.weights\.h5' is missing",
        r"no weights member",
    ),
    (
        "embeddings cut",
        {EMBEDDINGS: lambda d: d[:-20]},
        r"candidate_embeddings\.npy' holds \d+ bytes, \d+ recorded",
        r"candidate_embeddings\.npy' holds \d+ bytes but its header, an array of shape \(40, 4\)",
    ),
    (
        "embeddings NaN",
        {EMBEDDINGS: lambda d: npy(np.full((40, 4), np.nan, "float32"))},
        r"candidate_embeddings\.npy' differs",
        r"candidate_embeddings\.npy' holds NaN or infinite",
    ),
    (
        "embeddings missing",
        {EMBEDDINGS: None},
        r"candidate_embeddings\.npy' is missing",
        r"candidate_embeddings\.npy' is missing \(its pair",
    ),
    (
        "embeddings objects",
        {EMBEDDINGS: lambda d: npy(np.array([None] * 40))},
        r"candidate_embeddings\.npy' holds \d+ bytes",
        r"candidate_embeddings\.npy' holds Python objects",
    ),
    (
        "ids cut",
        {IDS: lambda d: d[:-20]},
        r"candidate_ids\.npy' holds \d+ bytes",
        r"candidate_ids\.npy' holds \d+ bytes but its header",
    ),
    (
        "an id lost",
        {IDS: lambda d: npy(np.arange(39) + 100)},
        r"candidate_ids\.npy' holds \d+ bytes",
        r"candidate_ids\.npy' holds ids of shape \(39,\) for the 40 rows",
    ),
    (
        "ids repeated",
        {IDS: lambda d: npy(np.zeros(40, "int64"))},
        r"candidate_ids\.npy' differs",
        r"candidate_ids\.npy' is not a valid id list: `candidate_ids` must be unique",
    ),
    (
        "ids floats",
        {IDS: lambda d: npy(np.arange(40.0))},
        r"candidate_ids\.npy' differs",
        r"must be integers or strings",
    ),
    (
        "ids missing",
        {IDS: None},
        r"candidate_ids\.npy' is missing",
        r"candidate_ids\.npy' is missing \(its pair",
    ),
    (
        "a member added",
        {"notes.txt": lambda d: b"hello"},
        r"'notes\.txt' was not written by save_model",
        None,
    ),
]


@pytest.mark.parametrize(
    "name, changes, message, legacy_message", DAMAGE, ids=[d[0] for d in DAMAGE]
)
def test_a_damaged_keras_member_is_named(
    keras_file, tmp_path, name, changes, message, legacy_message
):
    path, members, comment, _ = keras_file
    members = dict(members)
    for member_name, change in changes.items():
        if change is None:
            del members[member_name]
        else:
            members[member_name] = change(members.get(member_name, b""))
    damaged = tmp_path / "damaged.keras"
    # With the manifest `save_model` writes, and without (Keras' own saves, older files).
    for manifest, expected in ((comment, message), (b"", legacy_message)):
        rezip(damaged, members, manifest)
        if expected is None:  # no manifest to say what belongs: an extra member is harmless
            continue
        with pytest.raises(ValueError, match=re.escape(str(damaged)) + ".*" + expected):
            saving.load_model(damaged)


def test_a_keras_file_without_a_manifest_still_loads(keras_file, tmp_path):
    path, members, _, recommended = keras_file
    legacy = tmp_path / "legacy.keras"
    rezip(legacy, members, b"")  # as keras.saving.save_model, or two_tower before manifests
    np.testing.assert_array_equal(
        saving.load_model(legacy).recommend(np.arange(9), k=5), recommended
    )


def test_a_damaged_manifest_or_a_non_zip_is_named(keras_file, tmp_path):
    path, members, comment, _ = keras_file
    damaged = tmp_path / "manifest.keras"
    rezip(damaged, members, comment[:-10])
    with pytest.raises(
        ValueError, match=r"its manifest \(the zip comment written by save_model\) is damaged"
    ):
        saving.load_model(damaged)
    text = tmp_path / "text.keras"
    text.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(
        ValueError,
        match=re.escape(str(text))
        + r": the file is truncated or corrupt\. A `\.keras` file is a zip archive",
    ):
        saving.load_model(text)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_any_changed_byte_of_any_member_is_named(keras_file, tmp_path_factory, data):
    path, members, comment, _ = keras_file
    name = data.draw(st.sampled_from(sorted(members)))
    content = bytearray(members[name])
    offset = data.draw(st.integers(0, len(content) - 1))
    content[offset] ^= data.draw(st.integers(1, 255))
    damaged = tmp_path_factory.mktemp("byte") / "damaged.keras"
    rezip(damaged, {**members, name: bytes(content)}, comment)
    with pytest.raises(
        ValueError, match=f"its member {re.escape(repr(name))} differs from what was saved"
    ):
        saving.load_model(damaged)
