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
    with pytest.raises(ValueError, match=r"vocabulary is not set: call `adapt\(data\)`"):
        two_tower.Vocabulary()(np.array([1]))
    with pytest.raises(ValueError, match="`inputs` of dtype <U1 cannot be looked up.*int64"):
        two_tower.Vocabulary([1, 2])(np.array(["1"]))
    with pytest.raises(ValueError, match="`inputs` must hold integers or strings.*float64"):
        two_tower.Vocabulary([1, 2])(np.array([np.nan]))
    with pytest.raises(ValueError, match=r"`inputs` must be all integers or all strings.*'int'"):
        two_tower.Vocabulary([1, 2])([1, "a"])


def crc32_bucket(value, num_oov_buckets):
    """The documented OOV rule, written out independently of the library."""
    if value == "":
        return 0
    data = (
        value.encode("utf-8")
        if isinstance(value, str)
        else value.to_bytes(8, "little", signed=True)
    )
    return zlib.crc32(data) % num_oov_buckets


def adapted(data, **kwargs):
    vocab = two_tower.Vocabulary(**kwargs)
    vocab.adapt(data)
    return vocab


@pytest.mark.parametrize(
    "make",
    [
        lambda: adapted(np.array([1, 2]), num_oov_buckets=3, min_count=5),  # nothing frequent
        lambda: two_tower.Vocabulary([], num_oov_buckets=3),
        lambda: two_tower.Vocabulary(np.array([], dtype="int64"), num_oov_buckets=3),
    ],
    # adapt() on data with no values at all (only "", or nothing) is refused since issue 30
    # (tests/test_bad_input_model.py): pure hashing is asked for with `Vocabulary([])`.
    ids=["adapt_min_count", "empty_list", "empty_int_array"],
)
def test_an_empty_vocabulary_maps_every_value_to_its_oov_bucket(make):
    vocab = make()
    assert len(vocab.vocabulary) == 0
    assert vocab.size == 3
    integers = [1, 7, -(2**63), 2**63 - 1]
    np.testing.assert_array_equal(vocab(np.array(integers)), [crc32_bucket(v, 3) for v in integers])
    strings = ["a", "", "é", "never seen"]
    np.testing.assert_array_equal(vocab(np.array(strings)), [crc32_bucket(v, 3) for v in strings])
    assert vocab(np.zeros((2, 0), dtype="int64")).shape == (2, 0)
    # A config round trip keeps it empty, with the same mapping.
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(vocab)))
    restored = keras.saving.deserialize_keras_object(config)
    assert restored.get_config() == vocab.get_config()
    assert len(restored.vocabulary) == 0
    np.testing.assert_array_equal(restored(np.array(integers)), vocab(np.array(integers)))
    # One OOV bucket: everything is index 0.
    single = two_tower.Vocabulary([], num_oov_buckets=1)
    np.testing.assert_array_equal(single(np.array([[5, 6]])), np.zeros((1, 2)))


@pytest.mark.parametrize(
    "too_large",
    [
        np.array([2**64 - 1], dtype=np.uint64),
        np.array([3, 2**63], dtype=np.uint64),
        [np.uint64(2**63)],
        [2**64],
        [2**70, 1],
        [-(2**63) - 1],
        2**64,
    ],
    ids=[
        "uint64_max",
        "uint64_2_63",
        "numpy_scalar",
        "int_2_64",
        "int_2_70",
        "below_min",
        "scalar",
    ],
)
def test_integers_outside_int64_raise_instead_of_wrapping(too_large):
    # The wrapped value of 2**64 - 1 is -1: a known value, which must not be returned.
    vocab = two_tower.Vocabulary([1, -1, 0, -(2**63)], num_oov_buckets=3)
    with pytest.raises(ValueError, match=r"Integer `inputs` must fit in int64.*Received \["):
        vocab(too_large)
    with pytest.raises(ValueError, match=r"Integer `vocabulary` must fit in int64"):
        two_tower.Vocabulary(too_large)
    with pytest.raises(ValueError, match=r"Integer `data` must fit in int64"):
        two_tower.Vocabulary().adapt(too_large)


def test_int64_extremes_and_small_uint64_values_are_looked_up():
    extremes = [-(2**63), 2**63 - 1, 0]
    vocab = two_tower.Vocabulary(extremes, num_oov_buckets=2)
    assert vocab(extremes).tolist() == [2, 3, 4]
    assert vocab(np.array([2**63 - 1, 0], dtype=np.uint64)).tolist() == [3, 4]
    assert vocab([np.uint64(2**63 - 1)]).tolist() == [3]
    with pytest.raises(ValueError, match=r"Received \[9223372036854775808\]"):
        vocab([2**63])


def test_bytes_are_utf8_text():
    vocab = two_tower.Vocabulary(np.array([b"x", b"\xc3\xa9"]), num_oov_buckets=5)
    assert vocab.vocabulary.tolist() == ["x", "é"]
    assert vocab(np.array(["é", "x"])).tolist() == [6, 5]
    assert vocab(np.array([[b"\xc3\xa9"], [b"x"]])).tolist() == [[6], [5]]
    assert vocab([b"x", "é"]).tolist() == [5, 6]  # a list of bytes and str
    # Unknown bytes go to the bucket of the text they encode.
    unknown = "ünknown"
    assert vocab(np.array([unknown.encode("utf-8"), b""])).tolist() == [
        crc32_bucket(unknown, 5),
        0,
    ]
    words = adapted(np.array([b"\xc3\xa9", b"a", b"\xc3\xa9", b""]))
    assert words.vocabulary.tolist() == ["é", "a"]


@pytest.mark.parametrize("bad", [np.array([b"x", b"\xff"]), [b"x", b"\xff"]], ids=["array", "list"])
def test_bytes_that_are_not_utf8_raise_naming_the_value(bad):
    match = r"Bytes in `{}` must be UTF-8 text. Received b'\\xff', which is not valid UTF-8"
    with pytest.raises(ValueError, match=match.format("vocabulary")):
        two_tower.Vocabulary(bad)
    with pytest.raises(ValueError, match=match.format("data")):
        two_tower.Vocabulary().adapt(bad)
    with pytest.raises(ValueError, match=match.format("inputs")):
        two_tower.Vocabulary(["x"])(bad)


def test_padding_maps_to_minus_one_and_is_never_a_value():
    vocab = two_tower.Vocabulary(num_oov_buckets=2, padding="")
    vocab.adapt(np.array([["drama", ""], ["comedy", "drama"], ["", ""]]))
    assert vocab.vocabulary.tolist() == ["drama", "comedy"]  # "" is not counted
    raw = np.array([["comedy", ""], ["western", "drama"]])
    expected = [[3, -1], [zlib.crc32(b"western") % 2, 2]]
    assert vocab(raw).tolist() == expected
    ids = two_tower.Vocabulary(padding=-1)
    ids.adapt(np.array([7, -1, -1, -1, 7, 9]))
    assert ids.vocabulary.tolist() == [7, 9]
    assert ids(np.array([9, -1, 8])).tolist() == [2, -1, 0]
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(vocab)))
    )
    assert restored.padding == "" and restored(raw).tolist() == expected


def test_the_empty_string_without_padding_is_an_unknown_value():
    """The documented rule: `""` shares OOV bucket 0 (a learned row) unless it is padding."""
    vocab = two_tower.Vocabulary(["a"], num_oov_buckets=3)
    assert vocab(np.array(["", "a"])).tolist() == [0, 3]
    tower = two_tower.FeatureTower(
        multivalued={"genre": vocab.size}, combiner="sum", output_dim=None, embedding_dim=2
    )
    padded = two_tower.Vocabulary(["a"], num_oov_buckets=3, padding="")
    table = np.arange(8, dtype="float32").reshape(4, 2)
    tower({"genre": np.array([[3, 3]])})
    tower.embeddings["genre"].embeddings.assign(table)
    with_oov = keras.ops.convert_to_numpy(tower({"genre": vocab(np.array([["a", ""]]))}))
    with_padding = keras.ops.convert_to_numpy(tower({"genre": padded(np.array([["a", ""]]))}))
    np.testing.assert_allclose(with_oov, [(table[3] + table[0]) / 2])
    np.testing.assert_allclose(with_padding, [table[3]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocabulary": ["a", "b"], "padding": "b"}, "padding value 'b'"),
        ({"vocabulary": ["a"], "padding": -1}, "must be of the vocabulary's kind"),
        ({"padding": 1.5}, "`padding` must be a string, an integer or None"),
        ({"padding": True}, "`padding` must be a string, an integer or None"),
    ],
)
def test_bad_padding_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_tower.Vocabulary(**kwargs)


def test_values_of_inverts_known_lookups():
    vocab = two_tower.Vocabulary(["x", "y", "z"], num_oov_buckets=2)
    assert vocab.values_of(vocab(np.array(["z", "x"]))).tolist() == ["z", "x"]
    with pytest.raises(ValueError, match=r"in \[2, 5\).*\[0, 5\]"):
        vocab.values_of(np.array([0, 5]))
