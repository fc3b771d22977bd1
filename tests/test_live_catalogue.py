"""`BruteForceIndex.add`, `remove` and `update`: equal to indexing again, atomic.

The expected catalogue after each change comes from a plain-Python model of the
documented rule (new rows appended; a removed row's place taken by the last
rows, in order; an update in place), and expected results from NumPy over it:
exact top k, ties lower position first. The catalogue is on a 1/4 grid with
repeated rows, so scores tie and are exact on every backend.
"""

import threading
import warnings

import numpy as np
import pytest
from keras import ops

import two_tower
from testing import save_and_load
from two_tower.retrieval import _catalogue_changes, _id_book, _indexed_catalogue

DIM, K = 4, 6


def grid(rng, rows):
    embeddings = (rng.integers(-4, 5, (rows, DIM)) / 4).astype("float32")
    embeddings[1::5] = embeddings[0]  # ties
    return embeddings


class Model:
    """The documented catalogue, in Python lists."""

    def __init__(self, embeddings, ids, colour):
        self.rows, self.ids, self.colour = list(embeddings), list(ids), list(colour)

    def add(self, embeddings, ids, colour):
        self.rows += list(embeddings)
        self.ids += list(ids)
        self.colour += list(colour)

    def remove(self, ids):
        gone = {self.ids.index(value) for value in ids}
        remaining = len(self.ids) - len(gone)
        holes = sorted(p for p in gone if p < remaining)
        movers = [p for p in range(remaining, len(self.ids)) if p not in gone]
        for hole, mover in zip(holes, movers, strict=True):
            self.rows[hole], self.ids[hole] = self.rows[mover], self.ids[mover]
            self.colour[hole] = self.colour[mover]
        del self.rows[remaining:], self.ids[remaining:], self.colour[remaining:]

    def update(self, ids, embeddings):
        for value, row in zip(ids, embeddings, strict=True):
            self.rows[self.ids.index(value)] = row

    def search(self, queries, k, colours=None, exclude=None):
        embeddings, ids = np.array(self.rows), np.array(self.ids)
        scores = queries @ embeddings.T
        found = []
        for row in range(len(queries)):
            allowed = np.ones(len(ids), bool)
            if colours is not None:
                allowed &= np.isin(self.colour, colours)
            if exclude is not None and exclude[row] is not None:
                allowed &= ~np.isin(ids, exclude[row])
            positions = np.flatnonzero(allowed)
            order = positions[np.lexsort((positions, -scores[row, positions]))][:k]
            padding = "" if ids.dtype.kind == "U" else -1
            found.append(list(ids[order]) + [padding] * (k - len(order)))
        return np.array(found, dtype=ids.dtype)


def check(index, model, queries, rng):
    """The index holds the model's catalogue and searches it as NumPy does."""
    np.testing.assert_array_equal(index.candidate_ids, np.array(model.ids))
    np.testing.assert_array_equal(index.embeddings(), np.array(model.rows))
    np.testing.assert_array_equal(index.attributes()["colour"], np.array(model.colour))
    found, scores = index.search(queries, k=K)
    np.testing.assert_array_equal(found, model.search(queries, K))
    np.testing.assert_allclose(
        scores, np.sort(queries @ np.array(model.rows).T, axis=1)[:, ::-1][:, :K]
    )
    found, _ = index.search(queries, k=K, where={"colour": [1, 2]})
    np.testing.assert_array_equal(found, model.search(queries, K, colours=[1, 2]))
    exclude = [list(rng.choice(model.ids, 3, replace=False)) for _ in queries]
    found, _ = index.search(queries, k=K, exclude=exclude)
    np.testing.assert_array_equal(found, model.search(queries, K, exclude=exclude))
    picked = rng.choice(model.ids, 5, replace=False)
    np.testing.assert_array_equal(
        index.positions_of(picked), [model.ids.index(value) for value in picked]
    )


@pytest.mark.parametrize("kind", ["int", "str"])
def test_changes_equal_numpy_over_the_documented_catalogue(kind):
    rng = np.random.default_rng(0)

    def make_ids(numbers):
        numbers = np.asarray(numbers)
        return numbers * 3 + 2**40 if kind == "int" else np.array([f"item-{n}" for n in numbers])

    start = grid(rng, 40)
    # A small first chunk that grows, then chunks of 64: changes cross chunk edges.
    index = two_tower.BruteForceIndex(chunk_size=64, query_batch_size=4)
    colour = rng.integers(0, 4, 40)
    index.index(start, make_ids(np.arange(40)), attributes={"colour": colour})
    model = Model(start, make_ids(np.arange(40)), colour)
    queries = grid(rng, 9)
    next_number = 40
    for _ in range(8):
        added = int(rng.integers(1, 60))
        rows, ids = grid(rng, added), make_ids(np.arange(next_number, next_number + added))
        colours = rng.integers(0, 4, added)
        next_number += added
        index.add(rows, ids, attributes={"colour": colours})
        model.add(rows, ids, colours)
        gone = rng.choice(model.ids, int(rng.integers(1, len(model.ids) // 2)), replace=False)
        index.remove(gone)
        model.remove(gone)
        changed = rng.choice(model.ids, 7, replace=False)
        rows = grid(rng, 7)
        index.update(changed, rows)
        model.update(changed, rows)
        check(index, model, queries, rng)
    # An id removed, then added again; and every candidate removed.
    again = model.ids[0]
    index.remove([again])
    model.remove([again])
    index.add(grid(rng, 1), np.array([again]), attributes={"colour": [3]})
    model.add(index.embeddings()[-1:], [again], [3])
    check(index, model, queries, rng)
    index.remove(index.candidate_ids)
    assert index.num_candidates == 0
    with pytest.raises(ValueError, match="empty"):
        index.search(queries, k=1)


def test_many_adds_sort_the_ids_again_and_stay_equal(monkeypatch):
    """Past a share of added ids the lookup is rebuilt; positions stay right."""
    monkeypatch.setattr(_id_book, "MERGE_MINIMUM", 8)
    rng = np.random.default_rng(1)
    index = two_tower.BruteForceIndex(chunk_size=64)
    start = grid(rng, 30)
    index.index(start, np.arange(30), attributes={"colour": np.zeros(30, int)})
    model = Model(start, np.arange(30), np.zeros(30, int))
    for step in range(10):
        ids = np.arange(100 + 10 * step, 110 + 10 * step)
        rows = grid(rng, 10)
        index.add(rows, ids, attributes={"colour": np.ones(10, int)})
        model.add(rows, ids, np.ones(10, int))
        index.remove(ids[:2])
        model.remove(ids[:2])
    check(index, model, grid(rng, 5), rng)


def test_tensors_that_copy_the_chunks_are_copied_again(monkeypatch):
    """Where the backend's tensors do not read the chunks' memory (an accelerator,
    a dtype it copies), each changed chunk is copied to the backend again."""
    monkeypatch.setattr(
        _catalogue_changes, "chunk_tensor", lambda chunk: ops.convert_to_tensor(chunk.copy())
    )
    monkeypatch.setattr(
        _indexed_catalogue, "chunk_tensor", lambda chunk: ops.convert_to_tensor(chunk.copy())
    )
    rng = np.random.default_rng(2)
    index = two_tower.BruteForceIndex(chunk_size=64)
    start = grid(rng, 100)
    index.index(start, np.arange(100), attributes={"colour": np.zeros(100, int)})
    model = Model(start, np.arange(100), np.zeros(100, int))
    index.update([5, 70], np.full((2, DIM), 2.0, "float32"))
    model.update([5, 70], np.full((2, DIM), 2.0, "float32"))
    index.remove([1, 2, 3])
    model.remove([1, 2, 3])
    index.add(grid(rng, 3), [200, 201, 202], attributes={"colour": [1, 1, 1]})
    model.add(index.embeddings()[-3:], [200, 201, 202], [1, 1, 1])
    check(index, model, grid(rng, 5), rng)


def test_bad_changes_raise_and_change_nothing():
    rng = np.random.default_rng(3)
    index = two_tower.BruteForceIndex()
    start = grid(rng, 20)
    index.index(start, np.arange(20), attributes={"colour": np.zeros(20, int)})
    queries = grid(rng, 3)
    before = index.search(queries, k=K)
    colour = {"colour": [1]}
    for call, match in [
        (lambda: index.add(grid(rng, 1), [5], attributes=colour), r"already indexed, e.g. \[5\]"),
        (lambda: index.add(grid(rng, 2), [50, 50], attributes={"colour": [1, 1]}), "unique"),
        (lambda: index.add(grid(rng, 1), ["a"], attributes=colour), "dtype"),
        (lambda: index.add(grid(rng, 1), [50]), r"each indexed attribute \['colour'\]"),
        (lambda: index.add(grid(rng, 1), [50], attributes={"colour": [0.5]}), "holds int64"),
        (lambda: index.add(grid(rng, 1), None, attributes=colour), "needs `candidate_ids`"),
        (lambda: index.add(np.ones((1, DIM + 1)), [50], attributes=colour), "holds dim 4"),
        (lambda: index.add(np.full((1, DIM), np.nan), [50], attributes=colour), "NaN"),
        (lambda: index.add(np.ones((0, DIM)), [], attributes={"colour": []}), "no rows"),
        (lambda: index.remove([3, 3]), r"more than once: \[3\]"),
        (lambda: index.remove([3, 99]), "not in the indexed catalogue"),
        (lambda: index.remove(3), "1D sequence"),
        (lambda: index.update([99], grid(rng, 1)), "not in the indexed catalogue"),
        (lambda: index.update([1, 2], grid(rng, 1)), "one embedding row per id"),
        (lambda: index.update([1], np.full((1, DIM), np.inf)), "NaN or infinite"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
        after = index.search(queries, k=K)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(index.candidate_ids, np.arange(20))
    index.remove([3, 99], ignore_unknown=True)
    assert 3 not in index.candidate_ids and index.num_candidates == 19
    plain = two_tower.BruteForceIndex()
    plain.index(start, np.arange(20))
    with pytest.raises(ValueError, match="no attributes"):
        plain.add(grid(rng, 1), [50], attributes=colour)
    with pytest.raises(ValueError, match="empty"):
        two_tower.BruteForceIndex().add(grid(rng, 1), [1])


def test_a_changed_index_saves_and_loads_in_a_model(tmp_path):
    rng = np.random.default_rng(4)
    model = two_tower.TwoTowerRetrieval.from_ids(10, 60, embedding_dim=DIM)
    model({"query": np.arange(3), "candidate": np.arange(3)})
    model.index_candidates(np.arange(40), attributes={"colour": rng.integers(0, 3, 40)})
    index = model.candidate_index
    dim = index.embeddings().shape[1]  # (with the tower's bias column)
    rows = rng.normal(size=(6, dim)).astype("float32")
    index.add(rows[:5], np.arange(40, 45), attributes={"colour": np.ones(5, int)})
    index.remove([0, 7, 41])
    index.update([44], rows[5:])
    expected = model.recommend(np.arange(4), k=K, where={"colour": [0, 1]})
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(loaded.candidate_index.candidate_ids, index.candidate_ids)
    found = loaded.recommend(np.arange(4), k=K, where={"colour": [0, 1]})
    np.testing.assert_array_equal(found, expected)


def test_every_search_sees_the_old_or_the_new_catalogue():
    """Searches in threads while the main thread changes the catalogue: each result
    is that of one version (expected per version from NumPy), in version order."""
    rng = np.random.default_rng(5)
    index = two_tower.BruteForceIndex(chunk_size=64)
    start = grid(rng, 200)
    colour = rng.integers(0, 4, 200)
    index.index(start, np.arange(200), attributes={"colour": colour})
    model = Model(start, np.arange(200), colour)
    queries = grid(rng, 8)
    versions = [model.search(queries, K, colours=[0, 1, 2])]
    changes = []
    for step in range(25):
        rows, ids = grid(rng, 30), np.arange(1000 + 30 * step, 1030 + 30 * step)
        colours = rng.integers(0, 4, 30)
        gone = rng.choice(model.ids, 20, replace=False)
        changes.append((rows, ids, colours, gone))
        model.add(rows, ids, colours)
        model.remove(gone)
        versions.append(model.search(queries, K, colours=[0, 1, 2]))
    index.search(queries, k=K, where={"colour": [0, 1, 2]})  # compiled before the race
    seen = {0: [], 1: []}
    done = threading.Event()

    def searcher(number):
        while not done.is_set():
            found, _ = index.search(queries, k=K, where={"colour": [0, 1, 2]})
            seen[number].append(found)

    threads = [threading.Thread(target=searcher, args=(n,)) for n in seen]
    for thread in threads:
        thread.start()
    try:
        for rows, ids, colours, gone in changes:
            # One version per (add, remove) pair: searches may see the middle one too.
            index.add(rows, ids, attributes={"colour": colours})
            index.remove(gone)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    middle = []  # after an add, before its remove: not a version above, but valid
    replay = Model(start, np.arange(200), colour)
    for rows, ids, colours, gone in changes:
        replay.add(rows, ids, colours)
        middle.append(replay.search(queries, K, colours=[0, 1, 2]))
        replay.remove(gone)
    valid = [*versions, *middle]
    order = [*range(0, 2 * len(changes) + 1, 2), *range(1, 2 * len(changes), 2)]
    for results in seen.values():
        assert results, "a searcher never ran"
        last = -1
        for found in results:
            matches = [n for n, v in enumerate(valid) if np.array_equal(found, v)]
            assert matches, "a search saw a catalogue that no version had"
            step = min(order[n] for n in matches)
            assert step >= last, "a search saw an older catalogue after a newer one"
            last = step
    np.testing.assert_array_equal(
        index.search(queries, k=K, where={"colour": [0, 1, 2]})[0], versions[-1]
    )


@pytest.mark.parametrize("pq", [None, 4], ids=["ivf-flat", "ivf-pq"])
def test_faiss_changes_keep_every_list_entry_right(pq):
    """Reading every list (nprobe = nlist), the changed index returns what NumPy
    does over the documented catalogue: exactly for IVF-Flat; for IVF-PQ, a removal
    keeps the survivors' codes, so their results are those from before it."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    rows = rng.normal(size=(1_500, DIM)).astype("float32")
    colour = rng.integers(0, 4, 1_500)
    ann = two_tower.FaissIndex(nlist=12, nprobe=12, pq_subquantizers=pq)
    ann.index(rows, np.arange(1_500) * 2, attributes={"colour": colour})
    model = Model(rows, np.arange(1_500) * 2, colour)
    queries = rng.normal(size=(7, DIM)).astype("float32")
    if pq is not None:
        before, before_scores = ann.search(queries, k=200)
        gone = rng.choice(model.ids, 300, replace=False)
        with pytest.warns(UserWarning, match="300 candidates changed"):
            ann.remove(gone)
        found, scores = ann.search(queries, k=K)
        for row in range(len(queries)):
            kept = ~np.isin(before[row], gone)
            np.testing.assert_array_equal(found[row], before[row][kept][:K])
            np.testing.assert_array_equal(scores[row], before_scores[row][kept][:K])
        return
    with pytest.warns(UserWarning, match="call `index` again"):
        for step in range(5):
            new = rng.normal(size=(40, DIM)).astype("float32")
            ids = np.arange(10_000 + 40 * step, 10_040 + 40 * step)
            colours = rng.integers(0, 4, 40)
            ann.add(new, ids, attributes={"colour": colours})
            model.add(new, ids, colours)
            gone = rng.choice(model.ids, 60, replace=False)
            ann.remove(gone)
            model.remove(gone)
            changed = rng.choice(model.ids, 20, replace=False)
            new = rng.normal(size=(20, DIM)).astype("float32")
            ann.update(changed, new)
            model.update(changed, new)
    assert ann.changed_since_index == 5 * (40 + 60 + 20)
    np.testing.assert_array_equal(ann.candidate_ids, model.ids)
    np.testing.assert_array_equal(ann.attributes()["colour"], model.colour)
    found, scores = ann.search(queries, k=K)
    np.testing.assert_array_equal(found, model.search(queries, K))
    exact_scores = np.sort(queries @ np.array(model.rows).T, axis=1)[:, ::-1][:, :K]
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
    # The exact path reads the moved and re-added vectors where they are now.
    allow = [list(rng.choice(model.ids, 30, replace=False)) for _ in queries]
    found, _ = ann.search(queries, k=K, allow=allow)
    for row, allowed in enumerate(allow):
        keep = np.isin(model.ids, allowed)
        expected = Model(np.array(model.rows)[keep], np.array(model.ids)[keep], np.zeros(30))
        np.testing.assert_array_equal(found[row], expected.search(queries[row : row + 1], K)[0])
    found, _ = ann.search(queries, k=K, where={"colour": [1, 2]})
    np.testing.assert_array_equal(found, model.search(queries, K, colours=[1, 2]))
    np.testing.assert_array_equal(
        ann.positions_of(model.ids[:9]), np.arange(9)
    )  # positions follow the documented rule


def test_a_changed_faiss_index_saves_and_loads(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    ann = two_tower.FaissIndex(nlist=8, nprobe=8)
    ann.index(rng.normal(size=(600, DIM)).astype("float32"), np.arange(600))
    with pytest.warns(UserWarning, match="86 candidates changed"):  # past 10 % of 600
        ann.remove(np.arange(0, 600, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        ann.add(rng.normal(size=(5, DIM)).astype("float32"), np.arange(1000, 1005))
        ann.update([1, 2], rng.normal(size=(2, DIM)).astype("float32"))
    queries = rng.normal(size=(4, DIM)).astype("float32")
    ann.save(tmp_path / "ann")
    loaded = two_tower.FaissIndex.load(tmp_path / "ann", nprobe=8)
    np.testing.assert_array_equal(loaded.candidate_ids, ann.candidate_ids)
    for got, expected in zip(loaded.search(queries, k=K), ann.search(queries, k=K), strict=True):
        np.testing.assert_array_equal(got, expected)
    loaded.remove(loaded.candidate_ids[:3])  # a loaded index changes too
    assert loaded.num_candidates == ann.num_candidates - 3
    with pytest.raises(ValueError, match="already indexed"):
        loaded.add(np.ones((1, DIM), "float32"), [1000])
    loaded.remove(loaded.candidate_ids)
    assert loaded.num_candidates == 0


def test_review_regressions_exported_ids_and_integer_kinds():
    """Found in review: `FaissIndex.from_index` of a changed index shared its id
    buffer (later changes renamed the faiss candidates); uint64 ids or attribute
    values added to int64 ones made floats of both (and one id of several)."""
    rng = np.random.default_rng(9)
    exact = two_tower.BruteForceIndex()
    big = np.array([2**60 + 1, 2**60 + 3, 2**60 + 5], "int64")
    exact.index(grid(rng, 3), big, attributes={"n": np.array([1, 2, 3])})
    exact.add(grid(rng, 1), np.array([7], "uint64"), attributes={"n": np.array([4], "uint64")})
    assert exact.candidate_ids.dtype == np.int64 and exact.attributes()["n"].dtype == np.int64
    np.testing.assert_array_equal(exact.candidate_ids, [*big, 7])
    np.testing.assert_array_equal(exact.positions_of(big), [0, 1, 2])
    with pytest.raises(ValueError, match="beyond the indexed int64"):
        exact.add(grid(rng, 1), np.array([2**64 - 1], "uint64"), attributes={"n": [5]})
    pytest.importorskip("faiss")
    ann = two_tower.FaissIndex.from_index(exact, nlist=1)
    exact.remove(big[:1])
    exact.add(grid(rng, 1), [8], attributes={"n": [6]})
    np.testing.assert_array_equal(ann.candidate_ids, [*big, 7])


@pytest.mark.parametrize("size", [40_000, 100_003])
@pytest.mark.parametrize("kind", ["int", "str"])
def test_id_lookup_in_two_levels_equals_numpy_search(size, kind):
    # The lookup behind `remove`/`update`/`exclude` searches large id arrays in two
    # levels (a sample of every 64th id, then the window): NumPy's search is the reference.
    from two_tower.retrieval._candidate_ids import sorted_slots

    rng = np.random.default_rng(size)
    ids = np.sort(rng.choice(10**9, size, replace=False))
    absent = rng.choice(10**9, 300)
    if kind == "str":
        ids, absent = np.sort(ids.astype(str)), absent.astype(str)
    else:
        absent = np.concatenate([absent, [ids[0] - 1, ids[-1] + 1]])
    values = np.concatenate([rng.choice(ids, 300), absent, ids[:2], ids[-2:]])
    expected = np.minimum(np.searchsorted(ids, values), size - 1)
    np.testing.assert_array_equal(sorted_slots(ids, values), expected)
    np.testing.assert_array_equal(sorted_slots(ids, values[::-1]), expected[::-1])  # cached
