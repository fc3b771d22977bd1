"""The popularity baseline: every query gets the most interacted-with items."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_items(items: Any, num_items: int, name: str = "items") -> np.ndarray:
    """`items` as a 1-D int64 array of indices in `[0, num_items)`, or ValueError."""
    array = np.asarray(items)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(
            f"`{name}` must be a 1-D array of integer item indices. Received shape "
            f"{array.shape}, dtype {array.dtype}"
        )
    if array.size and (array.min() < 0 or array.max() >= num_items):
        raise ValueError(
            f"`{name}` must lie in [0, {num_items}) (num_items={num_items}). Received values "
            f"from {array.min()} to {array.max()}"
        )
    return array.astype(np.int64, copy=False)


def check_num_items(num_items: Any) -> int:
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"`num_items` must be a positive integer. Received: {num_items!r}")
    return int(num_items)


class Popularity:
    """Scores each item by its number of training interactions, the same for every query.

    The score is the count, so items with equal counts tie (and
    `FactorizedTopK` counts ties in the positive's favour, as for any model).

    Args:
        num_items: catalogue size; items are indices in `[0, num_items)`.

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
        self.num_items = check_num_items(num_items)
        self.counts = np.zeros(self.num_items, np.int64)

    def fit(self, items: Any) -> Popularity:
        """Counts each item's interactions (every row counts, repeats included).

        Args:
            items: `[interactions]` item indices in `[0, num_items)`.

        Returns:
            This baseline, fitted.

        Raises:
            ValueError: items that are not 1-D integers in `[0, num_items)`.
        """
        self.counts = np.bincount(check_items(items, self.num_items), minlength=self.num_items)
        return self

    def catalogue_embeddings(self) -> np.ndarray:
        """`[num_items, 1]` float32: each item's count."""
        return self.counts.astype(np.float32)[:, None]

    def embed_histories(self, histories: Any) -> np.ndarray:
        """`[queries, 1]` ones: every query scores the catalogue by its counts.

        Args:
            histories: `[queries, width]` item indices (only the row count is read).

        Returns:
            `[queries, 1]` float32 ones.
        """
        return np.ones((len(np.asarray(histories)), 1), np.float32)

    def get_config(self) -> dict[str, Any]:
        return {"num_items": self.num_items}
