"""Vocabulary: raw ids and strings to indices, identical on every backend."""

import json
import zlib

import keras
import numpy as np
import pytest

import two_tower


def test_adapt_orders_by_count_then_value_and_filters():
    vocab = two_tower.Vocabulary(num_oov_buckets=2, min_count=2, max_size=3)
    vocab.adapt(np.array(["b", "a", "c", "a", "b", "d", "d", "e", "", ""]))
    # counts: a2 b2 d2 c1 e1 ("" is never a value)
    assert vocab.vocabulary.tolist() == ["a", "b", "d"]
    assert vocab.size == 5
    assert vocab(np.array(["a", "b", "d"])).tolist() == [2, 3, 4]


def test_unseen_values_go_to_stable_oov_buckets():
    vocab = two_tower.Vocabulary([10, 20, 30], num_oov_buckets=4)
    raw = np.array([[20, 2**40], [-7, 30]], dtype="int64")
    expected_oov = [zlib.crc32(int(v).to_bytes(8, "little", signed=True)) % 4 for v in (2**40, -7)]
    assert vocab(raw).tolist() == [[5, expected_oov[0]], [expected_oov[1], 6]]
    words = two_tower.Vocabulary(["x"], num_oov_buckets=3)
    assert words(np.array(["", "zz"])).tolist() == [0, zlib.crc32(b"zz") % 3]


def test_oov_indices_never_crash_a_gather_on_any_backend():
    vocab = two_tower.Vocabulary(["a", "b"], num_oov_buckets=2)
    table = np.arange(vocab.size * 3, dtype="float32").reshape(vocab.size, 3)
    embedding = keras.layers.Embedding(vocab.size, 3)
    embedding.build((None,))
    embedding.embeddings.assign(table)
    raw = np.array(["b", "never seen", "", "a", "also new"])
    indices = vocab(raw)
    assert indices.min() >= 0 and indices.max() < vocab.size
    out = keras.ops.convert_to_numpy(embedding(indices))
    np.testing.assert_array_equal(out, table[indices])


def test_config_round_trip_through_json():
    vocab = two_tower.Vocabulary(num_oov_buckets=3)
    vocab.adapt(np.array([5, 5, 7, 9, 9, 9]))
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(vocab)))
    restored = keras.saving.deserialize_keras_object(config)
    raw = np.array([9, 5, 7, 123, -1])
    np.testing.assert_array_equal(restored(raw), vocab(raw))
    assert restored.get_config() == vocab.get_config()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocabulary": ["a", "a"]}, r"unique.*\['a'\]"),
        ({"vocabulary": ["a", ""]}, "empty string"),
        ({"vocabulary": [1.5, 2.5]}, "integers or strings"),
        ({"num_oov_buckets": 0}, "num_oov_buckets"),
        ({"vocabulary": [1, "a"]}, "all integers or all strings"),
    ],
)
def test_bad_vocabularies_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_tower.Vocabulary(**kwargs)


def test_bad_lookups_raise():
    with pytest.raises(ValueError, match="vocabulary is empty"):
        two_tower.Vocabulary()(np.array([1]))
    with pytest.raises(ValueError, match="dtype"):
        two_tower.Vocabulary([1, 2])(np.array(["1"]))
    with pytest.raises(ValueError, match="integers or strings"):
        two_tower.Vocabulary([1, 2])(np.array([np.nan]))
