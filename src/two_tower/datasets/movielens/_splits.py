"""Train/test splits of records (name -> array dicts): seeded random, or by time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from two_tower import _arguments


def _take(records: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {key: values[rows] for key, values in records.items()}


def _check_split(
    records: Any, test_fraction: Any, owner: str
) -> tuple[dict[str, np.ndarray], int, int]:
    """`records` as arrays, their length, and the number of train rows; or a ValueError."""
    if not isinstance(records, Mapping) or not records:
        raise ValueError(
            f"{owner}: `records` must be a non-empty dict of name -> array, as load_ratings "
            f"returns. Received: {type(records).__name__}"
        )
    arrays = {key: np.asarray(values) for key, values in records.items()}
    shapes = {key: values.shape for key, values in arrays.items()}
    if any(len(shape) == 0 for shape in shapes.values()):
        raise ValueError(
            f"{owner}: every value of `records` must be an array of rows (at least 1-D). "
            f"Received shapes {shapes}"
        )
    lengths = {shape[0] for shape in shapes.values()}
    if len(lengths) != 1:
        raise ValueError(
            f"{owner}: all arrays must have the same length. Received lengths "
            f"{ {key: shape[0] for key, shape in shapes.items()} }"
        )
    fraction = _arguments.number("test_fraction", test_fraction, owner=owner)
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"{owner}: `test_fraction` must be in (0, 1). Received: test_fraction={test_fraction!r}"
        )
    n = lengths.pop()
    cut = round(n * (1.0 - fraction))
    if not 0 < cut < n:
        raise ValueError(
            f"{owner}: test_fraction={fraction} of {n} rows leaves {cut} rows to train and "
            f"{n - cut} to test; both parts need at least one row. Pass more rows or "
            "another test_fraction."
        )
    return arrays, n, cut


def random_split(
    records: dict[str, np.ndarray], test_fraction: float = 0.2, seed: int | None = 42
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A seeded random split (by default the 80/20 protocol of the keras-rs tutorial).

    The rows are permuted with `np.random.default_rng(seed)`; the first
    `round(n * (1 - test_fraction))` go to train, the rest to test.

    Args:
        records: name -> array (or list), all of one length (e.g. `load_ratings()`);
            lists come back as arrays.
        test_fraction: share of the rows in the test part, in (0, 1); a Python or
            NumPy number.
        seed: seed of the permutation, an integer >= 0; None draws a fresh one
            (a different split each call).

    Returns:
        `(train, test)`, dicts with the same keys as `records`.

    Raises:
        ValueError: `records` that is not a non-empty dict of arrays of one
            length, `test_fraction` outside (0, 1) or leaving a part empty, or a
            `seed` that is not an integer >= 0.

    Examples:
        >>> import numpy as np
        >>> train, test = two_tower.datasets.movielens.random_split({"a": np.arange(10)})
        >>> len(train["a"]), len(test["a"])
        (8, 2)
    """
    arrays, n, cut = _check_split(records, test_fraction, "random_split")
    order = np.random.default_rng(_arguments.seed("seed", seed, owner="random_split")).permutation(
        n
    )
    return _take(arrays, order[:cut]), _take(arrays, order[cut:])


def temporal_split(
    records: dict[str, np.ndarray], test_fraction: float = 0.2
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train on the earliest ratings, test on the latest, by `timestamp`.

    Ties in time keep file order (a stable sort), so the split is deterministic.

    Args:
        records: name -> array, all of one length, with a `timestamp` array of
            numbers (or `datetime64`), one per row.
        test_fraction: share of the rows (the latest) in the test part.

    Returns:
        `(train, test)`, dicts with the same keys as `records`.

    Raises:
        ValueError: no `timestamp`, or one that is not a 1-D array of numbers
            without NaN (strings would sort as text: "10" before "9"); arrays of
            different lengths; or `test_fraction` outside (0, 1) or leaving a
            part empty.

    Examples:
        >>> import numpy as np
        >>> records = {"timestamp": np.array([5, 1, 4, 2, 3])}
        >>> train, test = two_tower.datasets.movielens.temporal_split(records, 0.4)
        >>> test["timestamp"].tolist()
        [4, 5]
    """
    if isinstance(records, Mapping) and "timestamp" not in records:
        raise ValueError(
            "temporal_split needs a 'timestamp' array in the records. Received the keys "
            f"{sorted(map(str, records))}"
        )
    arrays, _, cut = _check_split(records, test_fraction, "temporal_split")
    timestamp = arrays["timestamp"]
    if timestamp.ndim != 1 or timestamp.dtype.kind not in "iufM":
        raise ValueError(
            "temporal_split: records['timestamp'] must be a 1-D array of numbers (or "
            f"datetime64). Received {timestamp.dtype} of shape {timestamp.shape}; convert "
            "text timestamps with .astype('int64') first (as text, '10' sorts before '9')."
        )
    if timestamp.dtype.kind in "fM" and np.isnan(timestamp).any():
        row = int(np.flatnonzero(np.isnan(timestamp))[0])
        raise ValueError(
            f"temporal_split: records['timestamp'] holds NaN (or NaT) at row {row}; a row "
            "without a time cannot be placed in time. Drop or fill those rows first."
        )
    order = np.argsort(timestamp, kind="stable")
    return _take(arrays, order[:cut]), _take(arrays, order[cut:])
