"""Next-item queries: a user, a request time and the item that came next."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from two_tower.preprocessing.interaction_log import InteractionLog


@dataclasses.dataclass(frozen=True)
class NextItemQueries:
    """Requests to evaluate next-item retrieval on: who asked, when, and what came next.

    `InteractionLog.leave_one_out` and `InteractionLog.temporal_split` return
    them. Each query's input is the user's history strictly before its time,
    from the log that holds everything known then (`histories`), so a query
    never sees its own item or anything later.

    Attributes:
        users: `[queries]` user of each query, of the log's kind.
        times: `[queries]` request times (the next item's own time).
        items: `[queries]` item index of the next item, the target.

    Examples:
        >>> import numpy as np
        >>> log = two_tower.InteractionLog(np.array([1, 1, 1]), np.array([4, 5, 6]),
        ...                                np.array([1, 2, 3]))
        >>> train, validation, test = log.leave_one_out()
        >>> test.items.tolist(), test.histories(log, width=3).tolist()
        ([6], [[5, 4, -1]])
    """

    users: np.ndarray
    times: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def histories(self, log: InteractionLog, width: int, **kwargs: Any) -> Any:
        """Each query's input: `log.history(self.users, self.times, width, **kwargs)`.

        Pass the log of everything known at request time (the full log, not
        the training part), as serving would see it.
        """
        return log.history(self.users, self.times, width, **kwargs)

    def select(self, positions: Any) -> NextItemQueries:
        """The queries at `positions` (an index array or a boolean mask)."""
        return NextItemQueries(self.users[positions], self.times[positions], self.items[positions])
