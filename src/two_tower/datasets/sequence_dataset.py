"""Training batches for per-position sequence models: users' sequences packed into rows."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from two_tower import _arguments
from two_tower.preprocessing.interaction_log import InteractionLog
from two_tower.types import SAMPLING_PROBABILITY


class SequenceDataset(keras.utils.PyDataset):
    """Batches of packed sequence rows from an `InteractionLog`, for per-position training.

    Each user's items, oldest first, give inputs `s[:-1]` and next-item targets
    `s[1:]`. A user with more than `max_length` targets is cut into pieces of at
    most `max_length`, from the most recent back, so that every interaction is a
    target once and each piece's inputs are the items just before its targets.
    The pieces (segments) are packed into rows of `max_length` columns, several
    users per row, best fit in decreasing length: with short sequences (the
    SASRec datasets average 5 to 10 items) a row of one user would be mostly
    padding, and the loss and the attention would be computed on it.
    `SequenceTower` keeps attention within each segment and numbers positions
    within it, so packing changes no output.

    The packing is computed once (a Python loop over segments, O(segments x
    max_length) at worst) and kept as a few integers per segment; each batch is
    gathered from the log's arrays when asked for, so memory is O(log + batch).
    With `shuffle`, the rows come in a new order each epoch, seeded by
    `(seed, epoch)`.

    A batch is `x = {"query": {sequence_key: [rows, max_length], segment_key:
    [rows, max_length]}, "candidate": [rows, max_length]}`: items (-1 where
    padded), segment numbers (1, 2, ... within the row; 0 where padded), and
    the next item at each position (-1 where padded), as `TwoTowerRetrieval.fit`
    takes them with a `SequenceTower` query tower. With `sampling_probability`,
    `x["candidate_sampling_probability"]` adds each target's chance of appearing
    among a batch's targets, `1 - (1 - f) ** t` for an item that is a fraction
    f of all targets and t targets per batch: the logQ correction of the
    in-batch part of `loss="softmax"` and `"sampled_softmax"`, so that popular
    items are not pushed down for being other positions' targets more often.

    Args:
        log: the training log (e.g. the first part of `log.leave_one_out()`).
        max_length: columns of a row: the `SequenceTower`'s `max_length`.
        batch_size: rows per batch; each holds up to `max_length` targets.
        shuffle: a new row order each epoch.
        seed: the shuffle's seed.
        sequence_key: the `SequenceTower`'s `sequence_key`.
        segment_key: the `SequenceTower`'s `segment_key`.
        sampling_probability: add `candidate_sampling_probability` (above).
        **kwargs: `keras.utils.PyDataset` arguments (`workers`, ...).

    Raises:
        ValueError: a log in which no user has two interactions (nothing to
            predict), or bad arguments.

    Examples:
        >>> import numpy as np
        >>> log = two_tower.InteractionLog(np.array([1, 1, 1, 2, 2]),
        ...     np.array([4, 5, 6, 7, 8]), np.array([1, 2, 3, 1, 2]))
        >>> data = two_tower.datasets.SequenceDataset(log, max_length=4, batch_size=2)
        >>> batch = data[0]
        >>> batch["query"]["sequence"].tolist(), batch["query"]["segment"].tolist()
        ([[4, 5, 7, -1]], [[1, 1, 2, 0]])
        >>> batch["candidate"].tolist()
        [[5, 6, 8, -1]]
    """

    def __init__(
        self,
        log: InteractionLog,
        max_length: int,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        sequence_key: str = "sequence",
        segment_key: str = "segment",
        sampling_probability: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = "SequenceDataset"
        if not isinstance(log, InteractionLog):
            raise ValueError(
                f"{owner} reads a two_tower.InteractionLog. Received {type(log).__name__}"
            )
        self.max_length = _arguments.integer("max_length", max_length, owner=owner)
        self.batch_size = _arguments.integer("batch_size", batch_size, owner=owner)
        self.shuffle = _arguments.boolean("shuffle", shuffle, owner=owner)
        self.seed = _arguments.integer("seed", seed, minimum=0, owner=owner)
        for name, key in (("sequence_key", sequence_key), ("segment_key", segment_key)):
            if not (isinstance(key, str) and key):
                raise ValueError(f"{owner}: `{name}` must be a non-empty string. Received {key!r}")
        self.sequence_key = sequence_key
        self.segment_key = segment_key
        self.sampling_probability = _arguments.boolean(
            "sampling_probability", sampling_probability, owner=owner
        )
        _, offsets, self._items = log.sequences()
        self.max_item = int(self._items.max(initial=-1))
        """The largest item index in the log (checked against the towers' tables in `fit`)."""
        self._starts, self._lengths = _segments(offsets, self.max_length)
        if not len(self._lengths):
            raise ValueError(
                f"{owner}: no user in the log has two interactions, so there is no next item "
                f"to train on. Received a log of {len(log)} interactions from {log.num_users} "
                "users."
            )
        rows, self._columns = _pack(self._lengths, self.max_length)
        # Segments sorted by row, then column; a row's segments are a run of them.
        self._by_row = np.lexsort((self._columns, rows))
        self._row_offsets = np.searchsorted(rows[self._by_row], np.arange(rows.max() + 2))
        first = np.repeat(self._row_offsets[:-1], np.diff(self._row_offsets))
        self._numbers = np.empty(len(rows), np.int32)
        self._numbers[self._by_row] = np.arange(len(rows)) - first + 1
        self.num_rows = int(rows.max()) + 1
        self._probability: np.ndarray | None = None
        if self.sampling_probability:
            targets = self._items[_target_positions(self._starts, self._lengths)]
            frequency = np.bincount(targets) / len(targets)
            per_batch = len(targets) * min(self.batch_size, self.num_rows) / self.num_rows
            self._probability = (-np.expm1(per_batch * np.log1p(-frequency))).astype(np.float32)
        self._epoch = 0
        self._order = self._row_order()

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_targets(self) -> int:
        """Next-item targets per epoch (positions that are not padding)."""
        return int(self._lengths.sum())

    def _row_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng((self.seed, self._epoch)).permutation(self.num_rows)

    def on_epoch_end(self) -> None:
        """A new row order for the next epoch (with `shuffle`)."""
        self._epoch += 1
        self._order = self._row_order()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"Batch {index} is out of range [0, {self.num_batches}).")
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        counts = self._row_offsets[rows + 1] - self._row_offsets[rows]
        segments = self._by_row[np.repeat(self._row_offsets[rows], counts) + _within(counts)]
        lengths = self._lengths[segments]
        token_segment = np.repeat(np.arange(len(segments)), lengths)
        within = _within(lengths)
        source = self._starts[segments][token_segment] + within
        row = np.repeat(np.repeat(np.arange(len(rows)), counts), lengths)
        column = self._columns[segments][token_segment] + within
        shape = (len(rows), self.max_length)
        sequence = np.full(shape, -1, np.int32)
        segment = np.zeros(shape, np.int32)
        target = np.full(shape, -1, np.int32)
        sequence[row, column] = self._items[source]
        target[row, column] = self._items[source + 1]
        segment[row, column] = self._numbers[segments][token_segment]
        batch: dict[str, Any] = {
            "query": {self.sequence_key: sequence, self.segment_key: segment},
            "candidate": target,
        }
        if self._probability is not None:
            batch[SAMPLING_PROBABILITY] = np.where(
                target >= 0, self._probability[np.maximum(target, 0)], np.float32(1.0)
            )
        return batch


def _target_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The log positions of every segment's targets (one after each input)."""
    return np.repeat(starts + 1, lengths) + _within(lengths)


def _within(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., count - 1 for each count, concatenated."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def _segments(offsets: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`(starts, lengths)` of every segment: inputs `items[start:start + length]`.

    A user of n items has n - 1 targets, cut into ceil((n - 1) / width) pieces
    from the most recent back (the oldest piece is the short one).
    """
    targets = np.maximum(np.diff(offsets) - 1, 0)
    pieces = -(-targets // width)
    user = np.repeat(np.arange(len(targets)), pieces)
    back = _within(pieces)  # 0 = the most recent piece
    ends = offsets[:-1][user] + targets[user] - back * width  # one past the last input
    lengths = np.minimum(width, ends - offsets[:-1][user])
    return (ends - lengths).astype(np.int64), lengths.astype(np.int64)


def _pack(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Best fit decreasing: `(row, column)` of each segment in rows of `width`."""
    rows = np.empty(len(lengths), np.int64)
    columns = np.empty(len(lengths), np.int64)
    open_rows: list[list[int]] = [[] for _ in range(width + 1)]  # room left -> rows
    count = 0
    for segment in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[segment])
        for room in range(length, width + 1):
            if open_rows[room]:
                row = open_rows[room].pop()
                break
        else:
            row, room = count, width
            count += 1
        rows[segment], columns[segment] = row, width - room
        if room > length:
            open_rows[room - length].append(row)
    return rows, columns
