"""Download stage: fetch a Hub file or snapshot, a URL, or a local file into a folder, verified and resumable.

Layout of a destination folder DEST:
- the downloaded files under their final names (a single file as DEST/<basename>, a snapshot under the
  repo's own paths) and, for a snapshot, DEST/manifest.json, written last;
- DEST/.neva-download/records/<path>.json: written after a file is renamed into place; it holds the size,
  sha256, mtime and the remote version, so a rerun can trust the file without moving a byte;
- DEST/.neva-download/partial/<path>.part: bytes received so far, beside <path>.part.json, which names the
  remote version they came from (a resume against a changed remote starts from zero, never splices).

Hashes are computed while the bytes stream (after re-reading the partial prefix once on resume), so a
27 GB file is not read twice. The Hub token never reaches a message, log line, record or manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ContextManager
from urllib.parse import unquote, urlsplit

import requests

from neva_core.data.download_http import (
    CHUNK_BYTES,
    HttpTarget,
    RangeResponse,
    Redactor,
    Retrier,
    RetryPolicy,
    call_with_retries,
    display_url,
    open_http_range,
    probe_url,
    same_origin,
    secrets_kept_out_of_logs,
    status_error,
    url_secrets,
)
from neva_core.errors import NevaError, TransientError
from neva_core.fingerprint import folder_fingerprint
from neva_core.io import MANIFEST_NAME, file_lock, fsync_dir, read_manifest, write_json_atomic, write_manifest

log = logging.getLogger(__name__)

STATE_DIR = ".neva-download"
DEFAULT_ENDPOINT = "https://huggingface.co"
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PROGRESS_EVERY_S = 10.0
ALTERNATIVES = "|"  # separates the alternatives of one include pattern (see `select_paths`)


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class HubSource:
    """A Hub repo (`path` None: a snapshot filtered by include patterns) or one file in it."""

    repo_type: str  # "model" or "dataset"
    repo_id: str
    path: str | None
    revision: str | None  # None: the repo's default branch

    @property
    def display(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        path = f"/{self.path}" if self.path else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"hf://{prefix}{self.repo_id}{path}{revision}"


@dataclass(frozen=True)
class UrlSource:
    url: str = field(repr=False)  # may carry a signed query string: shown only through `display`

    @property
    def display(self) -> str:
        return display_url(self.url)

    def __repr__(self) -> str:
        return f"UrlSource({self.display!r})"


@dataclass(frozen=True)
class LocalSource:
    path: Path

    @property
    def display(self) -> str:
        return str(self.path)


Source = HubSource | UrlSource | LocalSource

_HUB_FORMS = "hf://<org>/<name>[/<path>][@revision] or hf://datasets/<org>/<name>[/<path>][@revision]"


def parse_source(source: str) -> Source:
    """Parse and validate a source string; a malformed one raises NevaError saying what form is expected."""
    text = source.strip()
    if not text:
        raise NevaError(f"the download source is empty; give {_HUB_FORMS}, an https:// URL or a local path")
    if text.startswith("hf://"):
        return _parse_hub(text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise NevaError(f"download source {display_url(text)!r} has no host name")
        return UrlSource(text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise NevaError(f"download source {text!r}: file:// URLs must name a local path (file:///abs/path)")
        return LocalSource(Path(unquote(parts.path)))
    if "://" in text:
        raise NevaError(f"download source {display_url(text)!r}: unsupported scheme {scheme!r}; "
                        "use hf://, https://, http://, file:// or a local path")
    return LocalSource(Path(text).expanduser())


def _parse_hub(text: str) -> HubSource:
    body, at, revision = text[len("hf://"):].rpartition("@")
    if not at:
        body, revision = revision, None
    elif not revision or any(c.isspace() for c in revision) or ".." in revision:
        raise NevaError(f"download source {text!r}: invalid revision {revision!r} after '@' "
                        "(a branch, tag or commit hash)")
    parts = body.split("/")
    repo_type = "model"
    if parts[0] in ("datasets", "models"):
        repo_type = "dataset" if parts[0] == "datasets" else "model"
        parts = parts[1:]
    elif parts[0] == "spaces":
        raise NevaError(f"download source {text!r}: Space repos are not supported; use {_HUB_FORMS}")
    if len(parts) < 2:
        raise NevaError(f"download source {text!r}: expected {_HUB_FORMS}")
    org, name, *path = parts
    for part in (org, name):
        if not _HUB_NAME.fullmatch(part) or "--" in part or ".." in part:
            raise NevaError(f"download source {text!r}: {part!r} is not a valid Hub organisation or repo name; "
                            f"expected {_HUB_FORMS}")
    repo_path = "/".join(path) or None
    if repo_path is not None:
        _check_relpath(repo_path, text)
    return HubSource(repo_type=repo_type, repo_id=f"{org}/{name}", path=repo_path, revision=revision)


def _check_relpath(relpath: str, where: str) -> None:
    """A repo path must stay inside DEST: no empty, '.' or '..' parts, not absolute."""
    parts = relpath.split("/")
    if relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise NevaError(f"{where}: the path {relpath!r} is not a plain relative path inside the repo")


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DownloadedFile:
    path: str  # relative to the destination folder, '/'-separated
    bytes: int
    sha256: str
    transferred: int  # bytes received in this run (0: the file was already complete)


@dataclass(frozen=True)
class DownloadResult:
    """What a download produced. `to_json()` gives a plain dict for task results and logs."""

    source: str  # display form: no credentials
    dest: str
    revision: str | None
    commit: str | None  # the resolved Hub commit
    files: tuple[DownloadedFile, ...]
    manifest: str | None  # DEST/manifest.json for snapshots

    @property
    def paths(self) -> list[Path]:
        return [Path(self.dest, f.path) for f in self.files]

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def transferred_bytes(self) -> int:
        return sum(f.transferred for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "dest": self.dest, "revision": self.revision, "commit": self.commit,
            "manifest": self.manifest, "paths": [str(p) for p in self.paths], "total_bytes": self.total_bytes,
            "transferred_bytes": self.transferred_bytes,
            "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256, "transferred": f.transferred}
                      for f in self.files],
        }


# ------------------------------------------------------------------------------------- one remote file

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
class _StatePaths:
    final: Path
    record: Path
    partial: Path
    sidecar: Path
    lock: Path

    @classmethod
    def of(cls, dest: Path, relpath: str) -> _StatePaths:
        state = dest / STATE_DIR
        # Suffixes are appended, never substituted, so two repo paths never share a state file.
        return cls(final=dest / relpath, record=state / "records" / f"{relpath}.json",
                   partial=state / "partial" / f"{relpath}.part", sidecar=state / "partial" / f"{relpath}.part.json",
                   lock=state / "partial" / f"{relpath}.lock")


def _read_json(path: Path) -> dict[str, Any] | None:
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


def _write_record(paths: _StatePaths, remote: RemoteFile, sha256: str) -> DownloadedFile:
    stat = paths.final.stat()
    write_json_atomic(paths.record, {"source": remote.subject, "validator": remote.validator, "bytes": stat.st_size,
                                     "sha256": sha256, "mtime_ns": stat.st_mtime_ns})
    return DownloadedFile(remote.relpath, stat.st_size, sha256, transferred=0)


def _complete_copy(remote: RemoteFile, paths: _StatePaths) -> DownloadedFile | None:
    """The final file, when its record (or its content) proves it is the wanted version; else None."""
    if not paths.final.is_file():
        return None
    record = _read_json(paths.record)
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


def _adopt_if_verified(remote: RemoteFile, paths: _StatePaths, recorded_sha: str | None) -> DownloadedFile | None:
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

    def __init__(self, remote: RemoteFile, paths: _StatePaths) -> None:
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
        sidecar = _read_json(self._paths.sidecar)
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


def _transfer(remote: RemoteFile, paths: _StatePaths, policy: RetryPolicy) -> DownloadedFile:
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
    paths = _StatePaths.of(dest, remote.relpath)
    if done := _complete_copy(remote, paths):
        return done
    with file_lock(paths.lock, f"{remote.subject} into {paths.final}"):
        if done := _complete_copy(remote, paths):  # another process finished it while we waited
            return done
        return _transfer(remote, paths, policy)


# ------------------------------------------------------------------------------------------- the Hub


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else HF_TOKEN; surrounding whitespace (from a file or secret store) dropped."""
    value = token if token is not None else os.environ.get("HF_TOKEN")
    return (value.strip() or None) if value else None


def resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _hub_subject(src: HubSource, path: str | None = None) -> str:
    kind = "dataset" if src.repo_type == "dataset" else "model"
    where = f" file {path!r}" if path else ""
    at = f" at revision {src.revision!r}" if src.revision else ""
    return f"Hub {kind} repo {src.repo_id!r}{where}{at}"


def _hub_error(error: Any, src: HubSource, redact: Redactor) -> NevaError:
    status = error.response.status_code
    code = error.response.headers.get("X-Error-Code", "")
    if status == 404 and code == "RevisionNotFound":
        return NevaError(f"{_hub_subject(src)}: revision {src.revision!r} not found (HTTP 404); "
                         "check the branch, tag or commit after '@'")
    detail = redact(error.server_message or "")
    return status_error(status, _hub_subject(src, src.path), hub=True, detail=detail)


def _repo_info(src: HubSource, token: str | None, endpoint: str, files_metadata: bool, redact: Redactor) -> Any:
    """One repo_info call through huggingface_hub, its failures turned into NevaError/TransientError."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    failure: NevaError
    try:
        return HfApi(endpoint=endpoint, library_name="neva").repo_info(
            src.repo_id, repo_type=src.repo_type, revision=src.revision, files_metadata=files_metadata,
            token=token or False, timeout=120.0)
    except HfHubHTTPError as error:
        failure = _hub_error(error, src, redact)
    except OfflineModeIsEnabled:
        failure = NevaError(f"{_hub_subject(src)}: HF_HUB_OFFLINE is set; unset it to download from the Hub")
    except httpx2.TransportError as error:
        failure = TransientError(f"{_hub_subject(src)}: cannot reach {endpoint} "
                                 f"({type(error).__name__}: {redact(str(error))})")
    raise failure


def _select(src: HubSource, names: list[str], include: Sequence[str]) -> list[str]:
    if src.path is not None:
        if src.path not in names:
            raise NevaError(f"{_hub_subject(src, src.path)}: no such file in the repo; check the path "
                            f"(the repo has {len(names)} files, e.g. {', '.join(sorted(names)[:5])})")
        return [src.path]
    return select_paths(names, include, _hub_subject(src))


def select_paths(names: Sequence[str], include: Sequence[str], subject: str) -> list[str]:
    """The files of a snapshot that the include patterns keep (all of them without patterns).

    A plain pattern keeps every file it matches; matching nothing is only a warning. A pattern with
    alternatives, "A|B", keeps the files of its first alternative that matches any file, and matching
    none is an error: "*.safetensors|pytorch_model*.bin" fetches a repo's safetensors weights when it has
    them, else its .bin weights, and a repo with neither fails before anything is fetched.
    """
    if not include:
        return sorted(names)
    chosen: set[str] = set()
    for pattern in include:
        alternatives = pattern.split(ALTERNATIVES)
        for alternative in alternatives:
            matched = {n for n in names if fnmatch.fnmatchcase(n, alternative)}
            if matched:
                chosen |= matched
                break
        else:
            if len(alternatives) > 1:
                raise NevaError(f"{subject}: no file matches any of {' or '.join(repr(a) for a in alternatives)} "
                                f"(from --include {pattern!r}, which must match); the snapshot has "
                                f"{_examples(names)}")
            log.warning("%s: --include %r matches no file", subject, pattern)
    if not chosen:
        raise NevaError(f"{subject}: no file matches --include {' '.join(include)}; "
                        f"the snapshot has {_examples(names)}")
    return sorted(chosen)


def _examples(names: Sequence[str]) -> str:
    listed = ", ".join(sorted(names)[:8])
    return f"{len(names)} files, e.g. {listed}" if names else "no files"


@dataclass(frozen=True)
class _Plan:
    files: list[RemoteFile]
    commit: str | None
    manifest: dict[str, Any] | None  # the snapshot manifest's header; None for a single file


def _hub_plan(src: HubSource, include: Sequence[str], sha256: str | None, context: _Context) -> _Plan:
    from huggingface_hub import hf_hub_url

    info = call_with_retries(lambda: _repo_info(src, context.token, context.endpoint, True, context.redact),
                             context.policy)
    if not info.sha:
        raise NevaError(f"{_hub_subject(src)}: the Hub did not report a commit for this revision; check the endpoint")
    siblings = {s.rfilename: s for s in info.siblings or []}
    files = []
    for path in _select(src, list(siblings), include):
        _check_relpath(path, _hub_subject(src))
        sibling = siblings[path]
        url = hf_hub_url(src.repo_id, path, repo_type=src.repo_type, revision=info.sha, endpoint=context.endpoint)
        subject = _hub_subject(src, path)
        target = HttpTarget(url=url, subject=subject, redact=context.redact, hub=True, token=context.token)
        files.append(_hub_remote(sibling, PurePosixPath(path).name if src.path else path, subject, sha256,
                                 context.opener(target)))
    header = None if src.path else {"source": src.display, "repo_type": src.repo_type, "repo_id": src.repo_id,
                                    "revision": src.revision, "commit": info.sha, "include": list(include)}
    return _Plan(files=files, commit=info.sha, manifest=header)


def _hub_remote(sibling: Any, relpath: str, subject: str, sha256: str | None, opener: Opener) -> RemoteFile:
    lfs_sha = sibling.lfs.sha256 if sibling.lfs else None
    size = sibling.lfs.size if sibling.lfs else sibling.size
    blob_id = None if sibling.lfs else sibling.blob_id
    if sha256 and lfs_sha and sha256 != lfs_sha:
        raise NevaError(f"{subject}: the given sha256 {sha256} differs from the Hub's published sha256 {lfs_sha}; "
                        "check the --sha256 value or the revision")
    expected = sha256 or lfs_sha
    # Content-addressed identity: a moved branch whose file did not change needs no new transfer.
    validator = f"sha256:{expected}" if expected else f"git-blob:{blob_id}"
    return RemoteFile(relpath=relpath, subject=subject, size=size, sha256=expected,
                      sha256_origin="the given sha256" if sha256 else "the Hub's published sha256",
                      git_blob_id=blob_id, validator=validator, open_range=opener)


# ------------------------------------------------------------------------------------ URLs and local


def _url_basename(src: UrlSource) -> str:
    name = unquote(PurePosixPath(urlsplit(src.url).path).name)
    if not name or name in (".", ".."):
        raise NevaError(f"download source {src.display!r} does not end in a file name; give the file's own URL")
    return name


def _url_plan(src: UrlSource, sha256: str | None, context: _Context) -> _Plan:
    # The Hub token goes only to the Hub itself (a resolve URL given as https://), never to other hosts.
    token = context.token if same_origin(src.url, context.endpoint) else None
    subject = src.display
    target = HttpTarget(url=src.url, subject=subject, redact=context.redact, hub=token is not None, token=token)
    probe = call_with_retries(lambda: probe_url(context.session, target), context.policy)
    target = dataclasses.replace(target, if_range=probe.if_range)
    validator = f"{probe.validator}|bytes:{probe.size}"
    if not probe.validator:
        # Without an ETag or Last-Modified a later run cannot tell whether the remote changed, so it never
        # resumes this run's partial nor trusts its record (a given sha256 still proves a complete copy).
        validator = f"unversioned:{time.time_ns()}|bytes:{probe.size}"
    remote = RemoteFile(relpath=_url_basename(src), subject=subject, size=probe.size, sha256=sha256,
                        sha256_origin="the given sha256", git_blob_id=None, validator=validator,
                        open_range=context.opener(target), response_validator=probe.validator)
    return _Plan(files=[remote], commit=None, manifest=None)


@contextlib.contextmanager
def _open_local(path: Path, offset: int) -> Iterator[RangeResponse]:
    with open(path, "rb") as f:
        f.seek(offset)
        yield RangeResponse(start=offset, total=None, validator=None, chunks=iter(lambda: f.read(CHUNK_BYTES), b""))


def _local_remote(path: Path, relpath: str, sha256: str | None) -> RemoteFile:
    stat = path.stat()
    return RemoteFile(relpath=relpath, subject=str(path), size=stat.st_size, sha256=sha256,
                      sha256_origin="the given sha256", git_blob_id=None,
                      validator=f"local:{stat.st_size}:{stat.st_mtime_ns}",
                      open_range=lambda offset: _open_local(path, offset))


def _local_plan(src: LocalSource, include: Sequence[str], sha256: str | None) -> _Plan:
    path = src.path.resolve()
    if path.is_file():
        return _Plan(files=[_local_remote(path, path.name, sha256)], commit=None, manifest=None)
    if not path.is_dir():
        raise NevaError(f"download source {src.path} does not exist; check the path")
    # A folder that is itself a download destination: its own state and manifest are not content.
    names = sorted(n for n in (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
                   if n != MANIFEST_NAME and not n.startswith(f"{STATE_DIR}/"))
    if not names:
        raise NevaError(f"download source {src.path}: no file to copy (the folder is empty)")
    names = select_paths(names, include, f"download source {src.path}")
    files = [_local_remote(path / n, n, None) for n in names]
    return _Plan(files=files, commit=None, manifest={"source": str(path), "include": list(include)})


# ----------------------------------------------------------------------------------------- the stage


@dataclass
class _Context:
    token: str | None = field(repr=False)
    endpoint: str
    policy: RetryPolicy
    redact: Redactor = field(repr=False)
    session: requests.Session = field(repr=False)

    def opener(self, target: HttpTarget) -> Opener:
        return lambda offset: open_http_range(self.session, target, offset)


def _is_single_file(source: Source) -> bool:
    if isinstance(source, HubSource):
        return source.path is not None
    return isinstance(source, UrlSource) or source.path.is_file()


def _check_request(source: Source, dest: Path, include: Sequence[str], sha256: str | None) -> None:
    if dest.exists() and not dest.is_dir():
        raise NevaError(f"download destination {dest} is a file; DEST must be a folder")
    single = _is_single_file(source)
    if include and single:
        raise NevaError(f"--include applies to snapshots (hf://<org>/<name>, a local folder); "
                        f"{source.display} is a single file")
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise NevaError(f"--sha256 {sha256!r} is not a sha256 (64 hexadecimal digits)")
    if sha256 is not None and not single:
        raise NevaError(f"--sha256 applies to a single file; {source.display} is a snapshot")


def _plan(source: Source, include: Sequence[str], sha256: str | None, context: _Context) -> _Plan:
    if isinstance(source, HubSource):
        return _hub_plan(source, include, sha256, context)
    if isinstance(source, UrlSource):
        return _url_plan(source, sha256, context)
    return _local_plan(source, include, sha256)


def _fetch_all(plan: _Plan, dest: Path, policy: RetryPolicy) -> tuple[DownloadedFile, ...]:
    if plan.manifest is not None:
        if any(f.relpath == MANIFEST_NAME or f.relpath.split("/")[0] == STATE_DIR for f in plan.files):
            raise NevaError(f"the snapshot contains {MANIFEST_NAME} or {STATE_DIR}/, names this stage uses itself; "
                            "leave them out with --include patterns that do not match them")
        done = [_complete_copy(remote, _StatePaths.of(dest, remote.relpath)) for remote in plan.files]
        if all(done):
            return tuple(done)  # type: ignore[arg-type]
        # The folder is complete only once the new manifest is written: withdraw the old one first.
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
    return tuple(fetch_file(remote, dest, policy) for remote in plan.files)


def _write_snapshot_manifest(dest: Path, header: dict[str, Any], files: Sequence[DownloadedFile]) -> str:
    manifest = {"stage": "download", **header, "files": {f.path: {"bytes": f.bytes, "sha256": f.sha256} for f in files}}
    path = dest / MANIFEST_NAME
    if not (path.is_file() and _read_json(path) == manifest):  # an unchanged one stays: its readers see no gap
        write_manifest(dest, manifest)
    return str(path)


def download(source: str, dest: Path | str, *, include: Sequence[str] = (), sha256: str | None = None,
             token: str | None = None, endpoint: str | None = None, max_retries: int = 5,
             backoff_s: float = 1.0) -> DownloadResult:
    """Download `source` into the folder `dest`; a rerun over a complete, verified copy transfers nothing.

    `token` (else HF_TOKEN) is sent to the Hub endpoint only. `endpoint` (else HF_ENDPOINT) selects the Hub.
    Transient failures are retried `max_retries` times with exponential backoff starting at `backoff_s`.
    """
    parsed = parse_source(source)
    dest = Path(dest).absolute()
    sha256 = sha256.lower() if sha256 else None
    _check_request(parsed, dest, include, sha256)
    resolved_token = resolve_token(token)
    secrets = [resolved_token] + (url_secrets(parsed.url) if isinstance(parsed, UrlSource) else [])
    policy = RetryPolicy(max_retries=max_retries, backoff_s=backoff_s)
    with secrets_kept_out_of_logs(secrets), requests.Session() as session:
        context = _Context(token=resolved_token, endpoint=resolve_endpoint(endpoint), policy=policy,
                           redact=Redactor(secrets), session=session)
        plan = _offline_plan(parsed, dest, include) if _hub_offline(parsed) else _plan(parsed, include, sha256, context)
        dest.mkdir(parents=True, exist_ok=True)
        # One run at a time per DEST (two pipeline runs): the second finds the files complete.
        with file_lock(dest / STATE_DIR / "dest.lock", f"{parsed.display} into {dest}"):
            files = _fetch_all(plan, dest, policy)
            manifest = _write_snapshot_manifest(dest, plan.manifest, files) if plan.manifest is not None else None
    revision = parsed.revision if isinstance(parsed, HubSource) else None
    return DownloadResult(source=parsed.display, dest=str(dest), revision=revision, commit=plan.commit,
                          files=files, manifest=manifest)


def _hub_offline(source: Source) -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return isinstance(source, HubSource) and (flag or constants.HF_HUB_OFFLINE)


def _offline_plan(src: HubSource, dest: Path, include: Sequence[str]) -> _Plan:
    """HF_HUB_OFFLINE: what an earlier run recorded in DEST, at its recorded commit; every file must still
    be complete (checked against its record), since nothing can be fetched."""
    files, commit, header = _recorded_download(src, dest, include)
    remotes = []
    for relpath, entry in files.items():
        subject = _hub_subject(src, src.path or relpath)

        def unavailable(offset: int, subject: str = subject) -> ContextManager[RangeResponse]:
            raise NevaError(f"{subject}: HF_HUB_OFFLINE is set and the copy in {dest} is incomplete or changed; "
                            "unset HF_HUB_OFFLINE to download it again")

        remotes.append(RemoteFile(relpath=relpath, subject=subject, size=entry["bytes"], sha256=entry["sha256"],
                                  sha256_origin="the recorded sha256", git_blob_id=None,
                                  validator=f"sha256:{entry['sha256']}", open_range=unavailable))
    return _Plan(files=remotes, commit=commit, manifest=header)


def _recorded_download(
    src: HubSource, dest: Path, include: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], str | None, dict[str, Any] | None]:
    """The files (path -> bytes, sha256), commit and manifest header an earlier download of `src` left in DEST."""
    missing = NevaError(f"{_hub_subject(src)}: HF_HUB_OFFLINE is set and {dest} holds no complete download of it "
                        f"with these include patterns; run once online (or unset HF_HUB_OFFLINE)")
    if src.path is not None:
        relpath = PurePosixPath(src.path).name
        record = _read_json(_StatePaths.of(dest, relpath).record)
        if record is None or record.get("source") != _hub_subject(src, src.path):
            raise missing
        return {relpath: {"bytes": record["bytes"], "sha256": record["sha256"]}}, None, None
    try:
        manifest = read_manifest(dest)
    except NevaError:
        raise missing from None
    header = {key: manifest.get(key) for key in ("source", "repo_type", "repo_id", "revision", "commit", "include")}
    if (manifest.get("stage") != "download" or header["source"] != src.display or header["include"] != list(include)
            or not header["commit"]):
        raise missing
    return manifest["files"], header["commit"], header


def remote_fingerprint(source: str, token: str | None = None, endpoint: str | None = None, *,
                       dest: Path | str | None = None, include: Sequence[str] = ()) -> str:
    """A cheap string that changes when the remote content may have changed (for a task's cache key).

    hf://: the resolved commit (with HF_HUB_OFFLINE set: the one recorded in `dest`, so an offline rerun
    needs no Hub); http(s): ETag or Last-Modified and size; local: size and mtime.
    """
    parsed = parse_source(source)
    if isinstance(parsed, LocalSource):
        return _local_fingerprint(parsed.path)
    if _hub_offline(parsed):
        if dest is None:
            raise NevaError(f"{parsed.display}: HF_HUB_OFFLINE is set and no earlier download is known")
        files, commit, _ = _recorded_download(parsed, Path(dest).absolute(), include)
        if commit is None:  # a single file: its recorded content
            return f"hf:{parsed.repo_type}:{parsed.repo_id}:sha256:{next(iter(files.values()))['sha256']}"
        return f"hf:{parsed.repo_type}:{parsed.repo_id}@{commit}"
    resolved_token = resolve_token(token)
    secrets = [resolved_token] + (url_secrets(parsed.url) if isinstance(parsed, UrlSource) else [])
    with secrets_kept_out_of_logs(secrets):
        return _remote_fingerprint(parsed, resolved_token, resolve_endpoint(endpoint), Redactor(secrets))


def _remote_fingerprint(parsed: HubSource | UrlSource, token: str | None, endpoint: str, redact: Redactor) -> str:
    policy = RetryPolicy(max_retries=2)
    if isinstance(parsed, HubSource):
        info = call_with_retries(lambda: _repo_info(parsed, token, endpoint, False, redact), policy)
        return f"hf:{parsed.repo_type}:{parsed.repo_id}@{info.sha}"
    hub_token = token if same_origin(parsed.url, endpoint) else None
    target = HttpTarget(url=parsed.url, subject=parsed.display, hub=hub_token is not None, token=hub_token,
                        redact=redact)
    with requests.Session() as session:
        probe = call_with_retries(lambda: probe_url(session, target), policy)
    return f"url:{probe.validator or 'unversioned'}|bytes:{probe.size}"


def _local_fingerprint(path: Path) -> str:
    if path.is_file():
        stat = path.stat()
        return f"local:{stat.st_size}:{stat.st_mtime_ns}"
    if not path.is_dir():
        raise NevaError(f"download source {path} does not exist; check the path")
    return f"local-dir:{folder_fingerprint(path)['listing_sha256']}"
