"""The exact index holds one copy of its catalogue, built block by block.

Block-wise indexing (an array cut into blocks, or an iterable of blocks of any
size, crossing chunk boundaries) gives bit-identical ids and scores to a NumPy
exact ranking with ties, and the same index as one array; saving and loading
stream the rows; the backend tensors share the host chunks' memory on CPU.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import two_tower
from testing import numpy_ranking, save_and_load


def tied(num_candidates=1000, dim=8, seed=0):
    """Small integers: exact float32 dot products, full of ties."""
    rng = np.random.default_rng(seed)
    candidates = rng.integers(-2, 3, size=(num_candidates, dim)).astype("float32")
    queries = rng.integers(-2, 3, size=(40, dim)).astype("float32")
    return queries, candidates


def uneven_blocks(candidates, sizes=(1, 7, 100, 33, 64, 250)):
    """The catalogue as a generator of blocks of varying sizes, in order."""
    start, turn = 0, 0
    while start < len(candidates):
        size = sizes[turn % len(sizes)]
        yield candidates[start : start + size]
        start, turn = start + size, turn + 1


def expected(queries, candidates, k):
    positions = numpy_ranking(queries, candidates, k, [()] * len(queries))
    scores = np.take_along_axis(queries.astype("float64") @ candidates.T.astype("float64"),
                                positions, axis=1)  # fmt: skip
    return scores.astype("float32"), positions


@pytest.mark.parametrize("chunk_size", [64, 100, 2**18])
@pytest.mark.parametrize("form", ["array", "blocks", "pairs", "dataset-like"])
def test_block_wise_index_is_exact_and_equals_the_array_index(chunk_size, form):
    queries, candidates = tied()
    ids = np.arange(len(candidates), dtype="int64") * 3 + 11
    index = two_tower.BruteForceIndex(chunk_size=chunk_size, query_batch_size=16)
    if form == "array":
        index.index(candidates, ids)
    elif form == "blocks":
        index.index(uneven_blocks(candidates), ids)
    elif form == "pairs":
        start, pairs = 0, []
        for block in uneven_blocks(candidates):
            pairs.append((block, ids[start : start + len(block)]))
            start += len(block)
        index.index(iter(pairs))
    else:  # an iterable that is not a generator, yielding backend tensors
        index.index(_Batches([keras.ops.convert_to_tensor(b) for b in uneven_blocks(candidates)]),
                    ids)  # fmt: skip
    for k in (1, 10, 100):
        found, scores = index.search(queries, k=k)
        expected_scores, positions = expected(queries, candidates, k)
        np.testing.assert_array_equal(found, ids[positions])
        np.testing.assert_array_equal(scores, expected_scores)
    assert index.num_candidates == len(candidates)
    np.testing.assert_array_equal(index.embeddings(), candidates)


class _Batches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_the_first_chunk_grows_and_later_chunks_are_full():
    _, candidates = tied(num_candidates=2500)
    index = two_tower.BruteForceIndex(chunk_size=1000)
    index.index(uneven_blocks(candidates, sizes=(3,)))  # first block: 3 rows
    store = index._catalogue.host
    assert store.width == 1024 and len(store.chunks) == 3  # 1000 rounded to 32
    assert all(chunk.shape == (1024, 8) for chunk in store.chunks)
    assert not store.chunks[-1][2500 - 2048 :].any()  # padding rows are zeros
    small = two_tower.BruteForceIndex(chunk_size=1000)
    small.index(uneven_blocks(candidates[:70], sizes=(3,)))
    assert small._catalogue.host.width == 96  # 70 rounded up to 32, not 1000


def test_backend_tensors_share_the_host_chunks():
    # One copy: the tensors the search reads are the host buffers (on CPU).
    _, candidates = tied(num_candidates=300)
    index = two_tower.BruteForceIndex(chunk_size=128)
    index.index(candidates)
    catalogue = index._catalogue
    for host, tensor in zip(catalogue.host.chunks, catalogue.chunks, strict=True):
        assert host.ctypes.data % 64 == 0
        assert tuple(tensor.shape) == host.shape
        host[0, 0] = 1234.0  # visible through the tensor when the memory is shared
        assert float(keras.ops.convert_to_numpy(tensor[0, 0])) == 1234.0


def test_bad_blocks_raise_and_keep_the_previous_catalogue():
    _, candidates = tied(num_candidates=200)
    index = two_tower.BruteForceIndex(chunk_size=64)
    index.index(candidates)
    before = index.search(candidates[:3], k=5)
    nan_block = candidates[100:150].copy()
    nan_block[7, 2] = np.nan
    cases = [
        (iter([candidates[:10], candidates[10:20, :4]]), None, r"block 1 has dim 4.*dim 8"),
        (iter([candidates[:10], nan_block]), None, "NaN or infinite"),
        (iter([candidates[:10], (candidates[10:20], np.arange(10))]), None, "all be arrays"),
        (iter([(candidates[:10], np.arange(9))]), None, "10 embeddings but 9 ids"),
        (iter([(candidates[:10], np.arange(10))]), np.arange(10), "must be None"),
        (iter([]), None, "empty catalogue"),
        (iter([candidates[:10]]), np.arange(11), "one id per embedding row"),
        (iter([candidates[:10].astype(str)]), None, "numeric"),
    ]
    for blocks, ids, message in cases:
        with pytest.raises(ValueError, match=message):
            index.index(blocks, ids)
    after = index.search(candidates[:3], k=5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


@pytest.mark.parametrize("chunk_size", [64, 2**18])
def test_embeddings_is_a_copy(chunk_size):
    queries, candidates = tied(num_candidates=200)
    index = two_tower.BruteForceIndex(chunk_size=chunk_size)
    index.index(candidates)
    before = index.search(queries, k=10)
    returned = index.embeddings()
    np.testing.assert_array_equal(returned, candidates)
    returned[:] = 0.0  # must not reach the index
    after = index.search(queries, k=10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_ids_are_checked_before_an_array_is_copied():
    index = two_tower.BruteForceIndex()
    with pytest.raises(ValueError, match="must be unique"):
        index.index(np.ones((4, 2), "float32"), np.array([1, 2, 2, 3]))
    assert index.num_candidates == 0


def chunked_model(candidates, chunk_size):
    """Id towers whose candidate table is `candidates`, over a chunked index."""
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(40, 8),
        keras.layers.Embedding(len(candidates), 8),
        candidate_index=two_tower.BruteForceIndex(chunk_size=chunk_size),
    )
    model.embed_queries(np.arange(2))
    model.embed_candidates(np.arange(2))
    model.candidate_tower.embeddings.assign(candidates)
    return model


def test_save_and_load_stream_a_multi_chunk_index(tmp_path):
    queries, candidates = tied(num_candidates=700)
    model = chunked_model(candidates, chunk_size=96)
    model.index_candidates(np.arange(700), candidate_ids=np.arange(700) + 5000)
    found = model.candidate_index.search(queries, k=50)
    assert len(model.candidate_index._catalogue.host.chunks) == 8  # 700 / 96
    loaded = save_and_load(model, tmp_path)
    again = loaded.candidate_index.search(queries, k=50)
    np.testing.assert_array_equal(again[1], found[1])
    np.testing.assert_array_equal(again[0], found[0])
    expected_scores, positions = expected(queries, candidates, 50)
    np.testing.assert_array_equal(found[0], positions + 5000)
    np.testing.assert_array_equal(found[1], expected_scores)


def test_index_candidates_embeds_block_by_block_into_the_index():
    # index_candidates streams the tower's batches; the result equals indexing
    # the whole embedding matrix at once.
    _, candidates = tied(num_candidates=500)
    model = chunked_model(candidates, chunk_size=64)
    model.index_candidates(np.arange(500), batch_size=37)
    whole = two_tower.BruteForceIndex(chunk_size=64)
    whole.index(candidates)
    queries = tied()[0]
    for k in (5, 64):
        np.testing.assert_array_equal(
            model.candidate_index.search(queries, k=k)[0], whole.search(queries, k=k)[0]
        )


def test_saving_and_loading_never_gather_the_catalogue(tmp_path, monkeypatch):
    # Keras' saving reads every public attribute of a layer; a property that
    # gathered the catalogue (the old `candidate_embeddings`) held it 4 times.
    _, candidates = tied(num_candidates=300)
    model = chunked_model(candidates, chunk_size=64)
    model.candidate_index.index(candidates)

    def refuse(catalogue):
        raise AssertionError("the whole catalogue was gathered")

    monkeypatch.setattr(two_tower.retrieval._indexed_catalogue, "host_embeddings", refuse)
    loaded = save_and_load(model, tmp_path)
    assert loaded.candidate_index.num_candidates == 300
    monkeypatch.undo()
    np.testing.assert_array_equal(loaded.candidate_index.embeddings(), candidates)
