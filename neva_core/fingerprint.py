"""Cheap, content-aware fingerprints: the inputs of every cache key.

A fingerprint must change whenever the bytes a stage would read change, yet never cost a pass over
27 GB. Files are fingerprinted by size and mtime, folders by the names, sizes and mtimes of every file
they hold (their manifest included), so a file edited inside a snapshot changes the key even though
the manifest did not.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from neva_core.io import is_temp_name


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


# The packages whose version can change a stage's output bytes. Stages not listed depend on all of them.
OUTPUT_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "download": (),
    "unzip": (),
    "shard": ("pillow", "megatron-energon", "webdataset"),
    "extend-tokenizer": ("sentencepiece", "protobuf", "tokenizers", "transformers"),
    "convert": ("torch", "safetensors", "transformers", "sentencepiece"),
    "repartition": ("torch", "safetensors"),
}
_ALL_DEPENDENCIES = tuple(sorted({name for names in OUTPUT_DEPENDENCIES.values() for name in names}))
_SOURCE_PACKAGES = ("neva_core", "tasks", "flows")


def dependency_versions(stage: str | None = None) -> dict[str, str]:
    """The installed version of each package that can change `stage`'s output ("absent" if missing)."""
    versions = {}
    for name in OUTPUT_DEPENDENCIES.get(stage, _ALL_DEPENDENCIES) if stage else _ALL_DEPENDENCIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@functools.cache
def source_version() -> str:
    """A digest of the pipeline's own source: neva_core, tasks and flows."""
    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            digest.update(f"{package}: absent".encode())
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version(stage: str | None = None) -> str:
    """What invalidates cached results of `stage` when it changes: the pipeline's source and the versions
    of the packages that shape that stage's output."""
    return _digest([source_version(), dependency_versions(stage)])[:16]


def cache_key(stage: str, **inputs: Any) -> str:
    """The key of one stage run: its name, its inputs' fingerprints, its parameters and the code version."""
    return _digest([stage, code_version(stage), value_fingerprint(inputs)])


def output_folder(parent: Path, label: str, **params: Any) -> Path:
    """A folder under `parent` for one set of a stage's inputs and parameters: `<label>-<digest>`.

    Different parameters never share a folder, so a run never rewrites an output that a finished run
    (or its cache record) still points at; `prune_outputs` keeps the number of old ones bounded.
    """
    return parent / f"{label}-{_digest(value_fingerprint(params))[:12]}"
