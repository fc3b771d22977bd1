"""Property-based tests (hypothesis) of `InteractionLog` against a per-query NumPy reference.

Hypothesis draws the log (users as integers or strings, items, times from a small
range so that ties are frequent), its row order (logs arrive shuffled), the
queries (known and unknown users, request times at, between and around the
logged ones, and +inf) and the width and batch size. The reference reads the
raw log one query at a time with a plain Python loop: the user's rows strictly
before the request time, ordered by (time, row) with the later row the more
recent among ties, the last `width` of them, most recent first. It shares no
code with `InteractionLog`.

Locally the exploration is random (and remembered in `.hypothesis/`); with `CI`
set, the "ci" profile derandomizes it, as in `tests/test_properties.py`.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import two_tower

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def reference(users, items, times, query_users, query_times, width):
    """Per query: `width` items and ages, most recent first, -1 / 0 where padded."""
    rows = len(query_users)
    found_items = np.full((rows, width), -1, np.int64)
    found_ages = np.zeros((rows, width), np.float64)
    everything = []
    for query in range(rows):
        user, time = query_users[query], query_times[query]
        before = [row for row in range(len(users)) if users[row] == user and times[row] < time]
        before.sort(key=lambda row: (times[row], row))  # oldest first; ties by row
        everything.append([items[row] for row in before])
        recent = before[::-1][:width]
        for column, row in enumerate(recent):
            found_items[query, column] = items[row]
            found_ages[query, column] = time - times[row]
    return found_items, found_ages, everything


@st.composite
def logs(draw):
    size = draw(st.integers(0, 40))
    num_users = draw(st.integers(1, 5))
    as_text = draw(st.booleans())
    users = np.array(draw(st.lists(st.integers(0, num_users - 1), min_size=size, max_size=size)))
    items = np.array(draw(st.lists(st.integers(0, 30), min_size=size, max_size=size)), np.int64)
    # Times from a handful of values: most rows tie with another row of their user.
    times = np.array(draw(st.lists(st.integers(0, 6), min_size=size, max_size=size)), np.int64)
    order = np.array(draw(st.permutations(range(size)))) if size else np.arange(0)
    users, items, times = users[order], items[order], times[order]
    count = draw(st.integers(0, 12))
    query_users = np.array(
        draw(st.lists(st.integers(0, num_users + 1), min_size=count, max_size=count))
    )  # num_users and num_users + 1 are never in the log
    query_times = np.array(
        draw(
            st.lists(
                st.one_of(st.integers(-1, 8).map(float), st.just(3.5), st.just(np.inf)),
                min_size=count,
                max_size=count,
            )
        ),
        np.float64,
    )
    if as_text:
        users = np.array([f"user{u}" for u in users], dtype=str)
        query_users = np.array([f"user{u}" for u in query_users], dtype=str)
    else:
        users, query_users = users.astype(np.int64), query_users.astype(np.int64)
    width = draw(st.one_of(st.none(), st.integers(1, 6)))
    batch_size = draw(st.integers(1, 5))
    return users, items, times, query_users, query_times, width, batch_size


@settings(max_examples=150, deadline=None)
@given(case=logs())
def test_history_matches_a_per_query_reference(case):
    users, items, times, query_users, query_times, width, batch_size = case
    log = two_tower.InteractionLog(users, items, times)
    _, _, everything = reference(users, items, times, query_users, query_times, 1)
    longest = max([len(found) for found in everything] + [1])
    expected_width = longest if width is None else width
    expected, expected_ages, _ = reference(
        users, items, times, query_users, query_times, expected_width
    )

    found = log.history(query_users, query_times, width, batch_size=batch_size)
    assert found.dtype == np.int32 and found.shape == (len(query_users), expected_width)
    np.testing.assert_array_equal(found, expected)

    counts = log.counts(query_users, query_times)
    np.testing.assert_array_equal(counts, [len(found) for found in everything])

    rows, flat = log.interactions_before(query_users, query_times)
    for query, want in enumerate(everything):
        np.testing.assert_array_equal(flat[rows == query], want)  # oldest first
    assert len(flat) == sum(len(want) for want in everything)

    finite = np.isfinite(query_times)
    if finite.all():
        _, ages = log.history(query_users, query_times, width, ages=True, batch_size=batch_size)
        np.testing.assert_allclose(ages, expected_ages)
        assert np.all(ages[found >= 0] > 0)  # strictly before the request


@settings(max_examples=80, deadline=None)
@given(case=logs(), seed=st.integers(0, 2**32 - 1))
def test_a_reshuffled_log_keeps_counts_and_ages(case, seed):
    """Row order decides only which of several same-time items comes first."""
    users, items, times, query_users, query_times, width, _ = case
    width = width or 3
    finite_times = np.where(np.isfinite(query_times), query_times, 100.0)
    order = np.random.default_rng(seed).permutation(len(users))
    one = two_tower.InteractionLog(users, items, times)
    other = two_tower.InteractionLog(users[order], items[order], times[order])
    first, first_ages = one.history(query_users, finite_times, width, ages=True)
    second, second_ages = other.history(query_users, finite_times, width, ages=True)
    np.testing.assert_array_equal(first >= 0, second >= 0)
    np.testing.assert_allclose(first_ages, second_ages)
    np.testing.assert_array_equal(
        one.counts(query_users, finite_times), other.counts(query_users, finite_times)
    )
    # Within each (query, age) group the same items, in whatever order; the oldest
    # group of a full row may be cut by the width, so which of its items made it
    # in depends on the row order.
    for query in range(len(query_users)):
        present = first[query] >= 0
        ages = np.unique(first_ages[query][present])
        if present.all():
            ages = ages[:-1]
        for age in ages:
            at = present & (first_ages[query] == age)
            assert sorted(first[query][at]) == sorted(second[query][at])
