# ruff: noqa: E501  (the tables of bad-input cases read best one case per line)
"""Plausible mistakes with data on disk: shard logs, the synthetic generator, MovieLens.

Each case gets a clear error naming the argument or the damaged file (the message is
asserted), or is accepted with a result checked against NumPy. None of it touches a
model, so every backend gives the same answer; the file runs in every backend session.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from testing import write_movielens
from two_tower.datasets import ShardDataset, movielens, synthetic

USERS, ITEMS, ROWS, SHARD = 20, 30, 250, 100


def generator(**kwargs):
    return synthetic.SyntheticLog(num_users=USERS, num_items=ITEMS, num_clusters=3, **kwargs)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine") / "log"
    return synthetic.write_shards(generator(seed=1), folder, ROWS, shard_size=SHARD)


@pytest.fixture
def log(pristine, tmp_path):
    """A fresh copy of a 250-row log in shards of 100, 100 and 50 rows."""
    return shutil.copytree(pristine, tmp_path / "log")


def edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def shard_file(folder, shard, column):
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["shards"][shard]["name"] / f"{column}.npy"


def read_all(dataset):
    batches = [dataset[i] for i in range(len(dataset))]
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


# ------------------------------------------------------------ damaged manifests
def drop_entry(manifest):
    manifest["shards"].pop(1)


def drop_entry_fix_total(manifest):
    manifest["rows"] -= manifest["shards"].pop(1)["rows"]


def drop_last_fix_total(manifest):
    manifest["rows"] -= manifest["shards"].pop()["rows"]


def duplicate_entry(manifest):
    manifest["shards"][1] = dict(manifest["shards"][0])


def set_key(key, value):
    return lambda manifest: manifest.__setitem__(key, value)


def set_shard_key(key, value):
    return lambda manifest: manifest["shards"][0].__setitem__(key, value)


MANIFEST_CASES = [
    (
        "lost entry",
        drop_entry,
        r"entry 1 is named '.*shard-00002', but the shards must be shard-00000, shard-00001, \.\.\. in order",
    ),
    (
        "lost entry, total edited to match",
        drop_entry_fix_total,
        r"entry 1 must be shard-00001 \(an entry was lost, added or reordered\)",
    ),
    (
        "lost last entry, total edited to match",
        drop_last_fix_total,
        r"Shard folder .*shard-00002 is not listed in .*manifest\.json, which lists 2 shards beside it: the manifest lost an entry",
    ),
    (
        "total edited",
        set_key("rows", 999),
        r"says the log holds rows=999, but its 3 shard entries hold 250 rows",
    ),
    (
        "a shard's count edited",
        set_shard_key("rows", 50),
        r"says the log holds rows=250, but its 3 shard entries hold 200 rows",
    ),
    (
        "a shard's count edited, total too",
        lambda m: (set_shard_key("rows", 50)(m), set_key("rows", 200)(m)),
        r"shard .*shard-00000 holds a row count that shard_size=100 does not allow",
    ),
    (
        "count as text",
        set_shard_key("rows", "100"),
        r"shard entry 0 \(.*shard-00000\) has rows='100', not >= 1",
    ),
    (
        "hashes lost",
        set_shard_key("sha256", None),
        r"shard entry 0 .* has sha256 for None, expected \['item', 'timestamp', 'user'\]",
    ),
    (
        "unknown format",
        set_key("format", "two_tower.synthetic/9"),
        r"has format 'two_tower.synthetic/9'; this version of two_tower reads",
    ),
    (
        "shards not a list",
        set_key("shards", {"a": 1}),
        r"'shards' must be a non-empty list, found \{'a': 1\}",
    ),
    ("no shards", set_key("shards", []), r"'shards' must be a non-empty list, found \[\]"),
    (
        "duplicate entry",
        duplicate_entry,
        r"entry 1 is named '.*shard-00000', but .* entry 1 must be shard-00001",
    ),
    (
        "a name outside the folder",
        set_shard_key("name", "../elsewhere/shard-00000"),
        r"has name '\.\./elsewhere/shard-00000', not a folder inside the log",
    ),
    (
        "columns lost",
        set_key("columns", {}),
        r"'columns' must map column names to dtypes, found \{\}",
    ),
]


@pytest.mark.parametrize(
    ("edit", "match"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES]
)
@pytest.mark.parametrize("verify", [True, False])
def test_a_damaged_manifest_is_refused_naming_it(log, edit, match, verify):
    edit_manifest(log, edit)
    with pytest.raises(ValueError, match=match):
        ShardDataset(log, verify=verify)


def test_a_manifest_that_is_not_json_is_refused(log):
    (log / "manifest.json").write_text('{"shards": [')
    with pytest.raises(
        ValueError, match=r"manifest\.json is not a valid shard log manifest: it is not JSON"
    ):
        ShardDataset(log)


# ------------------------------------------------------------- damaged members
def truncate(path):
    path.write_bytes(path.read_bytes()[:-8])


def pad(path):
    path.write_bytes(path.read_bytes() + b"\0" * 8)


MEMBER_CASES = [
    (
        "emptied",
        lambda p: p.write_bytes(b""),
        ValueError,
        r"shard-00001.item\.npy has 0 bytes; the manifest says 528\. It was truncated, emptied or replaced",
    ),
    (
        "truncated",
        truncate,
        ValueError,
        r"shard-00001.item\.npy has 520 bytes; the manifest says 528",
    ),
    (
        "bytes appended",
        pad,
        ValueError,
        r"shard-00001.item\.npy has 536 bytes; the manifest says 528",
    ),
    (
        "garbage",
        lambda p: p.write_bytes(b"garbage" * 30),
        ValueError,
        r"shard-00001.item\.npy has 210 bytes; the manifest says 528",
    ),
    (
        "another shard's rows",
        lambda p: np.save(p, np.zeros(50, "int32")),
        ValueError,
        r"shard-00001.item\.npy has 328 bytes; the manifest says 528",
    ),
    ("deleted", lambda p: p.unlink(), FileNotFoundError, r"shard-00001.item\.npy is missing"),
    (
        "a folder",
        lambda p: (p.unlink(), p.mkdir()),
        FileNotFoundError,
        r"shard-00001.item\.npy is missing",
    ),
    ("an unread column emptied", None, ValueError, r"shard-00001.timestamp\.npy has 0 bytes"),
]


@pytest.mark.parametrize(
    ("damage", "error", "match"), [c[1:] for c in MEMBER_CASES], ids=[c[0] for c in MEMBER_CASES]
)
@pytest.mark.parametrize("verify", [True, False])
def test_a_damaged_member_is_named_with_or_without_verify(log, damage, error, match, verify):
    if damage is None:  # not streamed: its size is checked all the same
        shard_file(log, 1, "timestamp").write_bytes(b"")
    else:
        damage(shard_file(log, 1, "item"))
    with pytest.raises(error, match=match):
        ShardDataset(log, verify=verify)


def test_a_logs_own_sizes_are_checked_without_the_manifests(log):
    # A hand-made manifest may record no sizes: the header's row count decides.
    edit_manifest(log, lambda m: [shard.pop("bytes") for shard in m["shards"]])
    pad(shard_file(log, 0, "user"))
    with pytest.raises(
        ValueError,
        match=r"shard-00000.user\.npy has 536 bytes, but its header declares 528 \(100 int32 values\)",
    ):
        ShardDataset(log, verify=False)


def test_changed_content_of_the_same_size_needs_verify(log):
    """Documented: only the sha256 (verify=True, the default) sees new values of the same size."""
    path = shard_file(log, 1, "item")
    items = np.load(path)
    np.save(path, (items + 1) % ITEMS)
    with pytest.raises(
        ValueError, match=r"shard-00001.item\.npy does not match its sha256 in manifest\.json"
    ):
        ShardDataset(log)
    read = read_all(ShardDataset(log, verify=False, shuffle=False))["candidate"]
    np.testing.assert_array_equal(read[SHARD : 2 * SHARD], (items + 1) % ITEMS)


def test_a_shard_folder_added_by_hand_is_refused(log):
    first = shard_file(log, 0, "user").parent
    shutil.copytree(first, first.parent / "shard-00007")
    with pytest.raises(ValueError, match=r"Shard folder .*shard-00007 is not listed in"):
        ShardDataset(log)


def test_a_missing_shard_folder_is_named(log):
    shutil.rmtree(shard_file(log, 2, "user").parent)
    with pytest.raises(
        FileNotFoundError,
        match=r"Shard folder .*shard-00002, listed in .*manifest\.json, is missing",
    ):
        ShardDataset(log)


# ---------------------------------------------------------- ShardDataset arguments
ARGUMENT_CASES = [
    (
        {"batch_size": 16.0},
        r"ShardDataset: `batch_size` must be an integer >= 1\. Received: batch_size=16\.0 \(float\)",
    ),
    (
        {"batch_size": True},
        r"`batch_size` must be an integer >= 1\. Received: batch_size=True \(bool\)",
    ),
    ({"batch_size": 0}, r"`batch_size` must be an integer >= 1\. Received: batch_size=0"),
    (
        {"shuffle": "no"},
        r"ShardDataset: `shuffle` must be True or False\. Received: shuffle='no' \(str\)",
    ),
    ({"verify": "no"}, r"`verify` must be True or False\. Received: verify='no'"),
    ({"seed": 1.7}, r"`seed` must be an integer >= 0\. Received: seed=1\.7 \(float\)"),
    ({"seed": -1}, r"`seed` must be an integer >= 0\. Received: seed=-1"),
    (
        {"columns": ["user", "item"]},
        r"`columns` must be a non-empty dict of model input name -> column, e\.g\. .* Received: \['user', 'item'\] \(list\)",
    ),
    ({"columns": {}}, r"`columns` must be a non-empty dict"),
    (
        {"columns": {"query": 1}},
        r"`columns` must map input names \(str\) to column names \(str\), .* Received the entry 'query': 1",
    ),
    (
        {"columns": {"query": "users"}},
        r"has no column\(s\) \['users'\]; it has \['item', 'timestamp', 'user'\]",
    ),
    (
        {"id_limits": {"items": 5}},
        r"`id_limits` names column 'items', which is not streamed: the streamed columns are \['item', 'user'\]",
    ),
    (
        {"id_limits": 30},
        r"`id_limits` must be a dict of column -> number of ids, e\.g\. \{'item': 1000\}\. Received: 30 \(int\)",
    ),
    (
        {"id_limits": {"item": 0}},
        r"`id_limits\['item'\]` must be an integer >= 1\. Received: id_limits\['item'\]=0",
    ),
    (
        {"id_limits": {"item": 30.5}},
        r"`id_limits\['item'\]` must be an integer >= 1\. Received: id_limits\['item'\]=30\.5 \(float\)",
    ),
    (
        {"id_limits": {"item": 5}},
        r"Column 'item' of shard .*shard-00000 holds \d+ at row \d+; ids must lie in \[0, 5\)",
    ),
    (
        {
            "columns": {"query": "user", "candidate": "timestamp"},
            "sampling_probability": "timestamp",
        },
        r"`sampling_probability='timestamp'` needs that column's number of ids, .* pass id_limits=\{'timestamp': <number of ids>\}",
    ),
    (
        {"sampling_probability": "items"},
        r"`sampling_probability` must name one of the streamed columns \['item', 'user'\]\. Received 'items'",
    ),
    (
        {"label": True},
        r"`label` must be a column name \(str\) or None\. Received: label=True \(bool\)",
    ),
    ({"label": "rating"}, r"has no column\(s\) \['rating'\]"),
]


@pytest.mark.parametrize(
    ("kwargs", "match"), ARGUMENT_CASES, ids=[str(c[0]) for c in ARGUMENT_CASES]
)
def test_bad_shard_dataset_arguments_are_named(pristine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShardDataset(pristine, **kwargs)


def test_no_log_at_the_folder_is_named(tmp_path):
    for folder in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(
            FileNotFoundError, match=r"No manifest\.json in .*: expected a sharded log"
        ):
            ShardDataset(folder)


def test_numpy_scalars_and_a_drawn_seed_are_accepted(pristine):
    expected = generator(seed=1).to_arrays(ROWS, chunk_size=SHARD)
    dataset = ShardDataset(
        pristine,
        batch_size=np.int64(16),
        shuffle=np.bool_(False),
        seed=np.int64(3),
        verify=np.bool_(True),
        id_limits={"item": np.int64(ITEMS)},
    )
    assert type(dataset.batch_size) is int and dataset.batch_size == 16 and len(dataset) == 16
    assert dataset.id_limits == {"user": USERS, "item": ITEMS}
    assert type(dataset.id_limits["item"]) is int and type(dataset.seed) is int
    np.testing.assert_array_equal(read_all(dataset)["candidate"], expected["item"])
    shuffled = ShardDataset(pristine, batch_size=64, seed=None)
    assert isinstance(shuffled.seed, int) and shuffled.seed >= 0
    rows = read_all(shuffled)["query"]
    np.testing.assert_array_equal(np.sort(rows), np.sort(expected["user"]))
    again = ShardDataset(pristine, batch_size=64, seed=shuffled.seed)
    np.testing.assert_array_equal(read_all(again)["query"], rows)


# ---------------------------------------------------- SyntheticLog, write_shards
SYNTHETIC_CASES = [
    (
        {"popularity_exponent": float("nan")},
        r"SyntheticLog: `popularity_exponent` must be a finite number >= 0\.0\. Received: popularity_exponent=nan",
    ),
    (
        {"popularity_exponent": float("inf")},
        r"`popularity_exponent` must be a finite number >= 0\.0\. Received: popularity_exponent=inf",
    ),
    ({"popularity_exponent": -1.0}, r"`popularity_exponent` must be a finite number >= 0\.0"),
    (
        {"affinity": float("nan")},
        r"`affinity` must be a finite number in \[0\.0, 1\.0\]\. Received: affinity=nan",
    ),
    (
        {"affinity": "0.5"},
        r"`affinity` must be a finite number in \[0\.0, 1\.0\]\. Received: affinity='0\.5' \(str\)",
    ),
    ({"seed": -1}, r"SyntheticLog: `seed` must be an integer >= 0\. Received: seed=-1"),
    ({"seed": None}, r"`seed` must be an integer >= 0\. Received: seed=None \(NoneType\)"),
    ({"seed": 1.5}, r"`seed` must be an integer >= 0\. Received: seed=1\.5 \(float\)"),
    ({"start_time": 1.5}, r"`start_time` must be an integer.*Received: start_time=1\.5 \(float\)"),
    ({"start_time": "0"}, r"`start_time` must be an integer.*Received: start_time='0' \(str\)"),
    ({"num_clusters": 31}, r"`num_clusters` \(=31\) must not exceed `num_items` \(=30\)"),
]


@pytest.mark.parametrize(
    ("kwargs", "match"), SYNTHETIC_CASES, ids=[str(c[0]) for c in SYNTHETIC_CASES]
)
def test_bad_generator_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.SyntheticLog(
            **{"num_users": USERS, "num_items": ITEMS, "num_clusters": 3, **kwargs}
        )


def test_a_count_given_as_a_float_is_refused():
    with pytest.raises(
        ValueError,
        match=r"`num_users` must be an integer >= 1\. Received: num_users=2\.0 \(float\)",
    ):
        synthetic.SyntheticLog(num_users=2.0, num_items=ITEMS)


@pytest.mark.parametrize("users", [[USERS], [-1], [1.5]])
def test_ideal_scores_refuse_users_outside_the_log(users):
    with pytest.raises(ValueError, match=r"`users` must be integer ids in \[0, 20\)"):
        generator().ideal_scores(users)


def test_numpy_scalars_make_the_same_log_and_a_json_manifest(tmp_path):
    typed = synthetic.SyntheticLog(
        num_users=np.int64(USERS),
        num_items=np.int32(ITEMS),
        num_clusters=np.int64(3),
        popularity_exponent=np.float32(0.5),
        affinity=np.float64(0.7),
        seed=np.int64(4),
    )
    plain = generator(popularity_exponent=float(np.float32(0.5)), affinity=0.7, seed=4)
    assert typed == plain and all(type(v) in (int, float) for v in typed.config().values())
    folder = synthetic.write_shards(typed, tmp_path / "log", np.int64(120), shard_size=np.int64(50))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == 120 and manifest["generator"] == plain.config()
    expected = plain.to_arrays(120, chunk_size=50)
    read = read_all(ShardDataset(folder, batch_size=32, shuffle=False))
    np.testing.assert_array_equal(read["query"], expected["user"])
    np.testing.assert_array_equal(read["candidate"], expected["item"])


def test_bad_write_shards_arguments_are_named(tmp_path, pristine):
    with pytest.raises(
        ValueError,
        match=r"`log` must be a two_tower\.datasets\.synthetic\.SyntheticLog\. Received: dict",
    ):
        synthetic.write_shards({"user": np.arange(3)}, tmp_path / "a", 3)
    with pytest.raises(
        ValueError,
        match=r"write_shards: `num_interactions` must be an integer >= 1\. Received: num_interactions=0",
    ):
        synthetic.write_shards(generator(), tmp_path / "b", 0)
    with pytest.raises(
        ValueError,
        match=r"write_shards: `shard_size` must be an integer >= 1\. Received: shard_size=10\.0",
    ):
        synthetic.write_shards(generator(), tmp_path / "c", 30, shard_size=10.0)
    with pytest.raises(
        ValueError,
        match=r"write_shards: `overwrite` must be True or False\. Received: overwrite='no'",
    ):
        synthetic.write_shards(generator(), pristine, 30, overwrite="no")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True to replace it"):
        synthetic.write_shards(generator(), pristine, 30)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(
        FileExistsError,
        match=r"file is a file, not a log folder; overwrite=True replaces a folder only",
    ):
        synthetic.write_shards(generator(), tmp_path / "file", 30, overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_overwrite_replaces_a_folder_that_holds_no_log(tmp_path):
    """Documented: `overwrite=True` over a folder without a log replaces the whole folder."""
    folder = tmp_path / "log"
    (folder / "shard-00000").mkdir(parents=True)  # e.g. what an older version's killed write left
    (folder / "notes.txt").write_text("old")
    synthetic.write_shards(generator(), folder, 30, shard_size=20, overwrite=True)
    assert not (folder / "notes.txt").exists() and not (folder / "shard-00000").exists()
    np.testing.assert_array_equal(
        read_all(ShardDataset(folder, batch_size=8, shuffle=False))["query"],
        generator().to_arrays(30, chunk_size=20)["user"],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


# ------------------------------------------------------------------- MovieLens
def cut(path, count):
    path.write_bytes(path.read_bytes()[:-count])


@pytest.mark.parametrize("sha256", [None, "official"])
@pytest.mark.parametrize("name", ["u.data", "u.user"])
def test_a_100k_file_cut_inside_its_last_line_is_refused(tmp_path, name, sha256):
    folder = write_movielens(tmp_path / "ml-100k")
    cut(folder / name, 3)  # "881250949\n" -> "8812509": 4 fields still
    with pytest.raises(
        ValueError,
        match=rf"Corrupt or truncated MovieLens file .*{name}: it does not end with a line break, so its last line was cut",
    ):
        movielens.load_tables(folder, sha256=sha256)


def write_large(folder, variant):
    folder.mkdir(parents=True)
    if variant == "1m":
        files = {
            "ratings.dat": "1::1::5::978300760\n1::2::3::978302109\n",
            "movies.dat": "1::Toy Story (1995)::Comedy\n2::Heat (1995)::Action\n",
            "users.dat": "1::F::1::10::48067\n",
        }
    else:
        files = {
            "ratings.csv": "userId,movieId,rating,timestamp\n1,1,3.5,1112486027\n2,2,4.0,1112484676\n",
            "movies.csv": "movieId,title,genres\n1,Toy Story (1995),Comedy\n2,Heat (1995),Action\n",
        }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("variant", ["1m", "20m", "25m"])
def test_a_large_ratings_file_cut_inside_its_last_line_is_refused_with_sha256_none(
    tmp_path, variant
):
    folder = write_large(tmp_path / f"ml-{variant}", variant)
    name = "ratings.dat" if variant == "1m" else "ratings.csv"
    tables = movielens.load_tables(folder, variant=variant, sha256=None)
    np.testing.assert_array_equal(
        tables.ratings["timestamp"][-1], 978302109 if variant == "1m" else 1112484676
    )
    cut(folder / name, 4)  # the last timestamp loses 3 digits and would still parse
    with pytest.raises(
        ValueError, match=rf"MovieLens file .*{name}: it does not end with a line break"
    ):
        movielens.load_tables(folder, variant=variant, sha256=None)


LOADER_CASES = [
    ({"download": "no"}, r"`download` must be True or False\. Received: download='no' \(str\)"),
    (
        {"sha256": True},
        r"`sha256` must be 'official' \(the official release's\), None .* or the 64 hex digits of your archive's sha256\. Received: sha256=True",
    ),
    ({"sha256": "abc"}, r"`sha256` must be 'official'.*Received: sha256='abc'"),
    (
        {"variant": "100K"},
        r"`variant` must be one of \('100k', '1m', '20m', '25m'\)\. Received: '100K'",
    ),
]


@pytest.mark.parametrize(("kwargs", "match"), LOADER_CASES, ids=[str(c[0]) for c in LOADER_CASES])
@pytest.mark.parametrize(
    "loader", [movielens.load_tables, movielens.load_ratings, movielens.load_movies]
)
def test_bad_loader_options_are_named(tmp_path, loader, kwargs, match):
    folder = write_movielens(tmp_path / "ml-100k")
    with pytest.raises(ValueError, match=match):
        loader(folder, **kwargs)


def test_a_data_dir_that_is_not_a_path_is_named():
    with pytest.raises(
        ValueError,
        match=r"`data_dir` must be a path \(str or pathlib\.Path\) or None\. Received: data_dir=5 \(int\)",
    ):
        movielens.load_tables(5)


RECORDS = {"a": np.arange(10), "timestamp": np.arange(10)[::-1].copy()}
SPLIT_CASES = [
    (
        movielens.random_split,
        ({},),
        r"random_split: `records` must be a non-empty dict of name -> array, as load_ratings returns\. Received: dict",
    ),
    (
        movielens.random_split,
        (np.arange(10),),
        r"`records` must be a non-empty dict .* Received: ndarray",
    ),
    (
        movielens.random_split,
        ({"a": np.arange(10), "b": 3},),
        r"every value of `records` must be an array of rows \(at least 1-D\)\. Received shapes \{'a': \(10,\), 'b': \(\)\}",
    ),
    (
        movielens.random_split,
        ({"a": np.arange(10), "b": np.arange(9)},),
        r"all arrays must have the same length\. Received lengths \{'a': 10, 'b': 9\}",
    ),
    (
        movielens.random_split,
        ({"a": np.arange(0)},),
        r"test_fraction=0\.2 of 0 rows leaves 0 rows to train and 0 to test; both parts need at least one row",
    ),
    (
        movielens.random_split,
        ({"a": np.arange(2)}, 0.2),
        r"test_fraction=0\.2 of 2 rows leaves 2 rows to train and 0 to test",
    ),
    (
        movielens.random_split,
        ({"a": np.arange(2)}, 0.8),
        r"test_fraction=0\.8 of 2 rows leaves 0 rows to train and 2 to test",
    ),
    (
        movielens.random_split,
        (RECORDS, float("nan")),
        r"random_split: `test_fraction` must be a finite number\. Received: test_fraction=nan",
    ),
    (
        movielens.random_split,
        (RECORDS, 1),
        r"random_split: `test_fraction` must be in \(0, 1\)\. Received: test_fraction=1",
    ),
    (
        movielens.random_split,
        (RECORDS, 0.2, 1.5),
        r"random_split: `seed` must be an integer >= 0\. Received: seed=1\.5 \(float\)",
    ),
    (
        movielens.random_split,
        (RECORDS, 0.2, -1),
        r"random_split: `seed` must be an integer >= 0\. Received: seed=-1",
    ),
    (
        movielens.temporal_split,
        ({"a": np.arange(5)},),
        r"temporal_split needs a 'timestamp' array in the records\. Received the keys \['a'\]",
    ),
    (
        movielens.temporal_split,
        ({"timestamp": np.array(["9", "10", "11", "8", "7"])}, 0.4),
        r"records\['timestamp'\] must be a 1-D array of numbers \(or datetime64\)\. Received <U2 of shape \(5,\); convert text timestamps",
    ),
    (
        movielens.temporal_split,
        ({"timestamp": np.array([1.0, np.nan, 3.0, 2.0, 5.0])}, 0.4),
        r"records\['timestamp'\] holds NaN \(or NaT\) at row 1",
    ),
    (
        movielens.temporal_split,
        ({"timestamp": np.arange(10).reshape(5, 2)}, 0.4),
        r"must be a 1-D array of numbers .* Received int64 of shape \(5, 2\)",
    ),
]


@pytest.mark.parametrize(
    ("split", "args", "match"),
    SPLIT_CASES,
    ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(SPLIT_CASES)],
)
def test_bad_split_inputs_are_named(split, args, match):
    with pytest.raises(ValueError, match=match):
        split(*args)


def test_splits_accept_numpy_scalars_and_lists():
    train, test = movielens.random_split({"a": list(range(10))}, np.float32(0.2), np.int64(3))
    order = np.random.default_rng(3).permutation(10)
    np.testing.assert_array_equal(train["a"], order[:8])
    np.testing.assert_array_equal(test["a"], order[8:])
    assert isinstance(train["a"], np.ndarray)
    drawn = movielens.random_split(RECORDS, seed=None)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([drawn[0]["a"], drawn[1]["a"]])), np.arange(10)
    )
    train, test = movielens.temporal_split(
        {"timestamp": [5.0, 1.0, 4.0, 2.0, 3.0]}, np.float64(0.4)
    )
    assert test["timestamp"].tolist() == [4.0, 5.0] and train["timestamp"].tolist() == [
        1.0,
        2.0,
        3.0,
    ]
