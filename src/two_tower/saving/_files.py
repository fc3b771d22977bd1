"""File helpers shared by the package: hashing, fsync, and the pieces of an atomic replace.

A writer that must leave the old file or the new one, never half of either
(`.keras` saves, the manifests of shard logs and `FaissIndex` folders), writes a
temporary file beside its target, flushes it to disk, renames it over the target
with `os.replace` (atomic on every OS), then flushes the folder so that the rename
itself survives a crash. `sha256` hashes whole files checked against a recorded
digest (MovieLens archives, shard columns, `FaissIndex` files).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

_ATTEMPTS = 100


def sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: str | os.PathLike[str], flags: int) -> None:
    """Flushes the file (or folder) at `path` to disk, opening it with `flags`."""
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Makes a rename inside `folder` durable, where the OS can open a folder.

    Folders cannot be opened on Windows, and some file systems refuse to fsync
    one: the rename is then as durable as the OS makes it, and nothing raises.
    """
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fsync(folder, os.O_RDONLY)


def create_temporary(target: str) -> str:
    """Creates an empty hidden file beside `target`; returns its path.

    The name keeps `target`'s suffix, as Keras checks it (`.keras`):
    `.model.keras.tmp-<random>.keras`. A new file gets the permissions the umask
    gives any new file (`os.open` applies it, unlike `mkstemp`'s 0600); replacing
    a file keeps that file's permissions, as writing it in place would.
    """
    folder, name = os.path.split(target)
    suffix = Path(name).suffix
    for _ in range(_ATTEMPTS):
        temporary = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(4)}{suffix}")
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        try:
            if os.path.isfile(target):
                os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        except BaseException:
            os.unlink(temporary)
            raise
        return temporary
    raise FileExistsError(
        f"Could not create a temporary file beside {target}: {_ATTEMPTS} random names "
        f"of the form .{name}.tmp-<random>{suffix} were all taken."
    )


def remove_temporaries(target: str) -> None:
    """Removes the hidden temporaries (`create_temporary`'s) that killed writes of `target` left."""
    folder, name = os.path.split(target)
    suffix = Path(name).suffix
    pattern = re.compile(re.escape(f".{name}.tmp-") + r"[0-9a-f]{8}" + re.escape(suffix))
    for leftover in os.listdir(folder):
        if pattern.fullmatch(leftover):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, leftover))


@contextlib.contextmanager
def replacing(target: str) -> Iterator[str]:
    """Yields a temporary file beside `target` to write; renames it over `target` on success.

    On leaving the block normally the temporary is flushed to disk, renamed over
    `target` with `os.replace`, and the folder flushed; then the temporaries of
    earlier killed writes of `target` are removed (so one process at a time may
    write a path). On an exception the temporary is removed and `target` is
    unchanged. A killed process leaves the temporary behind, hidden.
    """
    temporary = create_temporary(target)
    try:
        yield temporary
        # Flushed before the rename, so that a crash cannot leave a renamed but empty file.
        fsync(temporary, os.O_RDWR)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_folder(os.path.dirname(target))
    remove_temporaries(target)
