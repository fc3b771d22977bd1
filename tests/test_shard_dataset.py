"""Streaming training from `.npy` shards: same batches as in memory, checked ids and files."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import two_tower
from two_tower.datasets import ShardDataset, synthetic

USERS, ITEMS = 60, 40


@pytest.fixture
def log_folder(tmp_path):
    log = synthetic.SyntheticLog(num_users=USERS, num_items=ITEMS, num_clusters=4, seed=2)
    return synthetic.write_shards(log, tmp_path / "log", 700, shard_size=300), log


def shard_file(folder, shard, column):
    """The path of a column of the `shard`-th shard, as the manifest names it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["shards"][shard]["name"] / f"{column}.npy"


def _streamed_and_in_memory_weights(dataset, x, epochs, loss="softmax", y=None):
    """Weights after fitting the same model from `dataset` and from arrays `x` (batch 64)."""
    weights, initial = [], None
    for streamed in (False, True):
        keras.utils.set_random_seed(3)  # the same negative sampler for both models
        options = {"num_sampled_negatives": 5} if loss == "sampled_softmax" else {}
        model = two_tower.TwoTowerRetrieval.from_ids(USERS, ITEMS, 8, loss=loss, **options)
        model.compile(optimizer=keras.optimizers.Adam(0.01), steps_per_execution=1)
        model.embed_queries(np.arange(2))
        model.embed_candidates(np.arange(2))
        initial = model.get_weights() if initial is None else initial
        model.set_weights(initial)
        if streamed:
            # fit's own shuffle would permute the order of the dataset's batches.
            model.fit(dataset, epochs=epochs, shuffle=False, verbose=0)
        else:
            model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    return weights


def add_rating_column(folder):
    """Writes a float `rating` column into every shard; returns it concatenated."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["columns"]["rating"] = "float32"
    ratings = []
    for shard in manifest["shards"]:
        users = np.load(folder / shard["name"] / "user.npy")
        items = np.load(folder / shard["name"] / "item.npy")
        rating = ((users + items) % 5 + 1).astype("float32")
        np.save(folder / shard["name"] / "rating.npy", rating)
        shard["sha256"]["rating"] = two_tower.saving._files.sha256(
            folder / shard["name"] / "rating.npy"
        )
        ratings.append(rating)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return np.concatenate(ratings)


@pytest.mark.parametrize("loss", two_tower.models.retrieval_task.LOSSES)
def test_unshuffled_streaming_trains_like_in_memory_fit(log_folder, loss):
    folder, log = log_folder
    data = log.to_arrays(700, chunk_size=300)
    ratings = add_rating_column(folder)  # mse trains on labels: ShardDataset(label=)
    weights = _streamed_and_in_memory_weights(
        ShardDataset(
            folder, batch_size=64, shuffle=False, label="rating" if loss == "mse" else None
        ),
        {"query": data["user"], "candidate": data["item"]},
        epochs=2,
        loss=loss,
        y=ratings if loss == "mse" else None,
    )
    for expected, actual in zip(*weights, strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


def test_each_shuffled_epoch_is_a_seeded_permutation_of_the_log(log_folder):
    folder, log = log_folder
    data = log.to_arrays(700, chunk_size=300)
    keys = set(zip(data["user"].tolist(), data["timestamp"].tolist(), strict=True))
    dataset = ShardDataset(folder, batch_size=64, columns={"u": "user", "t": "timestamp"})
    epochs = []
    for _ in range(2):
        batches = [dataset[i] for i in range(len(dataset))]
        users = np.concatenate([b["u"] for b in batches])
        times = np.concatenate([b["t"] for b in batches])
        assert set(zip(users.tolist(), times.tolist(), strict=True)) == keys
        assert len(times) == 700 == len(set(times.tolist()))
        epochs.append(times)
        dataset.on_epoch_end()
    assert not np.array_equal(epochs[0], epochs[1])
    again = ShardDataset(folder, batch_size=64, columns={"u": "user", "t": "timestamp"})
    np.testing.assert_array_equal(np.concatenate([again[i]["t"] for i in range(11)]), epochs[0])


def test_out_of_range_ids_name_the_shard_and_row(log_folder):
    folder, _ = log_folder
    path = shard_file(folder, 1, "item")
    items = np.load(path)
    items[17] = ITEMS + 5
    np.save(path, items)
    message = r"shard-00001 holds 45 at row 17; ids must lie in \[0, 40\)"
    with pytest.raises(ValueError, match=message):
        ShardDataset(folder, batch_size=100, shuffle=False, verify=False)
    # Batch by batch too (e.g. limits given after the data was made).
    dataset = ShardDataset(
        folder, batch_size=100, shuffle=False, verify=False, id_limits={"item": 50}
    )
    dataset.id_limits["item"] = ITEMS
    dataset[0], dataset[2]  # rows 0-299: shard 0 only
    with pytest.raises(ValueError, match=message):
        dataset[3]


def test_bad_files_get_errors_naming_them(log_folder, tmp_path):
    folder, _ = log_folder
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardDataset(tmp_path)
    target = shard_file(folder, 2, "user")
    original = target.read_bytes()
    target.write_bytes(original[:-40])  # truncated: the sizes say so, cheaply, either way
    for verify in (True, False):
        with pytest.raises(
            ValueError, match=r"shard-00002.user\.npy has 488 bytes; the manifest says 528"
        ):
            ShardDataset(folder, verify=verify)
    flipped = bytearray(original)
    flipped[-1] ^= 1  # same size, other content: only the hash sees it
    target.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"shard-00002.user\.npy does not match its sha256"):
        ShardDataset(folder)
    target.write_bytes(original)
    shard_file(folder, 0, "item").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00000.item\.npy is missing"):
        ShardDataset(folder)
    with pytest.raises(ValueError, match=r"no column\(s\) \['genre'\]"):
        ShardDataset(folder, columns={"query": "genre"})
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(ValueError, match="'shards' must be a non-empty list"):
        ShardDataset(folder)
    with pytest.raises(ValueError, match="batch_size"):
        ShardDataset(folder, batch_size=0)


def test_an_id_column_of_floats_is_refused_naming_the_file(log_folder):
    folder, _ = log_folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["columns"]["item"] = "float32"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for shard in range(3):
        path = shard_file(folder, shard, "item")
        np.save(path, np.load(path).astype("float32"))
        del manifest["shards"][shard]["bytes"]  # as a hand-made log would have it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard-00000.item\.npy holds float32 values.*integers"):
        ShardDataset(folder, verify=False)


def test_logq_probabilities_come_from_one_pass_and_train_like_in_memory(log_folder):
    folder, log = log_folder
    data = log.to_arrays(700, chunk_size=300)
    frequency = np.bincount(data["item"], minlength=ITEMS) / 700
    dataset = ShardDataset(folder, batch_size=64, shuffle=False, sampling_probability="item")
    np.testing.assert_allclose(
        dataset[1]["candidate_sampling_probability"], frequency[data["item"][64:128]], rtol=1e-6
    )
    x = {
        "query": data["user"],
        "candidate": data["item"],
        "candidate_sampling_probability": frequency[data["item"]].astype("float32"),
    }
    weights = _streamed_and_in_memory_weights(dataset, x, epochs=1)
    for expected, actual in zip(*weights, strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sampling_probability"):
        ShardDataset(folder, sampling_probability="timestamp")


def test_row_sparse_tables_train_from_a_shuffled_stream(log_folder):
    folder, _ = log_folder
    model = two_tower.TwoTowerRetrieval.from_ids(USERS, ITEMS, 8, sparse=True, loss="softmax")
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    history = model.fit(ShardDataset(folder, batch_size=64), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2 * 11


def _epoch_batches(folder, epochs, **kwargs):
    """Each epoch's batches as `PyDataset` indexing gives them (the reference order)."""
    reference = ShardDataset(folder, batch_size=64, **kwargs)
    out = []
    for _ in range(epochs):
        out.append([reference[i] for i in range(len(reference))])
        reference.on_epoch_end()
    return out


def test_shuffled_epochs_train_in_the_datasets_order_across_fit_calls(log_folder):
    # On TensorFlow `fit` reads the dataset through tf.data (one call per shard); on
    # every backend the batches must be dataset[0], dataset[1], ... epoch after
    # epoch, including across `fit` calls, and fit must not reorder them itself.
    folder, _ = log_folder
    epochs = _epoch_batches(folder, 3, sampling_probability="item")
    models, initial = [], None
    for streamed in (True, False):
        model = two_tower.TwoTowerRetrieval.from_ids(USERS, ITEMS, 8, loss="softmax")
        model.compile(optimizer=keras.optimizers.SGD(0.5), steps_per_execution=1)
        model.embed_queries(np.arange(2))
        model.embed_candidates(np.arange(2))
        initial = model.get_weights() if initial is None else initial
        model.set_weights(initial)
        if streamed:
            dataset = ShardDataset(folder, batch_size=64, sampling_probability="item")
            model.fit(dataset, epochs=2, verbose=0)  # shuffle left out: taken as False
            model.fit(dataset, epochs=1, verbose=0)
        else:
            for batches in epochs:
                x = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
                model.fit(x, batch_size=64, epochs=1, shuffle=False, verbose=0)
        models.append(model)
    for actual, expected in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"fit\(shuffle=True\) would reorder a ShardDataset"):
        models[0].fit(ShardDataset(folder, batch_size=64), shuffle=True, verbose=0)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the tf.data pipeline of the TensorFlow backend"
)
def test_tensorflow_streams_the_same_batches_one_call_per_shard(log_folder):
    from two_tower.backends import tensorflow as tf_backend

    folder, _ = log_folder
    expected = _epoch_batches(folder, 2)
    dataset = ShardDataset(folder, batch_size=64)
    calls = []
    shard = dataset.epoch_shard
    dataset.epoch_shard = lambda position: calls.append(position) or shard(position)
    stream = tf_backend.fit_input(dataset)
    assert int(stream.cardinality()) == len(dataset) == 11
    for batches in expected:  # 700 rows in shards of 300, 300, 100: batches straddle shards
        got = list(stream.as_numpy_iterator())
        assert len(got) == len(batches)
        for mine, theirs in zip(got, batches, strict=True):
            assert sorted(mine) == sorted(theirs)
            for key in theirs:
                np.testing.assert_array_equal(mine[key], theirs[key])
    assert len(calls) == 2 * 3
    assert tf_backend.fit_input({"query": 1}) == {"query": 1}


def test_an_epoch_ends_only_after_its_last_batch(log_folder):
    folder, _ = log_folder
    dataset = ShardDataset(folder, batch_size=64)
    first = dataset[0]["query"]
    dataset.on_epoch_end()  # not finished: Keras' extra calls do not skip an order
    np.testing.assert_array_equal(dataset[0]["query"], first)
    assert dataset.epoch == 0 and dataset.peek()["query"][0] == first[0]
    for index in range(len(dataset)):
        dataset[index]
    assert dataset.epoch == 0
    assert not np.array_equal(dataset[0]["query"], first)  # a new pass: epoch 1
    assert dataset.epoch == 1
    dataset.on_epoch_end()
    assert dataset.epoch == 1


def test_evaluate_reads_a_stream_like_arrays(log_folder):
    folder, log = log_folder
    data = log.to_arrays(700, chunk_size=300)
    model = two_tower.TwoTowerRetrieval.from_ids(USERS, ITEMS, 8, loss="softmax")
    model.compile(optimizer="adam")
    x = {"query": data["user"], "candidate": data["item"]}
    expected = model.evaluate(x, batch_size=64, verbose=0)
    streamed = model.evaluate(ShardDataset(folder, batch_size=64, shuffle=False), verbose=0)
    np.testing.assert_allclose(streamed, expected, rtol=1e-5)
