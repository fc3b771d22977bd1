"""File helpers shared by the dataset modules."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_last_line(path: Path, what: str) -> None:
    """Raises if the non-empty file at `path` does not end with a line break.

    Every line of a GroupLens file ends with one, so a file that does not was cut
    inside its last line (a partial copy or download). The cut line may still
    parse, as a shorter number: a timestamp `978300760` cut to `9783`, a movie id
    `1097` cut to `10`. Reads one byte.
    """
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return
        handle.seek(-1, 2)
        last = handle.read(1)
    if last not in (b"\n", b"\r"):
        raise ValueError(
            f"Corrupt or truncated {what} file {path}: it does not end with a line break, "
            "so its last line was cut (a partial copy or download) and would load as "
            "wrong values. Replace it with a fresh copy; if the file is whole and only "
            "lacks its final line break, add one."
        )
