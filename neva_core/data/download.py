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

One job per module: `download_sources` (parsing what to fetch), `download_plans` (the files a source
resolves to), `download_transfer` (one file: resume, verification, records), `download_http` (HTTP);
this module runs the stage: the destination's lock, the snapshot manifest, and cache fingerprints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from neva_core.data.download_http import (
    HttpTarget,
    Redactor,
    RetryPolicy,
    call_with_retries,
    probe_url,
    same_origin,
    secrets_kept_out_of_logs,
    url_secrets,
)
from neva_core.errors import NevaError
from neva_core.fingerprint import folder_fingerprint
from neva_core.io import MANIFEST_NAME, file_lock, write_manifest
from neva_core.data.download_plans import (
    DownloadPlan,
    PlanContext,
    hub_offline,
    offline_plan,
    plan_download,
    recorded_download,
    repo_info,
    resolve_endpoint,
    resolve_token,
)
from neva_core.data.download_sources import HubSource, LocalSource, Source, UrlSource, parse_source
from neva_core.data.download_transfer import STATE_DIR, DownloadedFile, StatePaths, complete_copy, fetch_file, read_state_json


_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _fetch_all(plan: DownloadPlan, dest: Path, policy: RetryPolicy) -> tuple[DownloadedFile, ...]:
    if plan.manifest is not None:
        if any(f.relpath == MANIFEST_NAME or f.relpath.split("/")[0] == STATE_DIR for f in plan.files):
            raise NevaError(f"the snapshot contains {MANIFEST_NAME} or {STATE_DIR}/, names this stage uses itself; "
                            "leave them out with --include patterns that do not match them")
        done = [complete_copy(remote, StatePaths.of(dest, remote.relpath)) for remote in plan.files]
        if all(done):
            return tuple(done)  # type: ignore[arg-type]
        # The folder is complete only once the new manifest is written: withdraw the old one first.
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
    return tuple(fetch_file(remote, dest, policy) for remote in plan.files)


def _write_snapshot_manifest(dest: Path, header: dict[str, Any], files: Sequence[DownloadedFile]) -> str:
    manifest = {"stage": "download", **header, "files": {f.path: {"bytes": f.bytes, "sha256": f.sha256} for f in files}}
    path = dest / MANIFEST_NAME
    if not (path.is_file() and read_state_json(path) == manifest):  # an unchanged one stays: its readers see no gap
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
        context = PlanContext(token=resolved_token, endpoint=resolve_endpoint(endpoint), policy=policy,
                           redact=Redactor(secrets), session=session)
        plan = offline_plan(parsed, dest, include) if hub_offline(parsed) else plan_download(parsed, include, sha256, context)
        dest.mkdir(parents=True, exist_ok=True)
        # One run at a time per DEST (two pipeline runs): the second finds the files complete.
        with file_lock(dest / STATE_DIR / "dest.lock", f"{parsed.display} into {dest}"):
            files = _fetch_all(plan, dest, policy)
            manifest = _write_snapshot_manifest(dest, plan.manifest, files) if plan.manifest is not None else None
    revision = parsed.revision if isinstance(parsed, HubSource) else None
    return DownloadResult(source=parsed.display, dest=str(dest), revision=revision, commit=plan.commit,
                          files=files, manifest=manifest)


def remote_fingerprint(source: str, token: str | None = None, endpoint: str | None = None, *,
                       dest: Path | str | None = None, include: Sequence[str] = ()) -> str:
    """A cheap string that changes when the remote content may have changed (for a task's cache key).

    hf://: the resolved commit (with HF_HUB_OFFLINE set: the one recorded in `dest`, so an offline rerun
    needs no Hub); http(s): ETag or Last-Modified and size; local: size and mtime.
    """
    parsed = parse_source(source)
    if isinstance(parsed, LocalSource):
        return _local_fingerprint(parsed.path)
    if hub_offline(parsed):
        if dest is None:
            raise NevaError(f"{parsed.display}: HF_HUB_OFFLINE is set and no earlier download is known")
        files, commit, _ = recorded_download(parsed, Path(dest).absolute(), include)
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
        info = call_with_retries(lambda: repo_info(parsed, token, endpoint, False, redact), policy)
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
