"""Request-time histories from a time-stamped interaction log, with no future leaking in."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from two_tower import _arguments
from two_tower.preprocessing.next_item_queries import NextItemQueries


class InteractionLog:
    """A log of (user, item, time) interactions, sorted once, that answers history queries.

    A request by a user at time t sees the user's interactions strictly before t:
    never the interaction being predicted, nothing at the same time (ties in
    timestamps are left out, as a live request could not have seen them), and
    nothing later. The same call builds the training histories (every training
    interaction is a request at its own time) and the serving or test ones (a
    log of everything known at request time), so the two cannot drift apart.

    The log is sorted by user, then time, once: O(n log n) time and three
    arrays of n entries. A query is then two binary searches: one for the
    user's rows, and one within them for the request time, vectorised over the
    queries with NumPy (no Python loop over users or queries). Queries are
    answered `batch_size` at a time, so temporary memory grows with the batch,
    not with the number of queries.

    Args:
        users: `[n]` user of each interaction: integers or strings (an object
            array of strings, as pandas gives, is accepted).
        items: `[n]` item index of each interaction, integers in `[0, 2**31)`
            (e.g. from `two_tower.Vocabulary`).
        times: `[n]` time of each interaction: integers or finite floats, in
            any unit (seconds, days). Empty arrays or lists of any dtype make
            an empty log.

    Raises:
        ValueError: arrays that are not 1-D or of different lengths; users that
            are neither integers nor strings; items that are not integers in
            `[0, 2**31)`; times that are not numbers (datetimes included:
            convert them to numbers), or NaN or infinite.

    Examples:
        >>> import numpy as np
        >>> log = two_tower.InteractionLog(
        ...     users=np.array([7, 7, 7, 9]), items=np.array([1, 2, 3, 4]),
        ...     times=np.array([10, 20, 20, 5]))
        >>> log.history(users=np.array([7, 7, 9, 8]), times=np.array([20, 21, 5, 99]), width=2)
        array([[ 1, -1],
               [ 3,  2],
               [-1, -1],
               [-1, -1]], dtype=int32)
    """

    def __init__(self, users: Any, items: Any, times: Any) -> None:
        users = _users(users, "users")
        items = _empty_as_int(np.asarray(items))
        times = _times(times, "times")
        if not users.ndim == items.ndim == times.ndim == 1 or not len(users) == len(items) == len(
            times
        ):
            raise ValueError(
                "`users`, `items` and `times` must be 1-D arrays of the same length. Received "
                f"shapes {users.shape}, {items.shape} and {times.shape}"
            )
        if items.dtype.kind not in "iu":
            raise ValueError(
                "`items` must hold integer item indices (map raw ids with two_tower.Vocabulary). "
                f"Received dtype {items.dtype}"
            )
        if items.size and (items.min() < 0 or items.max() >= 2**31):
            raise ValueError(
                f"`items` must lie in [0, 2**31). Received values from {items.min()} to "
                f"{items.max()}"
            )
        order = np.lexsort((times, users))  # by user, then time; stable for ties
        sorted_users = users[order]
        self._user_keys, self._starts = np.unique(sorted_users, return_index=True)
        self._stops = np.append(self._starts[1:], len(order)).astype(np.int64)
        self._starts = self._starts.astype(np.int64)
        self._items = items[order].astype(np.int32)
        self._times = times[order]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def num_users(self) -> int:
        """Distinct users in the log."""
        return len(self._user_keys)

    def _bounds(self, users: Any, times: Any) -> tuple[np.ndarray, np.ndarray]:
        """For each query, the sorted-log rows `[start, end)` of its user before its time."""
        users, times = _users(users, "users"), _times(times, "times", request=True)
        if users.ndim != 1 or users.shape != times.shape:
            raise ValueError(
                "Query `users` and `times` must be 1-D arrays of the same length. Received "
                f"shapes {users.shape} and {times.shape}"
            )
        if self._user_keys.size and users.size and users.dtype.kind != self._user_keys.dtype.kind:
            raise ValueError(
                f"Query `users` must have the log's kind of user ids ({self._user_keys.dtype}). "
                f"Received dtype {users.dtype}"
            )
        if not self._user_keys.size:
            empty = np.zeros(len(users), np.int64)
            return empty, empty.copy()
        slot = np.minimum(np.searchsorted(self._user_keys, users), len(self._user_keys) - 1)
        known = self._user_keys[slot] == users
        start = np.where(known, self._starts[slot], 0)
        low = start.copy()
        high = np.where(known, self._stops[slot], 0)
        # Binary search for the first row at or after the request time, all queries at once.
        while True:
            active = np.flatnonzero(low < high)
            if active.size == 0:
                break
            middle = (low[active] + high[active]) // 2
            earlier = self._times[middle] < times[active]
            low[active] = np.where(earlier, middle + 1, low[active])
            high[active] = np.where(earlier, high[active], middle)
        return start, low

    def counts(self, users: Any, times: Any) -> np.ndarray:
        """How many interactions each query's user had strictly before its time.

        Args:
            users: `[queries]` users, of the log's kind (integers or strings).
            times: `[queries]` request times.

        Returns:
            `[queries]` int64 counts; 0 for users absent from the log.

        Raises:
            ValueError: as `history`.
        """
        start, end = self._bounds(users, times)
        return end - start

    def history(
        self,
        users: Any,
        times: Any,
        width: int | None,
        *,
        ages: bool = False,
        batch_size: int = 65536,
    ) -> Any:
        """Each query's last `width` items before its time, the most recent first.

        Args:
            users: `[queries]` users, of the log's kind (integers or strings);
                users absent from the log get an empty history.
            times: `[queries]` request times. A training row's own time leaves
                out the row itself and anything at the same time; `np.inf` sees
                the user's whole log.
            width: columns of the result; longer histories are cut to their
                most recent `width` items. None: as wide as the longest history
                among these queries (at least 1).
            ages: also return each entry's age, the request time minus the
                interaction's time (always > 0 for a present entry). Needs
                finite request times (a request at `np.inf` has no age).
            batch_size: queries answered at once (bounds temporary memory).

        Returns:
            `[queries, width]` int32 item indices, column 0 the most recent,
            padded with -1 after the last item. With `ages=True`, the tuple
            `(items, ages)`, `ages` float32 of the same shape and 0 where padded.

        Raises:
            ValueError: query arrays that are not 1-D or of different lengths;
                users of another kind than the log's; times that are NaN,
                -inf or not numbers, or +inf with `ages=True`; a `width` or
                `batch_size` that is not a positive integer (Python or NumPy);
                an `ages` that is not True or False.

        Examples:
            >>> import numpy as np
            >>> log = two_tower.InteractionLog(np.array(["a", "a"]), np.array([5, 6]),
            ...                                np.array([1.0, 2.0]))
            >>> items, ages = log.history(np.array(["a"]), np.array([4.0]), 3, ages=True)
            >>> items.tolist(), ages.tolist()
            ([[6, 5, -1]], [[2.0, 3.0, 0.0]])
        """
        owner = "InteractionLog.history"
        if width is not None:
            width = _arguments.integer("width", width, owner=owner)
        batch_size = _arguments.integer("batch_size", batch_size, owner=owner)
        ages = _arguments.boolean("ages", ages, owner=owner)
        start, end = self._bounds(users, times)
        query_times = _times(times, "times", request=True)
        if ages and query_times.dtype.kind == "f" and np.any(np.isinf(query_times)):
            position = int(np.flatnonzero(np.isinf(query_times))[0])
            raise ValueError(
                f"{owner}(ages=True) needs finite request `times`: a request at +inf (after "
                f"everything in the log) has infinite ages. Received inf at position {position}. "
                "Pass the request times, or ages=False."
            )
        if width is None:
            width = max(int((end - start).max(initial=0)), 1)
        items = np.full((len(start), width), -1, np.int32)
        ages_out = np.zeros((len(start), width), np.float32) if ages else None
        for rows in _batches(len(start), batch_size):
            # Column j holds sorted row end - 1 - j, where that row is still the user's.
            positions = end[rows, None] - 1 - np.arange(width)
            present = positions >= start[rows, None]
            safe = np.where(present, positions, 0)
            if len(self._items):
                items[rows] = np.where(present, self._items[safe], -1)
                if ages_out is not None:
                    age = query_times[rows, None] - self._times[safe]
                    ages_out[rows] = np.where(present, age, 0)
        return (items, ages_out) if ages_out is not None else items

    def sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every user's items in time order, as flat arrays (read-only views, no copy).

        Returns:
            `(users, offsets, items)`: the `[num_users]` distinct users (sorted),
            `[num_users + 1]` int64 offsets, and `[len(log)]` int32 items: user
            `users[u]`'s items, oldest first, are `items[offsets[u]:offsets[u + 1]]`.
            Ties in time keep the order in which they were given.
        """
        offsets = np.append(self._starts, len(self._items)).astype(np.int64)
        views = self._user_keys.view(), offsets, self._items.view()
        for view in views:
            view.flags.writeable = False
        return views

    def _select(self, rows: np.ndarray) -> InteractionLog:
        """A log of the sorted rows `rows` (a mask), without re-checking them."""
        users = np.repeat(self._user_keys, self._stops - self._starts)
        return InteractionLog(users[rows], self._items[rows], self._times[rows])

    def leave_one_out(
        self, min_interactions: int = 3
    ) -> tuple[InteractionLog, NextItemQueries, NextItemQueries]:
        """SASRec's split: each user's last item is a test query, the one before a validation one.

        Users with fewer than `min_interactions` interactions stay whole in the
        training log and give no query. A query's input is the user's history
        before it in this (full) log: `queries.histories(log, width)`. Time
        order decides "last"; ties keep the order the interactions were given
        in, but a history leaves out items at the query's own time.

        Args:
            min_interactions: the fewest interactions a user needs to give a
                validation and a test query (at least 2).

        Returns:
            `(train, validation, test)`: the training log (everything but the
            queries' items) and the two `NextItemQueries`.

        Raises:
            ValueError: `min_interactions` below 2 or not an integer.

        Examples:
            >>> import numpy as np
            >>> log = two_tower.InteractionLog(np.array([1, 1, 1, 1, 2]),
            ...     np.array([4, 5, 6, 7, 8]), np.array([1, 2, 3, 4, 1]))
            >>> train, validation, test = log.leave_one_out()
            >>> len(train), validation.items.tolist(), test.items.tolist()
            (3, [6], [7])
        """
        minimum = _arguments.integer(
            "min_interactions", min_interactions, minimum=2, owner="InteractionLog.leave_one_out"
        )
        counts = self._stops - self._starts
        eligible = np.flatnonzero(counts >= minimum)
        last = self._stops[eligible] - 1
        keep = np.ones(len(self._items), bool)
        keep[last] = False
        keep[last - 1] = False

        def queries(rows: np.ndarray) -> NextItemQueries:
            return NextItemQueries(
                self._user_keys[eligible], self._times[rows], self._items[rows].astype(np.int64)
            )

        return self._select(keep), queries(last - 1), queries(last)

    def temporal_split(
        self, validation_start: float, test_start: float
    ) -> tuple[InteractionLog, NextItemQueries, NextItemQueries]:
        """Splits by time: train before `validation_start`, then validation, then test queries.

        Every interaction at or after `validation_start` becomes a query (before
        `test_start`: validation; from it on: test). A query's input is the
        user's history before it in this (full) log, including earlier
        validation and test interactions, as serving would see them.

        Args:
            validation_start: the first time of the validation period.
            test_start: the first time of the test period, `>= validation_start`.

        Returns:
            `(train, validation, test)`: the training log and the two
            `NextItemQueries` (in user, then time order).

        Raises:
            ValueError: times that are not finite numbers, or `test_start` before
                `validation_start`.

        Examples:
            >>> import numpy as np
            >>> log = two_tower.InteractionLog(np.array([1, 1, 2, 2]),
            ...     np.array([4, 5, 6, 7]), np.array([1, 5, 2, 9]))
            >>> train, validation, test = log.temporal_split(4, 8)
            >>> len(train), validation.items.tolist(), test.items.tolist()
            (2, [5], [7])
        """
        owner = "InteractionLog.temporal_split"
        start = _arguments.number("validation_start", validation_start, owner=owner)
        end = _arguments.number("test_start", test_start, owner=owner)
        if end < start:
            raise ValueError(
                f"{owner}: `test_start` (={test_start}) must not come before "
                f"`validation_start` (={validation_start})."
            )
        users = np.repeat(self._user_keys, self._stops - self._starts)

        def queries(rows: np.ndarray) -> NextItemQueries:
            return NextItemQueries(
                users[rows], self._times[rows], self._items[rows].astype(np.int64)
            )

        train = self._times < start
        validation = np.flatnonzero(~train & (self._times < end))
        test = np.flatnonzero(self._times >= end)
        return self._select(train), queries(validation), queries(test)

    def interactions_before(self, users: Any, times: Any) -> tuple[np.ndarray, np.ndarray]:
        """Every interaction of each query's user before its time, as flat pairs.

        The sparse form of `history(width=None)`, for models that read a whole
        history (EASE's item-item scores): no padding, however long one user's
        history is.

        Args:
            users: `[queries]` users, as in `history`.
            times: `[queries]` request times, as in `history`.

        Returns:
            `(query_rows, items)`: int64 query positions and int32 item indices,
            grouped by query in order, each query's items oldest first.

        Raises:
            ValueError: as `history`.
        """
        start, end = self._bounds(users, times)
        counts = end - start
        query_rows = np.repeat(np.arange(len(start), dtype=np.int64), counts)
        offsets = np.arange(counts.sum(), dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        return query_rows, self._items[np.repeat(start, counts) + offsets]


def _batches(count: int, batch_size: int) -> Iterator[slice]:
    for begin in range(0, count, batch_size):
        yield slice(begin, min(begin + batch_size, count))


def _empty_as_int(array: np.ndarray) -> np.ndarray:
    """An empty array of any dtype (`np.array([])` is float64) as int64."""
    return array.astype(np.int64) if array.size == 0 and array.dtype.kind not in "iuU" else array


def _users(users: Any, name: str) -> np.ndarray:
    array = _empty_as_int(np.asarray(users))
    if array.dtype.kind == "S":
        array = array.astype(str)
    if array.dtype.kind == "O":
        flat = array.reshape(-1)
        not_text = [i for i, user in enumerate(flat) if not isinstance(user, str)]
        if not not_text:  # strings in an object array, as pandas gives them
            array = array.astype(str)
        else:
            raise ValueError(
                f"`{name}` must hold integer or string user ids. Received an object array "
                f"holding {flat[not_text[0]]!r} ({type(flat[not_text[0]]).__name__}) at "
                f"position {not_text[0]}"
            )
    if array.dtype.kind not in "iuU":
        raise ValueError(
            f"`{name}` must hold integer or string user ids. Received dtype {array.dtype}"
        )
    return array.astype(np.int64) if array.dtype.kind in "iu" else array


def _times(times: Any, name: str, request: bool = False) -> np.ndarray:
    """Times as a NumPy array; NaN raises, and infinities too except a request's +inf."""
    array = _empty_as_int(np.asarray(times))
    if array.dtype.kind not in "iuf":
        hint = (
            " Convert datetimes to numbers first, e.g. seconds: "
            "times.astype('datetime64[s]').astype('int64')."
            if array.dtype.kind in "mM"
            else ""
        )
        raise ValueError(f"`{name}` must hold numbers. Received dtype {array.dtype}.{hint}")
    if array.dtype.kind == "f":
        bad = np.isnan(array) | (array == -np.inf) | ((array == np.inf) & (not request))
        if np.any(bad):
            position = int(np.flatnonzero(bad.reshape(-1))[0])
            allowed = "finite or +inf (after everything in the log)" if request else "finite"
            raise ValueError(
                f"`{name}` must be {allowed}. Received {array.reshape(-1)[position]} at "
                f"position {position}"
            )
    return array
