"""Serving from many threads at once gives the same results as serial calls.

`recommend`, `similar_items` and `BruteForceIndex.search` are called from 8
threads × 100 calls on a fresh model (so compilation itself is raced too), and
every result is compared with the same call made serially afterwards, and with
NumPy. On JAX this used to fail in every concurrent call: Keras' `predict` swaps
the variables' values out and back, and two threads broke each other.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

import testing
from testing import numpy_ranking

NUM_USERS, NUM_ITEMS, DIM, K = 50, 300, 8, 10
THREADS, CALLS = 8, 100


def integer_model():
    return testing.integer_model(NUM_USERS, NUM_ITEMS, DIM)


def requests(seed):
    """CALLS requests of 1 to 9 queries (several compiled shapes), some with exclusions."""
    rng = np.random.default_rng(seed)
    made = []
    for call in range(CALLS):
        size = int(rng.integers(1, 10))
        users = rng.integers(0, NUM_USERS, size)
        exclude = None
        if call % 3 == 0:
            exclude = [
                rng.choice(NUM_ITEMS, int(rng.integers(0, 20)), replace=False) for _ in users
            ]
        made.append((call % 4, users, exclude))
    return made


def serve(model, item_ids, kind, users, exclude):
    if kind == 0 or kind == 1:
        mapped = None if exclude is None else [item_ids[e] for e in exclude]
        return model.recommend(users, k=K, exclude=mapped)
    if kind == 2:
        return model.similar_items(users, k=K, item_ids=item_ids[users])
    query_embeddings = keras.ops.convert_to_numpy(model.query_tower(users))
    return model.candidate_index.search(query_embeddings, k=K)[0]


@pytest.mark.slow
def test_concurrent_serving_equals_serial_and_numpy():
    model, users_table, items_table = integer_model()
    item_ids = np.array([f"item-{i}" for i in range(NUM_ITEMS)])
    model.index_candidates(np.arange(NUM_ITEMS), item_ids)
    work = [requests(seed) for seed in range(THREADS)]
    start = threading.Barrier(THREADS)

    def worker(thread):
        start.wait()  # all threads make their first (compiling) call together
        return [serve(model, item_ids, *request) for request in work[thread]]

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(worker, range(THREADS)))
    for thread in range(THREADS):
        for request, found in zip(work[thread], concurrent[thread], strict=True):
            serial = serve(model, item_ids, *request)
            np.testing.assert_array_equal(found, serial)
            kind, users, exclude = request
            if kind == 2:
                expected = numpy_ranking(items_table[users], items_table, K, [[u] for u in users])
            else:
                skip = exclude if kind < 2 and exclude is not None else [[]] * len(users)
                expected = numpy_ranking(users_table[users], items_table, K, skip)
            np.testing.assert_array_equal(found, item_ids[expected])


def test_reindexing_while_serving_gives_one_catalogue_or_the_other():
    model, users_table, items_table = integer_model()
    first_ids = np.arange(NUM_ITEMS, dtype="int64")
    second_ids = first_ids + 10_000
    model.index_candidates(np.arange(NUM_ITEMS), first_ids)
    stop = threading.Event()
    expected = numpy_ranking(users_table[:4], items_table, K, [[]] * 4)

    def reindex():
        while not stop.is_set():
            for ids in (second_ids, first_ids):
                model.index_candidates(np.arange(NUM_ITEMS), ids)

    thread = threading.Thread(target=reindex)
    thread.start()
    try:
        seen = set()
        for _ in range(60):
            found = model.recommend(np.arange(4), k=K)
            offset = int(found.min() // 10_000) * 10_000
            seen.add(offset)
            np.testing.assert_array_equal(found, expected + offset)
    finally:
        stop.set()
        thread.join()
    assert seen <= {0, 10_000}
