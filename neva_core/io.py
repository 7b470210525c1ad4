"""Crash-safe file output: temporary name beside the target, fsync, rename; manifests written last.

Every stage writes through these helpers so that a killed run never leaves a file or folder under its
final name that a later run could mistake for a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError

MANIFEST_NAME = "manifest.json"
_CHUNK = 8 << 20
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}")

log = logging.getLogger(__name__)


def temp_name(dest: Path) -> Path:
    """A unique temporary sibling of `dest` (same filesystem, so the final rename is atomic)."""
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp-" in path.name


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(folder: Path, target: str | None = None) -> None:
    """Delete temporaries in `folder` (of the file named `target` only, if given) whose writer is gone.

    A killed run can leave gigabytes under a temporary name; nothing ever trusts it, but the disk space
    must come back. The writer's pid is part of the name (`temp_name`), so the temporaries of a run
    still going on are left alone.
    """
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _TEMP_NAME.fullmatch(entry.name)
        if not match or (target is not None and match["target"] != target) or _process_alive(int(match["pid"])):
            continue
        log.info("removing %s, left by an interrupted run", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(dest: Path | str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `dest`; on success fsync it and rename it to `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success rename it to `dest`.

    `dest` must not exist: a finished output is never overwritten in place. On failure the temporary
    folder is removed, so nothing half-written remains.
    """
    dest = Path(dest)
    if dest.exists():
        raise NevaError(f"{dest} already exists; remove it or choose another output path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(dest: Path | str, obj: Any) -> None:
    with atomic_file(dest, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """Size and sha256 of one file, as manifests record it."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` into `folder`. Call it last: its presence marks the folder complete."""
    path = folder / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def read_manifest(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise NevaError(
            f"{path} is missing: {folder} is incomplete (an interrupted run?). Delete it and run the stage again."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NevaError(f"{path} is not valid JSON ({exc}); delete {folder} and run the stage again") from exc


def verify_files(folder: Path, files: dict[str, dict[str, Any]], *, check_hash: bool = True) -> None:
    """Check each listed file's size (and sha256) against a manifest's `files` table."""
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise NevaError(f"{path} is listed in the manifest but missing; delete {folder} and run the stage again")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise NevaError(
                f"{path} has {size} bytes, the manifest says {expected['bytes']}: the file is damaged; "
                f"delete {folder} and run the stage again"
            )
        if check_hash and sha256_file(path) != expected["sha256"]:
            raise NevaError(
                f"{path} does not match its sha256 in the manifest: the file is damaged; "
                f"delete {folder} and run the stage again"
            )
