"""Planning a download: which files a source resolves to (the Hub's file list and LFS hashes, a URL's
validator, a local folder's files), each with its expected hash and a way to open it; offline, what an
earlier run recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
import time
from collections.abc import Iterator, Sequence
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
    RetryPolicy,
    call_with_retries,
    open_http_range,
    probe_url,
    same_origin,
    status_error,
)
from neva_core.errors import NevaError, TransientError
from neva_core.io import MANIFEST_NAME, read_manifest
from neva_core.data.download_sources import HubSource, LocalSource, Source, UrlSource, check_relpath
from neva_core.data.download_transfer import STATE_DIR, Opener, RemoteFile, StatePaths, read_state_json

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
ALTERNATIVES = "|"  # separates the alternatives of one include pattern (see `select_paths`)


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else HF_TOKEN; surrounding whitespace (from a file or secret store) dropped."""
    value = token if token is not None else os.environ.get("HF_TOKEN")
    return (value.strip() or None) if value else None


def resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_subject(src: HubSource, path: str | None = None) -> str:
    kind = "dataset" if src.repo_type == "dataset" else "model"
    where = f" file {path!r}" if path else ""
    at = f" at revision {src.revision!r}" if src.revision else ""
    return f"Hub {kind} repo {src.repo_id!r}{where}{at}"


def _hub_error(error: Any, src: HubSource, redact: Redactor) -> NevaError:
    status = error.response.status_code
    code = error.response.headers.get("X-Error-Code", "")
    if status == 404 and code == "RevisionNotFound":
        return NevaError(f"{hub_subject(src)}: revision {src.revision!r} not found (HTTP 404); "
                         "check the branch, tag or commit after '@'")
    detail = redact(error.server_message or "")
    return status_error(status, hub_subject(src, src.path), hub=True, detail=detail)


def repo_info(src: HubSource, token: str | None, endpoint: str, files_metadata: bool, redact: Redactor) -> Any:
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
        failure = NevaError(f"{hub_subject(src)}: HF_HUB_OFFLINE is set; unset it to download from the Hub")
    except httpx2.TransportError as error:
        failure = TransientError(f"{hub_subject(src)}: cannot reach {endpoint} "
                                 f"({type(error).__name__}: {redact(str(error))})")
    raise failure


def _select(src: HubSource, names: list[str], include: Sequence[str]) -> list[str]:
    if src.path is not None:
        if src.path not in names:
            raise NevaError(f"{hub_subject(src, src.path)}: no such file in the repo; check the path "
                            f"(the repo has {len(names)} files, e.g. {', '.join(sorted(names)[:5])})")
        return [src.path]
    return select_paths(names, include, hub_subject(src))


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
class DownloadPlan:
    files: list[RemoteFile]
    commit: str | None
    manifest: dict[str, Any] | None  # the snapshot manifest's header; None for a single file


@dataclass
class PlanContext:
    token: str | None = field(repr=False)
    endpoint: str
    policy: RetryPolicy
    redact: Redactor = field(repr=False)
    session: requests.Session = field(repr=False)

    def opener(self, target: HttpTarget) -> Opener:
        return lambda offset: open_http_range(self.session, target, offset)


def plan_download(source: Source, include: Sequence[str], sha256: str | None, context: PlanContext) -> DownloadPlan:
    if isinstance(source, HubSource):
        return _hub_plan(source, include, sha256, context)
    if isinstance(source, UrlSource):
        return _url_plan(source, sha256, context)
    return _local_plan(source, include, sha256)


def _hub_plan(src: HubSource, include: Sequence[str], sha256: str | None, context: PlanContext) -> DownloadPlan:
    from huggingface_hub import hf_hub_url

    info = call_with_retries(lambda: repo_info(src, context.token, context.endpoint, True, context.redact),
                             context.policy)
    if not info.sha:
        raise NevaError(f"{hub_subject(src)}: the Hub did not report a commit for this revision; check the endpoint")
    siblings = {s.rfilename: s for s in info.siblings or []}
    files = []
    for path in _select(src, list(siblings), include):
        check_relpath(path, hub_subject(src))
        sibling = siblings[path]
        url = hf_hub_url(src.repo_id, path, repo_type=src.repo_type, revision=info.sha, endpoint=context.endpoint)
        subject = hub_subject(src, path)
        target = HttpTarget(url=url, subject=subject, redact=context.redact, hub=True, token=context.token)
        files.append(_hub_remote(sibling, PurePosixPath(path).name if src.path else path, subject, sha256,
                                 context.opener(target)))
    header = None if src.path else {"source": src.display, "repo_type": src.repo_type, "repo_id": src.repo_id,
                                    "revision": src.revision, "commit": info.sha, "include": list(include)}
    return DownloadPlan(files=files, commit=info.sha, manifest=header)


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


def _url_plan(src: UrlSource, sha256: str | None, context: PlanContext) -> DownloadPlan:
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
    return DownloadPlan(files=[remote], commit=None, manifest=None)


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


def _local_plan(src: LocalSource, include: Sequence[str], sha256: str | None) -> DownloadPlan:
    path = src.path.resolve()
    if path.is_file():
        return DownloadPlan(files=[_local_remote(path, path.name, sha256)], commit=None, manifest=None)
    if not path.is_dir():
        raise NevaError(f"download source {src.path} does not exist; check the path")
    # A folder that is itself a download destination: its own state and manifest are not content.
    names = sorted(n for n in (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
                   if n != MANIFEST_NAME and not n.startswith(f"{STATE_DIR}/"))
    if not names:
        raise NevaError(f"download source {src.path}: no file to copy (the folder is empty)")
    names = select_paths(names, include, f"download source {src.path}")
    files = [_local_remote(path / n, n, None) for n in names]
    return DownloadPlan(files=files, commit=None, manifest={"source": str(path), "include": list(include)})


# -------------------------------------------------------------------------------------------- offline


def hub_offline(source: Source) -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return isinstance(source, HubSource) and (flag or constants.HF_HUB_OFFLINE)


def offline_plan(src: HubSource, dest: Path, include: Sequence[str]) -> DownloadPlan:
    """HF_HUB_OFFLINE: what an earlier run recorded in DEST, at its recorded commit; every file must still
    be complete (checked against its record), since nothing can be fetched."""
    files, commit, header = recorded_download(src, dest, include)
    remotes = []
    for relpath, entry in files.items():
        subject = hub_subject(src, src.path or relpath)

        def unavailable(offset: int, subject: str = subject) -> ContextManager[RangeResponse]:
            raise NevaError(f"{subject}: HF_HUB_OFFLINE is set and the copy in {dest} is incomplete or changed; "
                            "unset HF_HUB_OFFLINE to download it again")

        remotes.append(RemoteFile(relpath=relpath, subject=subject, size=entry["bytes"], sha256=entry["sha256"],
                                  sha256_origin="the recorded sha256", git_blob_id=None,
                                  validator=f"sha256:{entry['sha256']}", open_range=unavailable))
    return DownloadPlan(files=remotes, commit=commit, manifest=header)


def recorded_download(
    src: HubSource, dest: Path, include: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], str | None, dict[str, Any] | None]:
    """The files (path -> bytes, sha256), commit and manifest header an earlier download of `src` left in DEST."""
    missing = NevaError(f"{hub_subject(src)}: HF_HUB_OFFLINE is set and {dest} holds no complete download of it "
                        f"with these include patterns; run once online (or unset HF_HUB_OFFLINE)")
    if src.path is not None:
        relpath = PurePosixPath(src.path).name
        record = read_state_json(StatePaths.of(dest, relpath).record)
        if record is None or record.get("source") != hub_subject(src, src.path):
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
