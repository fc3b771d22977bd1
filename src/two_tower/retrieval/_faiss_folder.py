"""The folder a `FaissIndex` is saved in: its file names, its manifest, and the checked read.

`FaissIndex.save` writes the faiss index and the ids under new names
(`index-<token>.faiss`, `candidate_ids-<token>.npy`), then commits them with one
rename of `faiss_index.json`, which records their sizes and SHA-256.
`read_folder` checks the files against it before faiss reads anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from two_tower.retrieval import _filters
from two_tower.retrieval._candidate_ids import checked_ids
from two_tower.saving._files import sha256

# Written by `save` before this version (no manifest): still loaded, unchecked.
FAISS_FILE = "index.faiss"
IDS_FILE = "candidate_ids.npy"
# The manifest names the current files (`index-<token>.faiss`,
# `candidate_ids-<token>.npy`) with their sizes and SHA-256; replacing it is the
# one rename that commits a save.
MANIFEST = "faiss_index.json"
FORMAT = "two_tower.FaissIndex"
OURS = re.compile(
    r"(index-[0-9a-f]+\.faiss|candidate_ids-[0-9a-f]+\.npy|candidate_attributes-[0-9a-f]+\.npz"
    r"|\.faiss_index\.json\.tmp-[0-9a-f]+)"
)
ADVICE = "Save the index again, or restore the folder from a copy."


def size_and_hash(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def read_folder(
    path: Path, faiss: Any
) -> tuple[Any, np.ndarray, dict[str, Any], dict[str, np.ndarray] | None]:
    """`(faiss index, ids, calibration, attributes)` from a folder `FaissIndex.save`
    wrote, every file checked. `calibration` holds the calibrated `nprobe` and its
    `recall` (both None when the index was not calibrated, or saved before the
    manifest kept them); `attributes` the candidates' attributes, or None.

    Raises:
        FileNotFoundError: a file the manifest names is missing (or, without a
            manifest, `index.faiss` or the ids file).
        ValueError: a file is truncated, damaged or edited (named), or the
            files disagree on the number of candidates.
    """
    attributes_file = None
    if (path / MANIFEST).exists():
        faiss_file, ids_file, attributes_file, manifest = _checked_manifest(path)
    else:
        faiss_file, ids_file, manifest = path / FAISS_FILE, path / IDS_FILE, None
        for file in (faiss_file, ids_file):
            if not file.exists():
                raise FileNotFoundError(
                    f"{file} is missing: not a saved FaissIndex (it has no {MANIFEST} either)."
                )
    try:
        index = faiss.read_index(str(faiss_file))
    except RuntimeError as error:
        raise ValueError(
            f"Cannot load a FaissIndex from {path}: {faiss_file.name} is truncated or "
            f"corrupt (faiss: {_faiss_reason(error)}). {ADVICE}"
        ) from error
    try:
        ids = np.load(ids_file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"Cannot load a FaissIndex from {path}: {ids_file.name} is not a readable "
            f"array of ids ({error}). {ADVICE}"
        ) from error
    if ids.ndim != 1 or index.ntotal != len(ids):
        raise ValueError(
            f"Cannot load a FaissIndex from {path}: the faiss index holds "
            f"{index.ntotal} vectors but {ids_file.name} holds ids of shape {ids.shape} "
            f"(one per vector expected). {ADVICE}"
        )
    try:
        ids, _, _ = checked_ids(ids, len(ids))
    except ValueError as error:
        raise ValueError(
            f"Cannot load a FaissIndex from {path}: {ids_file.name}: {error}. {ADVICE}"
        ) from error
    if manifest is not None and (
        manifest.get("num_candidates") != len(ids) or manifest.get("dim") != index.d
    ):
        raise ValueError(
            f"Cannot load a FaissIndex from {path}: {MANIFEST} records "
            f"{manifest.get('num_candidates')} candidates of dim {manifest.get('dim')}, "
            f"the files hold {len(ids)} of dim {index.d}. {ADVICE}"
        )
    attributes = None
    if attributes_file is not None:
        try:
            attributes = _filters.checked_attributes(
                _filters.read_attributes(attributes_file), len(ids)
            )
        except ValueError as error:
            raise ValueError(
                f"Cannot load a FaissIndex from {path}: {attributes_file.name}: {error}. {ADVICE}"
            ) from error
    return index, ids, _calibration(manifest, path), attributes


def _calibration(manifest: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """The manifest's `calibration` entry, checked: a damaged one would set nprobe."""
    calibration = {"nprobe": None, "recall": None}
    if manifest is None or manifest.get("calibration") is None:
        return calibration
    entry = manifest["calibration"]
    nprobe = entry.get("nprobe") if isinstance(entry, dict) else "missing"
    recall = entry.get("recall") if isinstance(entry, dict) else "missing"
    valid_nprobe = nprobe is None or (
        isinstance(nprobe, int) and not isinstance(nprobe, bool) and nprobe >= 1
    )
    valid_recall = recall is None or (
        isinstance(recall, (int, float)) and not isinstance(recall, bool) and 0 <= recall <= 1
    )
    if not (isinstance(entry, dict) and valid_nprobe and valid_recall):
        raise ValueError(
            f"Cannot load a FaissIndex from {path}: {MANIFEST} has a damaged calibration "
            f"entry {entry!r}; expected {{'nprobe': an integer >= 1 or null, 'recall': a "
            f"number in [0, 1] or null}}. {ADVICE}"
        )
    return {"nprobe": nprobe, "recall": recall}


def _faiss_reason(error: Exception) -> str:
    """The reason in a faiss error, without its C++ function and source location."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    found = re.search(r" at \S+:\d+: (.*)", text)
    return found.group(1) if found else text


def _checked_manifest(path: Path) -> tuple[Path, Path, Path | None, dict[str, Any]]:
    """The faiss, ids and attributes (if any) files that `faiss_index.json` names,
    checked against it."""
    where = f"Cannot load a FaissIndex from {path}"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest['format']!r}, files {type(files).__name__}")
        roles = ("index", "ids", "attributes") if "attributes" in files else ("index", "ids")
        entries = {role: files[role] for role in roles}
        names = {role: Path(str(entry["name"])).name for role, entry in entries.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{where}: {MANIFEST} is damaged or not a FaissIndex manifest ({error!r}). {ADVICE}"
        ) from error
    for role, name in names.items():
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"{where}: {name}, named in {MANIFEST}, is missing. {ADVICE}")
        found = size_and_hash(file)
        expected = entries[role]
        if found["size"] != expected.get("size"):
            raise ValueError(
                f"{where}: {name} is truncated or damaged: {found['size']} bytes, "
                f"{expected.get('size')} recorded at save. {ADVICE}"
            )
        if found["sha256"] != expected.get("sha256"):
            raise ValueError(
                f"{where}: {name} is damaged or was edited: its SHA-256 differs from the one "
                f"recorded at save. {ADVICE}"
            )
    attributes = path / names["attributes"] if "attributes" in names else None
    return path / names["index"], path / names["ids"], attributes, manifest
