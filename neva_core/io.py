"""Crash-safe file output: temporary name beside the target, fsync, rename; manifests written last.

Every stage writes through these helpers so that a killed run never leaves a file or folder under its
final name that a later run could mistake for a complete one. `commit_output` is the one way a stage
publishes a folder; `file_lock` is the one lock.

Shared filesystems (several hosts writing one workdir): temporary names carry the writer's host and pid,
and a temporary is judged abandoned by its pid only when this host wrote it; another host's temporaries
are never removed (a warning names them). Locks are POSIX record locks (`fcntl.lockf`), which NFSv4 (and
NFSv3 with a running lockd/statd) enforces across hosts; mounts with `local_lock=posix` or `local_lock=all`
(or `nolock`) make them local to one host, and several hosts must then not share a workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import blake3

from neva_core.errors import NevaError

MANIFEST_NAME = "manifest.json"
# The hash of the files our own stages write into their manifests. sha256 costs about one core-second per
# GB, as much as the disk write itself; blake3 is several times faster and spreads over free cores (the
# README's hash figures). sha256 stays where a published checksum is compared (the Hub's LFS sha256), and
# manifests name the hash of each entry, so older ones (sha256) still verify.
OUTPUT_HASH = "blake3"
_HASHERS: dict[str, Callable[[], Any]] = {
    "sha256": hashlib.sha256,
    "blake3": lambda: blake3.blake3(max_threads=blake3.blake3.AUTO),
}
_CHUNK = 8 << 20
# .<target>.tmp-<host>-<pid>-<random>; names without a host are from older versions (this host's).
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-)?(?P<pid>\d+)-[0-9a-f]{8}")

log = logging.getLogger(__name__)
T = TypeVar("T")


def _host() -> str:
    # Dashes separate the name's fields, so they are replaced; dots and underscores stay.
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"


def temp_name(dest: Path) -> Path:
    """A unique temporary sibling of `dest` (same filesystem, so the final rename is atomic), naming
    this host and process."""
    return dest.with_name(f".{dest.name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


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


def _abandoned_temps(folder: Path, target: str) -> Iterator[Path]:
    """Temporaries of `target` in `folder` that this host wrote and whose writer is gone.

    A killed run can leave gigabytes under a temporary name; nothing trusts it, but the disk space must
    come back. Temporaries of a live process here, and every temporary another host wrote, are left alone.
    """
    if not folder.is_dir():
        return
    host = _host()
    for entry in sorted(folder.iterdir()):
        match = _TEMP_NAME.fullmatch(entry.name)
        if not match or match["target"] != target:
            continue
        if match["host"] not in (None, host):
            log.warning("leaving %s alone: host %s wrote it (remove it by hand once no run there is writing it)",
                        entry, match["host"])
            continue
        if not _process_alive(int(match["pid"])):
            yield entry


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


# --- the lock ---------------------------------------------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def lock_path(dest: Path) -> Path:
    """The lock file of an output: a hidden sibling, so it never becomes part of the output."""
    return dest.with_name(f".{dest.name}.lock")


@contextlib.contextmanager
def file_lock(lock_file: Path, what: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock on `lock_file` (created if needed); wait, saying so, while another holds it.

    Yields True once held; with `wait=False` it yields False at once instead of waiting. Other processes
    and hosts are kept out by a POSIX record lock (released by the kernel, or the NFS server's lease,
    when the holder dies); other threads of this process by a thread lock, since POSIX locks belong to
    the process.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(str(lock_file.absolute()), threading.Lock())
    if not thread_lock.acquire(blocking=False):
        if not wait:
            yield False
            return
        log.info("waiting for another run writing %s to finish", what)
        thread_lock.acquire()
    try:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise NevaError(f"cannot create the lock file {lock_file}: {exc.strerror or exc}; "
                            "check its folder's permissions") from exc
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if not wait:
                    yield False
                    return
                log.info("waiting for another run writing %s to finish", what)
                fcntl.lockf(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # releases the lock
    finally:
        thread_lock.release()


# --- committing a stage's output --------------------------------------------------------------------


def commit_output(
    dest: Path | str,
    *,
    reuse: Callable[[Path], T | None],
    build: Callable[[Path], T],
    resume: bool = False,
) -> T:
    """Reuse a finished output at `dest` made with these parameters, else build it beside and rename it in.

    Under `dest`'s lock (so concurrent runs of the same stage compute it once: the second waits, then
    reuses): `reuse(dest)` is called when `dest` exists and returns its result if it was made from the
    same inputs and parameters, None if the stage made it from others, and raises NevaError if the folder
    is not the stage's own (a foreign folder is never replaced). Otherwise `build(tmp)` writes the whole
    output, manifest last, into a temporary sibling, which is renamed to `dest`. A different earlier
    output is swapped out only once the new one is complete, then deleted, so `dest` always holds a whole
    output. With `resume`, the temporary that a killed writer on this host left is adopted and handed to
    `build` (which must check what it finds there); otherwise it is deleted, and so is a failed build's.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(dest), str(dest)):
        if dest.exists() or dest.is_symlink():
            found = reuse(dest)
            if found is not None:
                return found
            log.info("%s holds an output of other inputs or parameters; building the new one beside it", dest)
        tmp = temp_name(dest)
        abandoned = list(_abandoned_temps(dest.parent, dest.name))
        if resume and abandoned:
            log.info("resuming from %s, left by an interrupted run", abandoned[0])
            os.rename(abandoned.pop(0), tmp)
        else:
            tmp.mkdir()
        for entry in abandoned:
            log.info("removing %s, left by an interrupted run", entry)
            _remove(entry)
        try:
            result = build(tmp)
            _publish(tmp, dest)
        except BaseException:
            if not resume:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return result


def refuse_existing(folder: Path) -> None:
    """`commit_output`'s reuse check for outputs whose inputs (weights in memory) cannot be compared:
    any folder already there is refused, never replaced."""
    raise NevaError(f"{folder} already exists; remove it or choose another output path")


def _publish(tmp: Path, dest: Path) -> None:
    fsync_dir(tmp)
    previous = None
    if dest.exists() or dest.is_symlink():
        previous = temp_name(dest)  # a temporary name: a crash before its removal leaves nothing trusted
        os.rename(dest, previous)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    if previous is not None:
        _remove(previous)


_KEYED_NAME = re.compile(r"(?P<label>.+)-[0-9a-f]{12}")


def prune_outputs(used: Path, keep: int) -> list[Path]:
    """Delete older outputs beside `used` with the same label (`<label>-<digest>`, see
    `fingerprint.output_folder`), keeping `used` and the `keep - 1` most recently written others.

    An output that some run holds the lock of (it is being written or checked) is skipped. A finished
    run whose output was pruned is not harmed: its cache record no longer validates, so a rerun rebuilds.
    Returns what was deleted.
    """
    match = _KEYED_NAME.fullmatch(used.name)
    if match is None or not used.parent.is_dir():
        return []
    siblings = [entry for entry in used.parent.iterdir()
                if entry != used and entry.is_dir() and _KEYED_NAME.fullmatch(entry.name)
                and _KEYED_NAME.fullmatch(entry.name)["label"] == match["label"]]
    siblings.sort(key=lambda entry: entry.stat().st_mtime_ns, reverse=True)
    removed = []
    for entry in siblings[max(keep - 1, 0):]:
        if _remove_unless_locked(entry):
            removed.append(entry)
    return removed


def _remove_unless_locked(output: Path) -> bool:
    with file_lock(lock_path(output), str(output), wait=False) as held:
        if not held:
            return False
        log.info("removing %s, an older output (keeping the newest ones)", output)
        doomed = temp_name(output)
        os.rename(output, doomed)  # out of sight at once; a crash mid-delete leaves only a temporary
        shutil.rmtree(doomed, ignore_errors=True)
        return True


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


def new_hasher(name: str) -> Any:
    """A fresh hash object (`update`, `hexdigest`) of the algorithm `name` ("sha256" or "blake3")."""
    if name not in _HASHERS:
        raise NevaError(f"unknown hash {name!r} (known: {', '.join(sorted(_HASHERS))}); "
                        "the manifest was written by a newer neva")
    return _HASHERS[name]()


def hash_file(path: Path | str, name: str) -> str:
    digest = new_hasher(name)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path | str) -> str:
    return hash_file(path, "sha256")


def file_entry(path: Path, hash_name: str = "sha256") -> dict[str, Any]:
    """Size and hash of one file, as manifests record it: {"bytes": n, <hash name>: hex digest}."""
    return {"bytes": path.stat().st_size, hash_name: hash_file(path, hash_name)}


def entry_hash(entry: dict[str, Any]) -> tuple[str, str]:
    """(hash name, hex digest) that a manifest entry records."""
    for name in _HASHERS:
        if name in entry:
            return name, entry[name]
    raise NevaError(f"manifest entry {entry!r} records no hash neva knows ({', '.join(sorted(_HASHERS))})")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` into `folder`. Call it last: its presence marks the folder complete."""
    path = folder / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def read_json(path: Path, missing: str) -> Any:
    """The JSON document at `path`; NevaError `missing` when there is no such file, or naming it when it
    is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NevaError(missing) from None
    except json.JSONDecodeError as exc:
        raise NevaError(f"{path} is not valid JSON ({exc})") from exc


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


def read_own_manifest(folder: Path, what: str, key: str, value: Any) -> dict[str, Any]:
    """The manifest of an existing output folder that a stage wrote (manifest[key] == value); any other
    folder is an error, so `commit_output` never replaces what the stage did not write."""
    refusal = f"{folder} already exists and is not {what}"
    try:
        manifest = read_manifest(folder)
    except NevaError as exc:
        raise NevaError(f"{refusal} ({exc}); remove it or choose another output folder") from exc
    if manifest.get(key) != value:
        raise NevaError(f"{refusal}; remove it or choose another output folder")
    return manifest


def verify_files(folder: Path, files: dict[str, dict[str, Any]], *, check_hash: bool = True) -> None:
    """Check each listed file's size (and hash, of the algorithm each entry names) against a manifest's
    `files` table."""
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
        if not check_hash:
            continue
        hash_name, digest = entry_hash(expected)
        if hash_file(path, hash_name) != digest:
            raise NevaError(
                f"{path} does not match its {hash_name} in the manifest: the file is damaged; "
                f"delete {folder} and run the stage again"
            )
