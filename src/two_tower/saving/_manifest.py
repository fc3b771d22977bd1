"""The manifest `save_model` records in a `.keras` archive's zip comment, and member hashing.

The manifest lists every member's size and SHA-256:
`{"two_tower_manifest": 1, "members": {name: [size, sha256]}}`. Keras ignores
the comment, so a file with a manifest is an ordinary `.keras` file to Keras.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

MANIFEST_KEY = "two_tower_manifest"
_MAX_COMMENT = 65535  # the zip format's limit
READ_BLOCK = 2**20
# A zip local file header: signature, versions, flags, method, time, date, CRC,
# sizes, then the lengths of the name and of the extra field that follow it.
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def write_manifest(path: str) -> None:
    """Records every member's size and SHA-256 in the zip comment of `path`."""
    members = {}
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            _, digest = member_digest(handle, archive, info, direct=True)
            members[info.filename] = [info.file_size, digest]
    with zipfile.ZipFile(path, "a") as archive:
        comment = json.dumps({MANIFEST_KEY: 1, "members": members}, separators=(",", ":")).encode()
        if len(comment) > _MAX_COMMENT:  # about 700 members
            warnings.warn(
                f"{path}: {len(members)} members do not fit a manifest in the zip comment "
                f"({len(comment)} bytes, at most {_MAX_COMMENT}); saved without one, so "
                "load_model cannot check their hashes.",
                stacklevel=3,
            )
            return
        archive.comment = comment


def read_manifest(
    comment: bytes, damaged: Callable[[str], ValueError]
) -> dict[str, list[Any]] | None:
    """The members recorded at save, or None for a file without a manifest."""
    if not comment.lstrip().startswith(b'{"' + MANIFEST_KEY.encode()):
        return None  # saved before manifests, or by Keras itself
    try:
        manifest = json.loads(comment)
        members = manifest["members"]
        if not isinstance(members, dict) or not all(
            isinstance(v, list) and len(v) == 2 for v in members.values()
        ):
            raise ValueError("members must map names to [size, sha256]")
    except (ValueError, KeyError, TypeError) as error:
        raise damaged(
            f"its manifest (the zip comment written by save_model) is damaged ({error})"
        ) from error
    return members


def _stored_blocks(handle: Any, info: zipfile.ZipInfo) -> Iterator[bytes] | None:
    """The bytes of a stored (uncompressed) member read straight from the file, or None.

    `zipfile` computes each member's CRC-32 as it reads, which costs more than the
    SHA-256 itself (0.24 s against 0.16 s for 300 MB here); where the manifest's
    SHA-256 is checked, the CRC adds nothing. None where the local header is not
    as expected: the caller then reads through `zipfile`.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != b"PK\x03\x04":
        return None
    handle.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])

    def blocks() -> Iterator[bytes]:
        left = info.file_size
        while left > 0 and (block := handle.read(min(READ_BLOCK, left))):
            left -= len(block)
            yield block

    return blocks()


def member_digest(
    handle: Any, archive: zipfile.ZipFile, info: zipfile.ZipInfo, direct: bool
) -> tuple[int, str]:
    """(bytes read, SHA-256) of a member: straight from the file where `direct` and it
    is stored, else through `zipfile` (which also checks its CRC)."""
    digest = hashlib.sha256()
    size = 0
    with contextlib.ExitStack() as stack:
        blocks = _stored_blocks(handle, info) if direct else None
        if blocks is None:
            member = stack.enter_context(archive.open(info))
            blocks = iter(lambda: member.read(READ_BLOCK), b"")
        for block in blocks:
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()
