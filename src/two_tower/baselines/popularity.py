"""The popularity baseline: every query gets the most interacted-with items."""

from __future__ import annotations

from typing import Any

import numpy as np

from two_tower import _arguments


def _array(values: Any, name: str, shape: str) -> np.ndarray:
    """`values` as a NumPy array; ragged lists raise, naming the argument."""
    try:
        return np.asarray(values)
    except ValueError:
        raise ValueError(
            f"`{name}` must be a rectangular {shape} array. Received ragged rows: pad each "
            "row to one width with -1 (two_tower.InteractionLog.history does)."
        ) from None


def check_items(items: Any, num_items: int, name: str = "items", owner: str = "") -> np.ndarray:
    """`items` as a 1-D int64 array of indices in `[0, num_items)`, or ValueError.

    An empty array or list, of any dtype, is refused: there is nothing to fit.
    """
    where = f"{owner}: " if owner else ""
    array = _array(items, name, "[interactions]")
    if array.ndim == 1 and array.size == 0:
        raise ValueError(
            f"{where}`{name}` is empty: fitting needs at least one interaction. Received shape "
            f"{array.shape}"
        )
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{where}`{name}` must be a 1-D array of integer item indices. Received shape "
            f"{array.shape}, dtype {array.dtype}"
        )
    if array.min() < 0 or array.max() >= num_items:
        raise ValueError(
            f"{where}`{name}` must lie in [0, {num_items}) (num_items={num_items}). Received "
            f"values from {array.min()} to {array.max()}"
        )
    return array.astype(np.int64, copy=False)


def check_num_items(num_items: Any, name: str = "num_items", owner: str | None = None) -> int:
    """A positive Python `int` (NumPy integers accepted), or ValueError."""
    return _arguments.integer(name, num_items, owner=owner)


def check_histories(histories: Any, num_items: int) -> np.ndarray:
    """`[queries, width]` integer item indices in `[0, num_items)` or -1 padding, or ValueError.

    Padding may sit anywhere in a row: the baselines read a history as a set.
    """
    array = _array(histories, "histories", "[queries, width]")
    if array.ndim != 2 or (array.dtype.kind not in "iu" and array.size):
        raise ValueError(
            "`histories` must be [queries, width] integer item indices, -1 for padding. "
            f"Received shape {array.shape}, dtype {array.dtype}"
        )
    if array.size and (array.min() < -1 or array.max() >= num_items):
        raise ValueError(
            f"`histories` must hold item indices in [0, {num_items}) or -1 padding "
            f"(num_items={num_items}). Received values from {array.min()} to {array.max()}"
        )
    return array.astype(np.int64, copy=False)


def check_fitted(baseline: Any, method: str) -> None:
    """Raises unless `baseline.fit` has run: before, every score would be 0."""
    if not baseline._fitted:
        name = type(baseline).__name__
        raise ValueError(
            f"{name}.{method} was called before {name}.fit: an unfitted baseline scores "
            f"every item 0. Call fit on the training interactions first."
        )


class Popularity:
    """Scores each item by its number of training interactions, the same for every query.

    The score is the count, so items with equal counts tie (and
    `FactorizedTopK` counts ties in the positive's favour, as for any model).

    Args:
        num_items: catalogue size; items are indices in `[0, num_items)`
            (a Python or NumPy integer).

    Raises:
        ValueError: a `num_items` that is not a positive integer.

    Examples:
        >>> import numpy as np
        >>> popularity = two_tower.baselines.Popularity(num_items=4).fit(np.array([2, 2, 0]))
        >>> popularity.counts.tolist()
        [1, 0, 2, 0]
        >>> scores = popularity.embed_histories(np.array([[1, -1]])) @ (
        ...     popularity.catalogue_embeddings().T)
        >>> scores.tolist()
        [[1.0, 0.0, 2.0, 0.0]]
    """

    def __init__(self, num_items: int) -> None:
        self.num_items = check_num_items(num_items, owner="Popularity")
        self.counts = np.zeros(self.num_items, np.int64)
        self._fitted = False

    def fit(self, items: Any) -> Popularity:
        """Counts each item's interactions (every row counts, repeats included).

        Args:
            items: `[interactions]` item indices in `[0, num_items)`.

        Returns:
            This baseline, fitted.

        Raises:
            ValueError: items that are empty, or not 1-D integers in
                `[0, num_items)`.
        """
        items = check_items(items, self.num_items, owner="Popularity.fit")
        self.counts = np.bincount(items, minlength=self.num_items)
        self._fitted = True
        return self

    def catalogue_embeddings(self) -> np.ndarray:
        """`[num_items, 1]` float32: each item's count.

        Raises:
            ValueError: before `fit`.
        """
        check_fitted(self, "catalogue_embeddings")
        return self.counts.astype(np.float32)[:, None]

    def embed_histories(self, histories: Any) -> np.ndarray:
        """`[queries, 1]` ones: every query scores the catalogue by its counts.

        Args:
            histories: `[queries, width]` item indices, -1 for padding. Only
                the row count is read, so any 2-D array of that many rows
                serves (the values are not checked: they cannot change the
                scores).

        Returns:
            `[queries, 1]` float32 ones.

        Raises:
            ValueError: before `fit`, or histories that are not a 2-D array.
        """
        check_fitted(self, "embed_histories")
        array = _array(histories, "histories", "[queries, width]")
        if array.ndim != 2:
            raise ValueError(
                "`histories` must be a 2-D [queries, width] array (only its row count is "
                f"read). Received shape {array.shape}"
            )
        return np.ones((len(array), 1), np.float32)

    def get_config(self) -> dict[str, Any]:
        return {"num_items": self.num_items}
