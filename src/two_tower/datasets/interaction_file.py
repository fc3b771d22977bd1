"""Reading a "user item [time]" text file, one interaction per line."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def read_interactions(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a whitespace-separated "user item [time]" file into arrays.

    The format of SASRec's data files (e.g. `Video.txt`: `user item` per line,
    each user's lines in time order) and of many others. With two columns the
    line number stands for the time, so a user's lines keep their order; with
    three, the third column is the time (a number). Ids that are all integers
    come back as int64, otherwise as strings.

    Args:
        path: the file.

    Returns:
        `{"users": [n], "items": [n], "times": [n]}`, for `two_tower.InteractionLog`
        (map string items to indices with `two_tower.Vocabulary` first).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, lines with other than 2 or 3 fields or
            different numbers of fields (the first such line is named), or
            times that are not numbers.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "log.txt")
        >>> with open(path, "w") as file:
        ...     _ = file.write("1 10\\n1 11\\n2 10\\n")
        >>> data = two_tower.datasets.read_interactions(path)
        >>> data["users"].tolist(), data["items"].tolist(), data["times"].tolist()
        ([1, 1, 2], [10, 11, 10], [0, 1, 2])
    """
    with open(path, encoding="utf-8") as file:
        lines = [line.split() for line in file]
    lines = [fields for fields in lines if fields]  # blank lines (a final newline) skipped
    if not lines:
        raise ValueError(f"{os.fspath(path)!r} holds no interactions (an empty file).")
    width = len(lines[0])
    bad = next((i for i, fields in enumerate(lines) if len(fields) != width), None)
    if width not in (2, 3) or bad is not None:
        line = 0 if width not in (2, 3) else bad
        assert line is not None
        raise ValueError(
            f"Each line of {os.fspath(path)!r} must be 'user item' or 'user item time', the "
            f"same on every line. Line {line + 1} of the non-blank lines has "
            f"{len(lines[line])} fields: {' '.join(lines[line])!r}"
            + (f" (the first has {width})" if bad is not None else "")
        )
    table = np.array(lines, dtype=str)
    data = {"users": _ids(table[:, 0]), "items": _ids(table[:, 1])}
    if width == 3:
        try:
            data["times"] = _numbers(table[:, 2])
        except ValueError:
            raise ValueError(
                f"The third column of {os.fspath(path)!r} must hold times as numbers. "
                f"Received e.g. {table[0, 2]!r}"
            ) from None
    else:
        data["times"] = np.arange(len(table), dtype=np.int64)
    return data


def _ids(column: np.ndarray) -> np.ndarray:
    try:
        return column.astype(np.int64)
    except (ValueError, OverflowError):  # not all integers, or beyond int64: strings
        return column


def _numbers(column: np.ndarray) -> Any:
    try:
        return column.astype(np.int64)
    except ValueError:
        return column.astype(np.float64)
