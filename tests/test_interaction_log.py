"""InteractionLog: request-time histories against a per-query NumPy reference.

The reference reads the raw (unsorted) log one query at a time: the user's rows
strictly before the request time, ordered by (time, row), the last `width` of
them, most recent first. Ties in time are frequent in these fixtures, so a
history that let a same-time interaction in, or cut ties in another order,
fails.
"""

import numpy as np
import pytest

import two_tower


def reference(users, items, times, query_users, query_times, width):
    out = np.full((len(query_users), width), -1, np.int64)
    ages = np.zeros((len(query_users), width))
    for row, (user, time) in enumerate(zip(query_users, query_times, strict=True)):
        earlier = np.flatnonzero((users == user) & (times < time))
        earlier = earlier[np.lexsort((earlier, times[earlier]))][::-1][:width]
        out[row, : len(earlier)] = items[earlier]
        ages[row, : len(earlier)] = time - times[earlier]
    return out, ages


def random_log(seed, size=400, users=12, max_time=30):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, users, size),
        rng.integers(0, 50, size),
        rng.integers(0, max_time, size),  # about 13 interactions per time: many ties
    )


@pytest.mark.parametrize("width", [1, 3, 40])
def test_history_matches_numpy_reference_with_ties(width):
    users, items, times = random_log(seed=width)
    log = two_tower.InteractionLog(users, items, times)
    rng = np.random.default_rng(7)
    query_users = np.concatenate([rng.integers(0, 14, 200), users])  # 12, 13: unknown users
    query_times = np.concatenate([rng.integers(-2, 33, 200), times])  # and every row's own time
    found, ages = log.history(query_users, query_times, width, ages=True, batch_size=37)
    expected, expected_ages = reference(users, items, times, query_users, query_times, width)
    assert found.dtype == np.int32 and found.shape == (len(query_users), width)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(ages, expected_ages)
    uncapped = [
        np.sum((users == u) & (times < t)) for u, t in zip(query_users, query_times, strict=True)
    ]
    np.testing.assert_array_equal(log.counts(query_users, query_times), uncapped)
    np.testing.assert_array_equal((expected >= 0).sum(1), np.minimum(uncapped, width))


def test_no_training_row_sees_itself_or_anything_at_or_after_its_time():
    users, items, times = random_log(seed=3)
    items = np.arange(len(users))  # every row its own item, to find where it came from
    log = two_tower.InteractionLog(users, items, times)
    own = log.history(users, times, width=len(users))
    for row in range(len(users)):
        seen = own[row][own[row] >= 0]
        assert row not in seen
        assert np.all(times[seen] < times[row]) and np.all(users[seen] == users[row])
        assert len(seen) == np.sum((users == users[row]) & (times < times[row]))


def test_interactions_before_and_full_width_match_reference():
    users, items, times = random_log(seed=5)
    users = np.array([f"u{u}" for u in users])  # string ids
    log = two_tower.InteractionLog(users, items, times.astype(float))
    query_users = np.array(["u3", "u0", "nobody", "u3"])
    query_times = np.array([15.0, np.inf, 4.0, 0.0])
    rows, found = log.interactions_before(query_users, query_times)
    full = log.history(query_users, query_times, width=None)
    expected, _ = reference(users, items, times, query_users, query_times, len(users))
    assert full.shape[1] == max((expected >= 0).sum(1).max(), 1)
    for query in range(len(query_users)):
        want = expected[query][expected[query] >= 0]
        np.testing.assert_array_equal(found[rows == query], want[::-1])  # oldest first
        np.testing.assert_array_equal(full[query][full[query] >= 0], want)
    assert (rows == 1).sum() == (users == "u0").sum()  # +inf sees the whole log


def test_empty_log_and_empty_queries():
    log = two_tower.InteractionLog(np.array([], int), np.array([], int), np.array([], int))
    assert len(log) == 0 and log.num_users == 0
    np.testing.assert_array_equal(
        log.history(np.array([1, 2]), np.array([5, 6]), 2), -np.ones((2, 2))
    )
    full = two_tower.InteractionLog(np.array([1]), np.array([4]), np.array([0]))
    assert full.history(np.array([], int), np.array([], int), 3).shape == (0, 3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"users": np.array([1, 2]), "items": np.array([1]), "times": np.array([1, 2])},
            "same length",
        ),
        (
            {"users": np.array([1.5]), "items": np.array([1]), "times": np.array([1])},
            "integer or string",
        ),
        ({"users": np.array([1]), "items": np.array([1.0]), "times": np.array([1])}, "Vocabulary"),
        (
            {"users": np.array([1]), "items": np.array([-1]), "times": np.array([1])},
            r"\[0, 2\*\*31\)",
        ),
        ({"users": np.array([1]), "items": np.array([1]), "times": np.array([np.nan])}, "finite"),
        ({"users": np.array([1]), "items": np.array([1]), "times": np.array([np.inf])}, "finite"),
        ({"users": np.array([1]), "items": np.array([1]), "times": np.array(["x"])}, "numbers"),
    ],
)
def test_bad_logs_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        two_tower.InteractionLog(**arguments)


def test_bad_queries_are_refused():
    log = two_tower.InteractionLog(np.array([1, 1]), np.array([3, 4]), np.array([1, 2]))
    with pytest.raises(ValueError, match="same length"):
        log.history(np.array([1, 1]), np.array([3]), 2)
    with pytest.raises(ValueError, match="kind of user ids"):
        log.history(np.array(["1"]), np.array([3]), 2)
    with pytest.raises(ValueError, match="finite or \\+inf"):
        log.history(np.array([1]), np.array([np.nan]), 2)
    with pytest.raises(ValueError, match="finite or \\+inf"):
        log.counts(np.array([1]), np.array([-np.inf]))
    for width in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="`width` must be an integer >= 1"):
            log.history(np.array([1]), np.array([3]), width)
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        log.history(np.array([1]), np.array([3]), 2, batch_size=0)
