"""Fetching one remote file into a destination folder: resumable, verified while it streams, recorded.

Its state lives under DEST/.neva-download/ (records/<path>.json once complete, partial/<path>.part while not;
the download module describes the layout). Hashes are computed while the bytes stream (after re-reading
the partial prefix once on resume), so a 27 GB file is not read twice. The Hub token never reaches a
message, log line, record or manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

from neva_core.data.download_http import CHUNK_BYTES, RangeResponse, Retrier, RetryPolicy
from neva_core.errors import NevaError, TransientError
from neva_core.io import file_lock, fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

STATE_DIR = ".neva-download"
_PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class DownloadedFile:
    path: str  # relative to the destination folder, '/'-separated
    bytes: int
    sha256: str
    transferred: int  # bytes received in this run (0: the file was already complete)


Opener = Callable[[int], ContextManager[RangeResponse]]


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where it goes, what it must hash to, and how to open it from an offset."""

    relpath: str
    subject: str  # how messages name it: repo and path, or a URL without credentials
    size: int | None
    sha256: str | None  # expected: the Hub's LFS sha256 or the caller's --sha256
    sha256_origin: str  # where the expected sha256 comes from, for the mismatch message
    git_blob_id: str | None  # expected git blob id of a small (non-LFS) Hub file
    validator: str  # identity of the remote version; a partial is resumed only under the same one
    open_range: Opener = field(repr=False, compare=False)
    response_validator: str | None = None  # each response's ETag/Last-Modified must still be this one


@dataclass(frozen=True)
class StatePaths:
    final: Path
    record: Path
    partial: Path
    sidecar: Path
    lock: Path

    @classmethod
    def of(cls, dest: Path, relpath: str) -> StatePaths:
        state = dest / STATE_DIR
        # Suffixes are appended, never substituted, so two repo paths never share a state file.
        return cls(final=dest / relpath, record=state / "records" / f"{relpath}.json",
                   partial=state / "partial" / f"{relpath}.part", sidecar=state / "partial" / f"{relpath}.part.json",
                   lock=state / "partial" / f"{relpath}.lock")


def read_state_json(path: Path) -> dict[str, Any] | None:
    """A state file's content, or None when it is missing or damaged (state is then simply rebuilt)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _git_blob_hasher(size: int) -> Any:
    # Git's object id of a file: sha1 over a "blob <size>\0" header and the content.
    hasher = hashlib.sha1(usedforsecurity=False)
    hasher.update(b"blob %d\0" % size)
    return hasher


def _hash_file(path: Path, git_size: int | None) -> tuple[str, str | None]:
    sha = hashlib.sha256()
    git = _git_blob_hasher(git_size) if git_size is not None else None
    with open(path, "rb") as f:
        while chunk := f.read(8 * CHUNK_BYTES):
            sha.update(chunk)
            if git is not None:
                git.update(chunk)
    return sha.hexdigest(), git.hexdigest() if git is not None else None


def _write_record(paths: StatePaths, remote: RemoteFile, sha256: str) -> DownloadedFile:
    stat = paths.final.stat()
    write_json_atomic(paths.record, {"source": remote.subject, "validator": remote.validator, "bytes": stat.st_size,
                                     "sha256": sha256, "mtime_ns": stat.st_mtime_ns})
    return DownloadedFile(remote.relpath, stat.st_size, sha256, transferred=0)


def complete_copy(remote: RemoteFile, paths: StatePaths) -> DownloadedFile | None:
    """The final file, when its record (or its content) proves it is the wanted version; else None."""
    if not paths.final.is_file():
        return None
    record = read_state_json(paths.record)
    stat = paths.final.stat()
    recorded_sha = None
    if record and _record_matches(record, remote) and record.get("bytes") == stat.st_size:
        if record.get("mtime_ns") == stat.st_mtime_ns:
            return DownloadedFile(remote.relpath, stat.st_size, record["sha256"], transferred=0)
        recorded_sha = record.get("sha256")  # touched since it was recorded: its content must still match
    return _adopt_if_verified(remote, paths, recorded_sha)


def _record_matches(record: dict[str, Any], remote: RemoteFile) -> bool:
    if remote.sha256 is not None:
        return record.get("sha256") == remote.sha256
    return record.get("validator") == remote.validator


def _adopt_if_verified(remote: RemoteFile, paths: StatePaths, recorded_sha: str | None) -> DownloadedFile | None:
    """Trust a final file with no usable record (a run killed after the rename) if its hash proves it."""
    size = paths.final.stat().st_size
    if remote.size is not None and size != remote.size:
        return None
    if not (remote.sha256 or remote.git_blob_id or recorded_sha):
        return None  # nothing to check the content against: fetch it again
    sha, git = _hash_file(paths.final, size if remote.git_blob_id else None)
    wanted = [(sha, remote.sha256), (git, remote.git_blob_id), (sha, recorded_sha)]
    if any(expected is not None and actual != expected for actual, expected in wanted):
        return None
    log.info("%s: %s is already complete and verified", remote.subject, paths.final)
    return _write_record(paths, remote, sha)


class _Partial:
    """The bytes received so far, with their running hashes and the sidecar that names their version."""

    def __init__(self, remote: RemoteFile, paths: StatePaths) -> None:
        self._remote = remote
        self._paths = paths
        self.received = 0
        paths.partial.parent.mkdir(parents=True, exist_ok=True)
        if self._resumable():
            self._rehash_prefix()
        else:
            self._start_empty()
        self._file = open(paths.partial, "ab")

    def _resumable(self) -> bool:
        sidecar = read_state_json(self._paths.sidecar)
        if not self._paths.partial.is_file() or sidecar != self._sidecar():
            return False
        size = self._paths.partial.stat().st_size
        return self._remote.size is None or size <= self._remote.size

    def _sidecar(self) -> dict[str, Any]:
        return {"source": self._remote.subject, "validator": self._remote.validator, "bytes": self._remote.size}

    def _new_hashers(self) -> None:
        self.sha256 = hashlib.sha256()
        size = self._remote.size
        self.git = _git_blob_hasher(size) if self._remote.git_blob_id and size is not None else None

    def _start_empty(self) -> None:
        self._paths.partial.unlink(missing_ok=True)
        write_json_atomic(self._paths.sidecar, self._sidecar())
        self._paths.partial.touch()
        self._new_hashers()
        self.offset = 0

    def _rehash_prefix(self) -> None:
        self._new_hashers()
        self.offset = 0
        with open(self._paths.partial, "rb") as f:
            while chunk := f.read(8 * CHUNK_BYTES):
                self._update(chunk)
        log.info("%s: resuming at byte %d", self._remote.subject, self.offset)

    def _update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.git is not None:
            self.git.update(chunk)
        self.offset += len(chunk)

    def append(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._update(chunk)
        self.received += len(chunk)

    def restart(self) -> None:
        self._file.truncate(0)
        self._file.seek(0)
        self._new_hashers()
        self.offset = 0

    def done(self) -> bool:
        return self._remote.size is not None and self.offset >= self._remote.size

    def seal(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self._paths.partial.unlink(missing_ok=True)
        self._paths.sidecar.unlink(missing_ok=True)


class _Progress:
    def __init__(self, subject: str, total: int | None) -> None:
        self._subject, self._total = subject, total
        self._started = self._last = time.monotonic()

    def report(self, offset: int, received: int) -> None:
        now = time.monotonic()
        if now - self._last < _PROGRESS_EVERY_S:
            return
        self._last = now
        rate = received / max(now - self._started, 1e-9) / 2**20
        total = f" of {self._total / 2**20:.1f}" if self._total is not None else ""
        log.info("%s: %.1f%s MiB (%.1f MiB/s)", self._subject, offset / 2**20, total, rate)


def _stream_once(remote: RemoteFile, partial: _Partial, progress: _Progress) -> None:
    """One request from the current offset; returns when the body ended, raises TransientError if it broke."""
    with remote.open_range(partial.offset) as response:
        if remote.response_validator and response.validator and response.validator != remote.response_validator:
            raise _BadBytes(f"{remote.subject} changed on the server during the download")
        if response.total is not None and remote.size is not None and response.total != remote.size:
            raise _BadBytes(f"{remote.subject}: the server now reports {response.total} bytes, not {remote.size}")
        if response.start != partial.offset:
            if response.start != 0:
                raise TransientError(f"{remote.subject}: asked for byte {partial.offset}, got {response.start}")
            if partial.offset:
                log.warning("%s: the server does not resume; restarting from byte 0", remote.subject)
            partial.restart()
        for chunk in response.chunks:
            partial.append(chunk)
            if remote.size is not None and partial.offset > remote.size:
                raise _BadBytes(f"{remote.subject}: the server sent more than the published {remote.size} bytes")
            progress.report(partial.offset, partial.received)
    if remote.size is not None and partial.offset < remote.size:
        raise TransientError(f"{remote.subject}: connection closed at byte {partial.offset} of {remote.size}")


class _BadBytes(NevaError):
    """The received bytes cannot become the wanted file; they are deleted, never resumed from."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; the download was deleted and nothing was kept under its name. "
                         "Run again; if it repeats, the remote file or the expected hash is wrong")


def _receive(remote: RemoteFile, partial: _Partial, policy: RetryPolicy) -> None:
    retrier = Retrier(policy)
    progress = _Progress(remote.subject, remote.size)
    while not partial.done():
        before = partial.received
        try:
            _stream_once(remote, partial, progress)
        except TransientError as error:
            if partial.received > before:
                retrier.progressed()
            retrier.failed(error)
            continue
        if remote.size is None:
            return  # no published size: the end of a complete response is the end of the file


def _verify(remote: RemoteFile, partial: _Partial) -> str:
    """The sha256 of the received bytes; raises NevaError naming both hashes when they differ."""
    sha = partial.sha256.hexdigest()
    checks = [("sha256", sha, remote.sha256, remote.sha256_origin)]
    if partial.git is not None:
        checks.append(("git blob id", partial.git.hexdigest(), remote.git_blob_id, "the Hub's git blob id"))
    for kind, actual, expected, origin in checks:
        if expected is not None and actual != expected:
            raise _BadBytes(f"{remote.subject}: the downloaded bytes have {kind} {actual}, but {origin} is {expected}")
    return sha


def _transfer(remote: RemoteFile, paths: StatePaths, policy: RetryPolicy) -> DownloadedFile:
    paths.record.unlink(missing_ok=True)  # whatever sits under the final name is no longer vouched for
    partial = _Partial(remote, paths)
    try:
        _receive(remote, partial, policy)
        sha = _verify(remote, partial)
        partial.seal()
    except _BadBytes:
        partial.discard()
        raise
    finally:
        partial.close()  # any other failure keeps the partial: the next run resumes from it
    paths.final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(paths.partial, paths.final)
    fsync_dir(paths.final.parent)
    paths.sidecar.unlink(missing_ok=True)
    done = _write_record(paths, remote, sha)
    log.info("%s: saved %s (%d bytes)", remote.subject, paths.final, done.bytes)
    return DownloadedFile(done.path, done.bytes, done.sha256, transferred=partial.received)


def fetch_file(remote: RemoteFile, dest: Path, policy: RetryPolicy) -> DownloadedFile:
    """Bring one remote file to DEST/<relpath>, or confirm the copy already there, without re-transfer."""
    paths = StatePaths.of(dest, remote.relpath)
    if done := complete_copy(remote, paths):
        return done
    with file_lock(paths.lock, f"{remote.subject} into {paths.final}"):
        if done := complete_copy(remote, paths):  # another process finished it while we waited
            return done
        return _transfer(remote, paths, policy)
