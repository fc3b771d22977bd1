"""The on-disk layout of a sharded log: its manifest, its checks, and its atomic replacement.

A log folder holds `manifest.json` and the shard folders it names, each a folder of
`.npy` columns. Logs written by this version put their shards in one generation
folder, `folder/generation-<hex>/shard-00000/...`, and the manifest names them by
that path (`"generation-<hex>/shard-00000"`); older logs (format 1) name
`shard-00000` directly under the folder. Both are read the same way: a shard is
`folder / shard["name"]`, so older versions of two_tower read new logs too.

Why generations (and not a staging folder renamed over the old one): POSIX cannot
rename a folder over a non-empty one, so replacing a whole folder takes two renames
(old aside, new in) with a moment where neither is there, and Linux's
`renameat2(RENAME_EXCHANGE)` is neither portable nor reachable from Python without
ctypes. Replacing one file, though, is atomic everywhere (`os.replace`). So a new
version of a log is written into a new generation folder beside the old one, and the
manifest, written to a temporary file, is swapped in with one `os.replace`: before it
the folder is the old log, after it the new one, at every moment in between (a kill,
a full disk). The old generation is deleted only after the swap. No copy is made:
the shards are written once, so this costs nothing at 10^8 rows.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from two_tower.saving._files import fsync_folder

MANIFEST = "manifest.json"
FORMAT = "two_tower.synthetic/2"
# Format 1: shards directly under the folder, no file sizes in the manifest.
FORMATS = ("two_tower.synthetic/1", FORMAT)
GENERATION = "generation-"
_SHARD_NAME = re.compile(r"shard-(\d{5,})")
# Leftovers of killed writes: a staging folder beside the target (first writes), a
# generation the manifest does not name, a manifest not yet swapped in.
_STAGING = ".staging-"
_MANIFEST_TEMPORARY = re.compile(r"\.manifest\.json\.[0-9a-f]+\.tmp")
# Staging folders of two_tower versions before format 2: `tempfile.mkdtemp(prefix=".log.")`.
_OLD_STAGING_SUFFIX = re.compile(r"[a-z0-9_]{8}")


def _invalid(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid shard log manifest: {why}. Rewrite the log with "
        "two_tower.datasets.synthetic.write_shards, or restore the manifest."
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the log in `folder`, checked as a whole (no shard file is opened).

    Checks the format, the column list, every shard entry (a name inside the folder,
    a positive row count, a sha256 for every column), that the k-th shard is named
    `shard-<k>` (a lost entry leaves a gap), that the rows add up to the total, and,
    when the manifest records `shard_size`, that every shard but the last is full.

    Raises:
        FileNotFoundError: no manifest.
        ValueError: anything else, naming the manifest and the entry.
    """
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST} in {folder}: expected a sharded log as "
            "two_tower.datasets.synthetic.write_shards writes it."
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid(path, f"it is not JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise _invalid(path, f"it holds a {type(manifest).__name__}, not an object")
    if manifest.get("format") not in FORMATS:
        raise ValueError(
            f"{path} has format {manifest.get('format')!r}; this version of two_tower reads "
            f"{list(FORMATS)}. A newer two_tower wrote it, or it is not a shard log."
        )
    columns = manifest.get("columns")
    if (
        not isinstance(columns, dict)
        or not columns
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())
    ):
        raise _invalid(path, f"'columns' must map column names to dtypes, found {columns!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _invalid(path, f"'shards' must be a non-empty list, found {shards!r}")
    for position, shard in enumerate(shards):
        where = f"shard entry {position}"
        if not isinstance(shard, dict):
            raise _invalid(path, f"{where} is {shard!r}, not an object")
        name = shard.get("name")
        relative = PurePosixPath(name) if isinstance(name, str) else None
        parts = relative.parts if relative is not None else ()
        if relative is None or not parts or relative.is_absolute() or ".." in parts:
            raise _invalid(path, f"{where} has name {name!r}, not a folder inside the log")
        match = _SHARD_NAME.fullmatch(parts[-1])
        if match is None or int(match.group(1)) != position:
            raise _invalid(
                path,
                f"{where} is named {name!r}, but the shards must be shard-00000, shard-00001, "
                f"... in order: entry {position} must be shard-{position:05d} (an entry was "
                "lost, added or reordered)",
            )
        if not _is_count(shard.get("rows")) or shard["rows"] < 1:
            raise _invalid(path, f"{where} ({name}) has rows={shard.get('rows')!r}, not >= 1")
        hashes = shard.get("sha256")
        if not isinstance(hashes, dict) or set(hashes) != set(columns):
            found = sorted(hashes) if isinstance(hashes, dict) else hashes
            raise _invalid(
                path, f"{where} ({name}) has sha256 for {found!r}, expected {sorted(columns)}"
            )
        sizes = shard.get("bytes")
        if sizes is not None and (
            not isinstance(sizes, dict)
            or not set(sizes) <= set(columns)
            or not all(_is_count(v) for v in sizes.values())
        ):
            raise _invalid(path, f"{where} ({name}) has bytes={sizes!r}, not column -> size")
    if len({shard["name"] for shard in shards}) != len(shards):
        raise _invalid(path, "two shard entries have the same name")
    rows = [shard["rows"] for shard in shards]
    total = manifest.get("rows")
    if not _is_count(total) or total != sum(rows):
        raise ValueError(
            f"{path} says the log holds rows={total!r}, but its {len(shards)} shard entries "
            f"hold {sum(rows)} rows. The manifest was edited or damaged (a lost shard entry, "
            "an edited count): rewrite the log, or restore the manifest."
        )
    shard_size = manifest.get("shard_size")
    if shard_size is not None:
        if not _is_count(shard_size) or shard_size < 1:
            raise _invalid(path, f"shard_size={shard_size!r} is not a positive integer")
        full = [shard["rows"] == shard_size for shard in shards[:-1]]
        full.append(shards[-1]["rows"] <= shard_size)
        uneven = [shard["name"] for shard, ok in zip(shards, full, strict=True) if not ok]
        if uneven:
            raise ValueError(
                f"{path}: shard {uneven[0]} holds a row count that shard_size={shard_size} "
                "does not allow (every shard but the last holds shard_size rows). The manifest "
                "was edited or damaged: rewrite the log, or restore the manifest."
            )
    return manifest


def check_shard_folders(folder: Path, manifest: dict[str, Any]) -> None:
    """Raises if a listed shard folder is missing, or an unlisted `shard-*` folder lies beside them.

    An unlisted shard folder beside the listed ones is the trace of a manifest that lost
    an entry (its total edited to match): training on the rest would silently drop it.
    """
    listed = {folder / shard["name"] for shard in manifest["shards"]}
    for path in sorted(listed):
        if not path.is_dir():
            raise FileNotFoundError(
                f"Shard folder {path}, listed in {folder / MANIFEST}, is missing. The log is "
                "incomplete: rewrite it with two_tower.datasets.synthetic.write_shards."
            )
    for parent in sorted({path.parent for path in listed}):
        for entry in sorted(parent.iterdir()):
            if _SHARD_NAME.fullmatch(entry.name) and entry not in listed:
                raise ValueError(
                    f"Shard folder {entry} is not listed in {folder / MANIFEST}, which lists "
                    f"{len(listed)} shards beside it: the manifest lost an entry, or the "
                    "folder was added by hand. Restore the manifest or rewrite the log "
                    "(or remove the folder if it does not belong to the log)."
                )


# -------------------------------------------------------------------- writing
def _swap_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Writes `folder/manifest.json` in one `os.replace`: the old one or the new, never half."""
    temporary = folder / f".{MANIFEST}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "w") as handle:
            handle.write(json.dumps(manifest, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / MANIFEST)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_folder(folder)


def _current_manifest(target: Path) -> dict[str, Any] | None:
    """The manifest of the log at `target`, or None when `target` holds no readable log."""
    try:
        return read_manifest(target)
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _is_old_staging(entry: Path, target: Path) -> bool:
    """A staging folder left by a killed write of a two_tower before format 2."""
    prefix = f".{target.name}."
    if not entry.name.startswith(prefix) or not entry.is_dir():
        return False
    if not _OLD_STAGING_SUFFIX.fullmatch(entry.name[len(prefix) :]):
        return False
    return all(
        child.name == MANIFEST or _SHARD_NAME.fullmatch(child.name) for child in entry.iterdir()
    )


def clean_leftovers(target: Path) -> list[Path]:
    """Removes what killed writes of the log at `target` left behind; returns what it removed.

    Beside `target`: staging folders (`.<name>.staging-*`, and those of older
    versions). Inside it, when it holds a log: generation folders and `shard-*`
    folders its manifest does not name (a write over a format-1 log killed after its
    swap leaves the old shards), and manifests never swapped in. Nothing else is
    touched.
    """
    removed = []
    parent = target.parent
    if parent.is_dir():
        for entry in parent.iterdir():
            if entry.name.startswith(f".{target.name}{_STAGING}") or _is_old_staging(entry, target):
                removed.append(entry)
    manifest = _current_manifest(target)
    if manifest is not None:
        named = {PurePosixPath(shard["name"]).parts[0] for shard in manifest["shards"]}
        for entry in target.iterdir():
            ours = entry.name.startswith(GENERATION) or _SHARD_NAME.fullmatch(entry.name)
            if (ours and entry.name not in named) or _MANIFEST_TEMPORARY.fullmatch(entry.name):
                removed.append(entry)
    for entry in removed:
        _remove(entry)
    return removed


def replace_log(target: Path, overwrite: bool, fill: Callable[[Path, str], dict[str, Any]]) -> Path:
    """Writes a log at `target` with `fill`, so that a kill at any moment leaves the old or the new.

    `fill(generation_folder, generation_name)` writes the shards under
    `generation_folder` and returns the manifest (shard names start with
    `generation_name/`). Over an existing log, the new generation is written beside
    the old one and the manifest swapped in with one `os.replace` (see the module
    docstring); the old shards are deleted after. A new log is written in a staging
    folder beside `target` and renamed to it. Over a folder that holds no log
    (`overwrite=True`), that folder is renamed aside, the staging folder renamed in,
    and the old folder deleted. Leftovers of earlier killed writes are removed first.
    One writer per folder at a time: two concurrent writes may remove each other's
    staging folders.
    """
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it, or choose another folder."
        )
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"{target} is a file, not a log folder; overwrite=True replaces a folder only. "
            "Remove the file, or choose another folder."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    generation = f"{GENERATION}{secrets.token_hex(4)}"
    old = _current_manifest(target)
    if old is not None:
        try:
            _swap_manifest(target, fill(target / generation, generation))
        except BaseException:
            shutil.rmtree(target / generation, ignore_errors=True)
            raise
        # The new log is in place; the old shards go (leftovers of a kill here are
        # unnamed generations, removed by the next write).
        for shard in old["shards"]:
            parts = PurePosixPath(shard["name"]).parts
            _remove(target / (parts[0] if parts[0].startswith(GENERATION) else shard["name"]))
        return target
    staging = target.parent / f".{target.name}{_STAGING}{secrets.token_hex(4)}"
    aside = staging.with_name(staging.name + "-replaced")
    try:
        staging.mkdir()
        _swap_manifest(staging, fill(staging / generation, generation))
        if target.exists():  # a folder that holds no log, replaced as asked
            os.rename(target, aside)
        os.rename(staging, target)
    except BaseException:
        if aside.exists() and not target.exists():
            os.rename(aside, target)  # put the replaced folder back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_folder(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return target
