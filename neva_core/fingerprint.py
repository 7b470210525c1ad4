"""Cheap, content-aware fingerprints: the inputs of every cache key.

A fingerprint must change whenever the bytes a stage would read change, yet never cost a pass over
27 GB. Files are fingerprinted by size and mtime; folders that carry a stage manifest by that
manifest's own bytes (it already records every file's sha256); other folders by a listing of sizes
and mtimes. Hashes inside manifests make the check content-aware without re-reading the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from neva_core.io import MANIFEST_NAME, is_temp_name


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def folder_listing(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file under `root`, sorted; temporary files excluded."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_temp(d))
        relative_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if _is_temp(name):
                continue
            stat = os.stat(os.path.join(dirpath, name))
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            entries.append((relative, stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and is_temp_name(Path(name))  # the cheap test first: 558K names


def folder_fingerprint(root: Path) -> dict[str, Any]:
    """How many files a folder holds and a digest of their paths, sizes and mtimes (nothing is read)."""
    listing = folder_listing(root)
    return {"files": len(listing), "listing_sha256": _digest(listing)}


def path_fingerprint(path: Path | str) -> str:
    """A short hex digest that changes when the content at `path` could have changed."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_file():
        return _digest(["file", file_fingerprint(path)])
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        return _digest(["manifest", manifest.read_text()])
    return _digest(["folder", folder_fingerprint(path)])


def value_fingerprint(value: Any) -> Any:
    """Replace every Path inside `value` with its fingerprint, so a key follows content, not names only."""
    if isinstance(value, Path):
        return [str(value), path_fingerprint(value)]
    if isinstance(value, dict):
        return {str(k): value_fingerprint(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [value_fingerprint(v) for v in value]
    if hasattr(value, "model_dump"):
        return value_fingerprint(value.model_dump())
    return value


@functools.cache
def code_version() -> str:
    """A digest of the library's source: any change to a stage's code invalidates cached results."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(stage: str, **inputs: Any) -> str:
    """The key of one stage run: its name, its inputs' fingerprints, its parameters and the code version."""
    return _digest([stage, code_version(), value_fingerprint(inputs)])
