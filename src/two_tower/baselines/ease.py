"""EASE (Steck 2019): a closed-form item-item model, the strongest simple baseline."""

from __future__ import annotations

from typing import Any

import numpy as np

from two_tower import _arguments
from two_tower.baselines.popularity import (
    check_fitted,
    check_histories,
    check_items,
    check_num_items,
)

DEFAULT_MAX_ITEMS = 20_000
_USER_BLOCK = 1024


class EASE:
    """Embarrassingly Shallow Autoencoder: item-item weights from one matrix inverse.

    Fitting builds the binary user × item matrix X of the training
    interactions and solves, in closed form, for the item-item weights B
    (zero diagonal) that best rebuild X from itself with an L2 penalty
    `l2`: with P = (XᵀX + l2·I)⁻¹, B = I - P·diag(1/diag(P)). A query that
    has interacted with items H scores item j by Σ_{i∈H} B[i, j].

    A query with an empty history (a new user) scores every item 0; EASE then
    ranks by training popularity instead, so that ties among all items do not
    count as hits. `embed_histories` and `catalogue_embeddings` carry this as
    one extra column.

    **Size.** B is a dense `num_items × num_items` matrix, and fitting holds
    two float64 copies of that size: about 16·n² bytes (6.4 GB at 20,000
    items, 160 GB at 10^5). Fitting also costs O(users · n²) flops (X is
    multiplied in dense blocks of users). EASE is a baseline for catalogues up
    to about 10^4 items; `max_items` refuses larger ones rather than running
    out of memory halfway.

    Args:
        num_items: catalogue size; items are indices in `[0, num_items)`.
        l2: the penalty λ (Steck's default range is 100–1000; 400 suits
            MovieLens 100K). Must be > 0.
        max_items: the largest `num_items` accepted.

    Python and NumPy numbers (`np.int64(1682)`, `np.float32(400)`) are
    accepted alike.

    Raises:
        ValueError: `num_items` not a positive integer or above `max_items`
            (naming the memory it would need), or `l2` not a finite number > 0.

    Examples:
        >>> import numpy as np
        >>> ease = two_tower.baselines.EASE(num_items=3, l2=1.0).fit(
        ...     users=np.array([0, 0, 1, 1, 2]), items=np.array([0, 1, 0, 1, 2]))
        >>> scores = ease.embed_histories(np.array([[0, -1]])) @ ease.catalogue_embeddings().T
        >>> bool(scores[0, 1] > scores[0, 2])  # 1 was seen with 0, 2 never
        True
    """

    def __init__(
        self, num_items: int, l2: float = 400.0, max_items: int = DEFAULT_MAX_ITEMS
    ) -> None:
        self.num_items = check_num_items(num_items, owner="EASE")
        self.max_items = check_num_items(max_items, "max_items", owner="EASE")
        self.l2 = _arguments.number("l2", l2, minimum=0.0, open_minimum=True, owner="EASE")
        if self.num_items > self.max_items:
            needed = 16 * self.num_items**2 / 1e9
            raise ValueError(
                f"EASE keeps dense num_items × num_items matrices: num_items={self.num_items} "
                f"would need about {needed:,.0f} GB to fit (16·n² bytes), above "
                f"max_items={self.max_items}. EASE is a baseline for catalogues up to about "
                "10^4 items; raise `max_items` only if the machine has that memory."
            )
        self.weights = np.zeros((self.num_items, self.num_items), np.float32)
        self.counts = np.zeros(self.num_items, np.int64)
        self._fitted = False

    def fit(self, users: Any, items: Any) -> EASE:
        """Fits the item-item weights on training interactions.

        Args:
            users: `[interactions]` user of each interaction (integers,
                strings, or finite floats; only which rows share a user
                matters).
            items: `[interactions]` item indices in `[0, num_items)`. A
                repeated (user, item) pair counts once.

        Returns:
            This baseline, fitted.

        Raises:
            ValueError: empty arrays, arrays of different lengths, items that
                are not 1-D integers in `[0, num_items)`, or users that are not
                1-D integers, strings or finite floats (NaN, None), or that mix
                integers and strings (1 and "1" would be one user).
        """
        items = check_items(items, self.num_items, owner="EASE.fit")
        users = _users(users)
        if users.shape != items.shape:
            raise ValueError(
                "`users` and `items` must be 1-D arrays of the same length. Received shapes "
                f"{users.shape} and {items.shape}"
            )
        _, user_rows = np.unique(users, return_inverse=True)
        user_rows = user_rows.reshape(-1)
        order = np.argsort(user_rows, kind="stable")
        user_rows, sorted_items = user_rows[order], items[order]
        num_users = int(user_rows.max()) + 1 if user_rows.size else 0
        gram = np.zeros((self.num_items, self.num_items), np.float64)
        bounds = np.searchsorted(user_rows, np.arange(0, num_users + _USER_BLOCK, _USER_BLOCK))
        for begin, end in zip(bounds[:-1], bounds[1:], strict=False):
            if begin == end:
                continue
            block = np.zeros((_USER_BLOCK, self.num_items), np.float32)
            block[user_rows[begin:end] % _USER_BLOCK, sorted_items[begin:end]] = 1.0
            gram += block.T @ block
        gram[np.diag_indices_from(gram)] += self.l2
        inverse = np.linalg.inv(gram)
        del gram
        weights = inverse / (-np.diag(inverse))
        weights[np.diag_indices_from(weights)] = 0.0
        self.weights = weights.astype(np.float32)
        self.counts = np.bincount(items, minlength=self.num_items)
        self._fitted = True
        return self

    def catalogue_embeddings(self) -> np.ndarray:
        """`[num_items, num_items + 1]` float32: row j is column j of B, then j's popularity.

        The popularity column is the training count scaled into [0, 1].

        Raises:
            ValueError: before `fit`.
        """
        check_fitted(self, "catalogue_embeddings")
        popularity = self.counts / max(int(self.counts.max(initial=0)), 1)
        return np.concatenate([self.weights.T, popularity[:, None].astype(np.float32)], axis=1)

    def embed_histories(self, histories: Any) -> np.ndarray:
        """`[queries, num_items + 1]` float32: the multi-hot history, then 1 if it is empty.

        Args:
            histories: `[queries, width]` item indices, -1 for padding (from
                `two_tower.InteractionLog.history`), anywhere in a row: a
                history is read as a set.

        Returns:
            Each query's multi-hot row (repeats count once) with a last column
            that is 1 for an empty history (popularity ranks it) and 0 otherwise.

        Raises:
            ValueError: before `fit`; histories that are not 2-D integers
                (ragged lists included), or values at or above `num_items` or
                below -1.
        """
        check_fitted(self, "embed_histories")
        array = check_histories(histories, self.num_items)
        rows, columns = np.nonzero(array >= 0)
        out = np.zeros((len(array), self.num_items + 1), np.float32)
        out[rows, array[rows, columns]] = 1.0
        out[:, -1] = out[:, :-1].sum(axis=1) == 0
        return out

    def get_config(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "l2": self.l2, "max_items": self.max_items}


def _users(users: Any) -> np.ndarray:
    """Users as a 1-D NumPy array whose equal values are one user; NaN and None raise."""
    try:
        array = np.asarray(users)
    except ValueError:
        raise ValueError("`users` must be a 1-D array, one user per interaction.") from None
    if array.dtype.kind == "O":
        flat = array.reshape(-1)
        odd = [i for i, user in enumerate(flat) if not isinstance(user, (str, int, np.integer))]
        if odd:
            raise ValueError(
                "`users` must hold integer or string user ids. Received an object array "
                f"holding {flat[odd[0]]!r} at position {odd[0]}"
            )
        texts = [isinstance(user, str) for user in flat]
        if any(texts) and not all(texts):
            # As text, 1 and "1" would be one user.
            position = texts.index(not texts[0])
            raise ValueError(
                "`users` must hold integer or string user ids, not both: as one kind, 1 and "
                f"'1' would be one user. Received {flat[0]!r} at position 0 and "
                f"{flat[position]!r} at position {position}. Convert the column to one kind."
            )
        array = array.astype(str)
    if array.dtype.kind not in "iuUSf":
        raise ValueError(
            f"`users` must hold integer or string user ids. Received dtype {array.dtype}"
        )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        position = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        raise ValueError(
            "`users` must not hold NaN or infinity (a missing user id would group unrelated "
            f"interactions as one user). Received {array.reshape(-1)[position]} at position "
            f"{position}. Drop those interactions first."
        )
    return array
