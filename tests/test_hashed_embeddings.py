"""HashedEmbedding and QuotientRemainderEmbedding: the hash, the lookups, towers in a model.

Expected buckets and rows come from a NumPy reimplementation of the documented
hash (`two_tower.embeddings._hashing`) on Python integers, never from the layers.
"""

import keras
import numpy as np
import pytest

import two_tower
from testing import assert_config_round_trip, run_doc_blocks, save_and_load
from two_tower.embeddings.hashed_embedding import HashedEmbedding
from two_tower.embeddings.quotient_remainder_embedding import QuotientRemainderEmbedding
from two_tower.towers.tower_ids import tower_ids

MASK = 0xFFFFFFFF
EDGE_IDS = [
    -(2**63),
    -(2**63) + 1,
    -(2**32) - 1,
    -(2**31) - 1,
    -(2**31),
    -1,
    0,
    1,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**32 + 7,
    2**62,
    2**63 - 1,
]


def fmix32(word):
    word &= MASK
    word ^= word >> 16
    word = (word * 0x85EBCA6B) & MASK
    word ^= word >> 13
    word = (word * 0xC2B2AE35) & MASK
    return word ^ (word >> 16)


def numpy_buckets(ids, num_buckets, seed=0, num_hashes=1):
    """`[*ids.shape, num_hashes]` buckets, by the documented steps, on Python ints."""
    salts = [fmix32(seed ^ (((index + 1) * 0x9E3779B9) & MASK)) for index in range(num_hashes)]
    ids = np.asarray(ids)
    flat = [
        [(fmix32((int(value) & MASK) ^ salt) & 0x7FFFFFFF) % num_buckets for salt in salts]
        for value in ids.reshape(-1)
    ]
    return np.array(flat, dtype=np.int64).reshape((*ids.shape, num_hashes))


def full_range_ids(count=300, seed=0):
    rng = np.random.default_rng(seed)
    drawn = rng.integers(-(2**63), 2**63 - 1, size=count, dtype=np.int64, endpoint=True)
    return np.concatenate([np.array(EDGE_IDS, dtype=np.int64), drawn])


def table(layer):
    return keras.ops.convert_to_numpy(layer.embeddings)


def test_the_hash_is_the_numpy_reference_bit_for_bit_over_the_int64_range():
    ids = full_range_ids()
    for num_buckets, seed, num_hashes in ((1000, 0, 3), (2**31 - 1, 2**32 - 1, 1), (1, 5, 2)):
        layer = HashedEmbedding(num_buckets, embedding_dim=2, num_hashes=num_hashes, seed=seed)
        np.testing.assert_array_equal(
            layer.bucket_ids(ids), numpy_buckets(ids, num_buckets, seed, num_hashes)
        )


def test_the_buckets_spread_and_depend_on_the_seed():
    ids = np.arange(20_000, dtype=np.int64)
    counts = np.bincount(HashedEmbedding(100, 2).bucket_ids(ids)[:, 0], minlength=100)
    assert counts.min() > 140 and counts.max() < 260  # 200 expected per bucket
    other_seed = HashedEmbedding(100, 2, seed=1).bucket_ids(ids)[:, 0]
    assert np.mean(other_seed == HashedEmbedding(100, 2).bucket_ids(ids)[:, 0]) < 0.05


def test_narrow_integer_ids_hash_like_the_same_int64_values():
    values = np.array([-(2**31), -129, -1, 0, 5, 255, 40_000, 2**31 - 1])
    layer = HashedEmbedding(977, embedding_dim=2, num_hashes=2, seed=3)
    expected = numpy_buckets(values, 977, 3, 2)
    for dtype in ("int64", "int32"):
        np.testing.assert_array_equal(layer.bucket_ids(values.astype(dtype)), expected)
    small = np.array([0, 5, 255], dtype="uint8")
    np.testing.assert_array_equal(layer.bucket_ids(small), numpy_buckets(small, 977, 3, 2))
    np.testing.assert_array_equal(layer.bucket_ids(small.astype("int16")), expected[[3, 4, 5]])


def test_output_is_the_sum_of_the_hashed_rows():
    ids = full_range_ids(40).reshape(5, 11)
    layer = HashedEmbedding(50, embedding_dim=3, num_hashes=3, seed=9)
    output = keras.ops.convert_to_numpy(layer(ids))
    assert output.shape == (5, 11, 3)
    expected = table(layer.embedding)[numpy_buckets(ids, 50, 9, 3)].sum(axis=-2)
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-7)


def test_a_compiled_call_gives_the_same_rows_as_numpy():
    # predict compiles the call (jit, tf.function); JAX without x64 wraps the
    # int64 ids to their low 32 bits, which is all the hash reads.
    ids = full_range_ids(60)
    layer = HashedEmbedding(64, embedding_dim=4, num_hashes=2)
    inputs = keras.Input(shape=(), dtype="int64")
    model = keras.Model(inputs, layer(inputs))
    output = model.predict(ids, batch_size=25, verbose=0)
    expected = table(layer.embedding)[numpy_buckets(ids, 64, 0, 2)].sum(axis=-2)
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-7)


def numpy_quotient_remainder(layer, ids, indices):
    remainder_rows = layer.remainder_rows
    quotient = table(layer.quotient_embedding)[indices // remainder_rows]
    remainder = table(layer.remainder_embedding)[indices % remainder_rows]
    if layer.combiner == "multiply":
        return quotient * remainder
    if layer.combiner == "add":
        return quotient + remainder
    return np.concatenate([quotient, remainder], axis=-1)


@pytest.mark.parametrize("combiner", ["multiply", "add", "concat"])
def test_quotient_remainder_combines_the_two_rows(combiner):
    ids = np.array([[0, 1, 36], [37, 500, 999]])
    layer = QuotientRemainderEmbedding(
        1000, embedding_dim=6, num_collisions=37, combiner=combiner, hashed=False
    )
    output = keras.ops.convert_to_numpy(layer(ids))
    assert output.shape == (2, 3, 6)
    assert (layer.quotient_rows, layer.remainder_rows) == (28, 37)  # ceil(1000 / 37), 37
    assert table(layer.quotient_embedding).shape == (28, 3 if combiner == "concat" else 6)
    np.testing.assert_allclose(output, numpy_quotient_remainder(layer, ids, ids), rtol=1e-6)


def test_hashed_quotient_remainder_looks_up_the_numpy_buckets():
    ids = full_range_ids(50)
    layer = QuotientRemainderEmbedding(10_000, embedding_dim=4, seed=11)
    assert (layer.remainder_rows, layer.quotient_rows) == (100, 100)  # ceil(sqrt(10_000))
    indices = numpy_buckets(ids, 10_000, 11)[:, 0]
    np.testing.assert_array_equal(layer.indices(ids), indices)
    output = keras.ops.convert_to_numpy(layer(ids))
    np.testing.assert_allclose(output, numpy_quotient_remainder(layer, ids, indices), rtol=1e-6)


def test_every_index_gets_its_own_pair_of_rows():
    layer = QuotientRemainderEmbedding(1001, embedding_dim=2, num_collisions=10, hashed=False)
    assert (layer.quotient_rows, layer.remainder_rows) == (101, 10)
    indices = np.arange(1001)
    pairs = set(zip(indices // 10, indices % 10, strict=True))
    assert len(pairs) == 1001 and max(q for q, _ in pairs) == 100


def test_declared_id_ranges():
    hashed = tower_ids(HashedEmbedding(10, 2)).id_range()
    assert (hashed.low, hashed.size) == (-(2**63), 2**63)
    assert tower_ids(QuotientRemainderEmbedding(10, 2)).id_range().low == -(2**63)
    unhashed = tower_ids(QuotientRemainderEmbedding(10, 2, hashed=False)).id_range()
    assert (unhashed.low, unhashed.size) == (0, 10)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: HashedEmbedding(np.int64(20), 3, num_hashes=2, seed=7, l2=0.1, sparse=True),
        lambda: QuotientRemainderEmbedding(
            30, 4, num_collisions=4, combiner="concat", hashed=False, seed=2, l2=0.5
        ),
    ],
)
def test_config_round_trip_keeps_the_buckets_and_the_rows(layer, tmp_path):
    layer = layer()
    restored = assert_config_round_trip(layer)
    config = layer.get_config()
    assert isinstance(config["num_buckets"], int)
    for name in ("num_buckets", "embedding_dim", "seed", "l2", "sparse"):
        assert getattr(restored, name) == config[name]
    ids = np.arange(12) * 2
    inputs = keras.Input(shape=(), dtype="int32")
    model = keras.Model(inputs, layer(inputs))
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), model.predict(ids, verbose=0))


def two_tower_pairs(users, rows_per_user=4, items=30, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "query": np.repeat(users, rows_per_user),
        "candidate": rng.integers(0, items, size=len(users) * rows_per_user),
    }


@pytest.mark.slow
def test_a_hashed_user_tower_trains_serves_and_reloads(tmp_path):
    # Raw 64-bit user ids, up to 2**63 - 1, with no vocabulary.
    rng = np.random.default_rng(1)
    users = rng.integers(2**40, 2**63 - 1, size=40, dtype=np.int64)
    model = two_tower.TwoTowerRetrieval(
        query_tower=HashedEmbedding(num_buckets=64, embedding_dim=8, num_hashes=2),
        candidate_tower=QuotientRemainderEmbedding(30, embedding_dim=8, hashed=False),
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    before = keras.ops.convert_to_numpy(model.query_tower(users[:3]))
    history = model.fit(two_tower_pairs(users), batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert not np.allclose(keras.ops.convert_to_numpy(model.query_tower(users[:3])), before)
    model.index_candidates(np.arange(30), candidate_ids=np.arange(30) + 1000)
    unseen = np.array([2**62 + 12345, 7], dtype=np.int64)  # never trained: still served
    queries = np.concatenate([users[:5], unseen])
    ids, scores = model.recommend(queries, k=5, return_scores=True)
    assert ids.shape == (7, 5) and ids.min() >= 1000
    loaded = save_and_load(model, tmp_path)
    loaded_ids, loaded_scores = loaded.recommend(queries, k=5, return_scores=True)
    np.testing.assert_array_equal(loaded_ids, ids)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)
    # The served query embedding is the NumPy sum of the tables' hashed rows.
    rows = table(loaded.query_tower.embedding)[numpy_buckets(queries, 64, 0, 2)].sum(axis=-2)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.query_tower(queries)), rows, rtol=1e-6
    )


def test_the_model_takes_negative_raw_ids():
    # A hashing tower declares the whole int64 range (IdRange.low = -2**63).
    users = np.array([-(2**63), -5, 0, 2**63 - 1], dtype=np.int64)
    model = two_tower.TwoTowerRetrieval(HashedEmbedding(16, 4), two_tower.IdEmbeddingTower(30, 4))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(two_tower_pairs(users, rows_per_user=2), batch_size=8, epochs=1, verbose=0)
    model.index_candidates(np.arange(30))
    assert model.recommend(users, k=3).shape == (4, 3)
    # Found in review: float ids past 2**53 were clipped to 2**62 and served as that id.
    for floats in ([1e19], [-1e30], [2.0**62 + 2**40]):
        with pytest.raises(ValueError, match="past 2\\*\\*53"):
            model.recommend(np.array(floats), k=3)
    np.testing.assert_array_equal(
        model.recommend(np.array([-5.0, 7.0]), k=3), model.recommend(np.array([-5, 7]), k=3)
    )


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kind", ["hashed", "quotient_remainder"])
def test_a_training_step_moves_only_the_looked_up_rows(kind, sparse):
    users = np.array([3, 2**40 + 1, 17, 99], dtype=np.int64)
    if kind == "hashed":
        tower = HashedEmbedding(200, 4, num_hashes=2, sparse=sparse)
        tables = {"embedding": tower.embedding}
        looked_up = {"embedding": numpy_buckets(users, 200, 0, 2).reshape(-1)}
    else:
        tower = QuotientRemainderEmbedding(400, 4, num_collisions=20, sparse=sparse)
        tables = {"quotient": tower.quotient_embedding, "remainder": tower.remainder_embedding}
        indices = numpy_buckets(users, 400)[:, 0]
        looked_up = {"quotient": indices // 20, "remainder": indices % 20}
    model = two_tower.TwoTowerRetrieval(tower, two_tower.IdEmbeddingTower(10, 4, sparse=sparse))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    x = {"query": users, "candidate": np.array([1, 2, 3, 4])}
    model.embed_queries(users)
    before = {name: table(layer).copy() for name, layer in tables.items()}
    model.fit(x, batch_size=4, epochs=1, verbose=0)
    for name, layer in tables.items():
        after = table(layer)
        changed = np.flatnonzero(np.any(after != before[name], axis=1))
        np.testing.assert_array_equal(changed, np.unique(looked_up[name]), err_msg=name)


@pytest.mark.parametrize(
    ("ids", "dtype_named"),
    [
        (np.array([1.0, 2.0]), "float64"),
        (np.array([1.0, 2.0], dtype="float32"), "float32"),
        (np.array(["user-1", "user-2"]), "str"),
        (["user-1"], "str"),
        (np.array([True, False]), "bool"),
        (np.array([1, 2], dtype="uint64"), "uint64"),
    ],
)
@pytest.mark.parametrize("layer", [HashedEmbedding, QuotientRemainderEmbedding])
def test_ids_that_are_not_integers_are_refused(layer, ids, dtype_named):
    with pytest.raises(
        ValueError, match=rf"takes integer ids .*Received ids of dtype {dtype_named}"
    ):
        layer(16, 2)(ids)
    if dtype_named == "float32":  # a tensor, past the NumPy check: refused in `call`
        with pytest.raises(ValueError, match=r"Received ids of dtype float32"):
            layer(16, 2)(keras.ops.convert_to_tensor(ids))


def test_unhashed_quotient_remainder_refuses_ids_out_of_range():
    layer = QuotientRemainderEmbedding(10, 2, hashed=False)
    with pytest.raises(ValueError, match=r"takes ids in \[0, 10\)\. Received ids from -1 to 10"):
        layer(np.array([-1, 3, 10]))


@pytest.mark.parametrize(
    ("layer", "kwargs", "message"),
    [
        (HashedEmbedding, {"num_buckets": 0}, r"`num_buckets` must be an integer in \[1, "),
        (HashedEmbedding, {"num_buckets": 2**31}, r"num_buckets=2147483648"),
        (HashedEmbedding, {"num_buckets": 10.0}, r"Received: num_buckets=10.0 \(float\)"),
        (HashedEmbedding, {"embedding_dim": 0}, r"`embedding_dim` must be an integer >= 1"),
        (HashedEmbedding, {"num_hashes": 0}, r"`num_hashes` must be an integer in \[1, 64\]"),
        (HashedEmbedding, {"seed": -1}, r"`seed` must be an integer in \[0, 4294967295\]"),
        (HashedEmbedding, {"seed": 2**32}, r"Received: seed=4294967296"),
        (HashedEmbedding, {"l2": -0.1}, r"`l2` must be a finite number >= 0"),
        (HashedEmbedding, {"sparse": 1}, r"`sparse` must be True or False. Received: sparse=1"),
        (QuotientRemainderEmbedding, {"num_buckets": -3}, r"Received: num_buckets=-3"),
        (
            QuotientRemainderEmbedding,
            {"num_collisions": 11},
            r"`num_collisions` must be an integer in \[1, 10\]. Received: num_collisions=11",
        ),
        (QuotientRemainderEmbedding, {"combiner": "mean"}, r"'multiply', 'add', 'concat'"),
        (
            QuotientRemainderEmbedding,
            {"combiner": "concat", "embedding_dim": 5},
            r"must be even. Received: embedding_dim=5",
        ),
        (QuotientRemainderEmbedding, {"hashed": "yes"}, r"`hashed` must be True or False"),
    ],
)
def test_bad_arguments_raise_naming_what_was_received(layer, kwargs, message):
    arguments = {"num_buckets": 10, "embedding_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        layer(**arguments)


def test_open_ids_guide_runs():
    namespace = run_doc_blocks(
        "docs/open-ids.md", "test_hashed_embeddings.py::test_open_ids_guide_runs", {}
    )
    assert namespace["recommendations"].shape == (2, 5)
