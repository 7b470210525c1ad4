"""A scripted HTTP server on 127.0.0.1 for the download tests, and enough of the Hub API on top of it.

`FakeServer` serves byte strings with Range/If-Range support and can misbehave on cue: answer a queue
of error statuses, drop the connection after N body bytes, flip a byte, echo the Authorization header
into its error messages. `FakeHub` emulates what huggingface_hub 2.4's `repo_info(files_metadata=True)`
requests (`/api/{models,datasets}/{repo}[/revision/{rev}]`) and the `resolve` endpoint, with LFS files
redirected to a content-addressed CDN path as the real Hub does.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def isolate_hub_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep huggingface_hub on the local server: no telemetry lookups, no offline flag, no ambient token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # With telemetry on, building the user agent fetches an agent registry from huggingface.co.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@dataclass
class FakeFile:
    data: bytes
    etag: str | None = None
    last_modified: str | None = None
    ranges: bool = True  # honour Range requests
    drops: list[int] = field(default_factory=list)  # per full GET: close after this many body bytes
    statuses: list[int] = field(default_factory=list)  # answer these statuses first, one per request
    corrupt: bool = False  # flip one byte of every body (same length)
    echo_auth: bool = False  # put the Authorization header into error messages, as a careless server might
    after_probe: bytes | None = None  # a new version published right after the next one-byte probe


@dataclass
class Served:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.owner.handle(self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # keep test output quiet


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FakeServer


class FakeServer:
    """Threaded HTTP/1.0 server on 127.0.0.1; `requests` logs every request with bytes of body sent."""

    def __init__(self) -> None:
        self.files: dict[str, FakeFile] = {}
        self.requests: list[Served] = []
        self.hub: FakeHub | None = None
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        # A short poll interval: shutdown() waits up to one interval, and every test stops a server.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add(self, path: str, data: bytes, **behaviour: Any) -> str:
        behaviour.setdefault("etag", f'"{sha256_hex(data)[:16]}"')
        self.files[path] = FakeFile(data=data, **behaviour)
        return self.base + path

    def served(self, path_prefix: str = "/") -> list[Served]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    def body_bytes(self, path_prefix: str = "/") -> int:
        return sum(r.body_bytes for r in self.served(path_prefix))

    def handle(self, handler: _Handler) -> None:
        headers = {name.title(): value for name, value in handler.headers.items()}  # clients differ in case
        entry = Served(handler.command, urlsplit(handler.path).path, headers)
        with self._lock:
            self.requests.append(entry)
        if entry.path in self.files:
            self.serve_file(handler, entry, self.files[entry.path])
        elif self.hub is not None:
            self.hub.handle(handler, entry)
        else:
            send_status(handler, entry, 404)

    def serve_file(self, handler: _Handler, entry: Served, file: FakeFile,
                   extra: dict[str, str] | None = None) -> None:
        if file.statuses:
            message = entry.headers.get("Authorization", "") if file.echo_auth else ""
            send_status(handler, entry, file.statuses.pop(0), message=message)
            return
        data = bytes([file.data[0] ^ 0xFF]) + file.data[1:] if file.corrupt and file.data else file.data
        start, end, status = _byte_range(handler, file, len(data))
        if status == 416:
            send_status(handler, entry, 416, headers={"Content-Range": f"bytes */{len(data)}"})
            return
        body = data[start:end + 1]
        headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes" if file.ranges else "none"}
        headers |= {"ETag": file.etag} if file.etag else {}
        headers |= {"Last-Modified": file.last_modified} if file.last_modified else {}
        headers |= {"Content-Range": f"bytes {start}-{end}/{len(data)}"} if status == 206 else {}
        headers |= extra or {}
        # Probes (a request for the first byte only) never consume a scripted drop: only transfers are cut.
        probe = entry.headers.get("Range") == "bytes=0-0"
        drop = file.drops.pop(0) if file.drops and not probe else None
        if file.after_probe is not None and probe:
            self.add(entry.path, file.after_probe)
        _send(handler, entry, status, headers, body, drop)


def _byte_range(handler: _Handler, file: FakeFile, size: int) -> tuple[int, int, int]:
    """(start, end inclusive, status) for the request's Range/If-Range against this file."""
    wanted = handler.headers.get("Range")
    if_range = handler.headers.get("If-Range")
    if not wanted or not file.ranges or (if_range is not None and if_range not in (file.etag, file.last_modified)):
        return 0, size - 1, 200
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
    if match is None:
        return 0, size - 1, 200
    start = int(match.group(1))
    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    if start >= size:
        return 0, 0, 416
    return start, end, 206


def _send(handler: _Handler, entry: Served, status: int, headers: dict[str, str], body: bytes,
          drop: int | None = None) -> None:
    sent = body if drop is None else body[:drop]
    # Recorded before anything is sent: the client may move on before this thread resumes.
    entry.status, entry.body_bytes = status, len(sent)
    try:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(sent)
        handler.wfile.flush()
    except OSError:
        return  # the client closed first (a probe reads headers only)
    if drop is not None:
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)  # the client sees a short body: a dropped connection


def send_status(handler: _Handler, entry: Served, status: int, *, message: str = "", error_code: str = "",
                headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message or f"HTTP {status}"}).encode()
    out = {"Content-Type": "application/json", "Content-Length": str(len(body))} | (headers or {})
    out |= {"X-Error-Message": message} if message else {}
    out |= {"X-Error-Code": error_code} if error_code else {}
    _send(handler, entry, status, out, body)


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    gated_token: str | None = None  # when set, every request must carry this token
    fail: int | None = None  # answer every request with this status
    api_statuses: list[int] = field(default_factory=list)  # answer API calls with these first
    echo_auth: bool = False
    corrupt: set[str] = field(default_factory=set)  # small files whose served bytes differ from the listing


class FakeHub:
    """The Hub endpoint on a FakeServer: repos, commits, branches, LFS redirects, gating."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        server.hub = self

    @property
    def endpoint(self) -> str:
        return self.server.base

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model",
                 lfs: set[str] | None = None, gated_token: str | None = None) -> FakeRepo:
        repo = FakeRepo(repo_id, repo_type, lfs=set(lfs or ()), gated_token=gated_token)
        self.repos[(repo_type, repo_id)] = repo
        self.commit(repo, files)
        return repo

    def commit(self, repo: FakeRepo, files: dict[str, bytes]) -> str:
        """Add a commit holding `files` and move `main` to it; returns the commit hash."""
        digest = hashlib.sha1(json.dumps({p: sha256_hex(d) for p, d in sorted(files.items())}).encode())
        digest.update(str(len(repo.commits)).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.branches["main"] = sha
        for path, data in files.items():
            if path in repo.lfs:
                self.server.add(f"/cdn/{sha256_hex(data)}", data, etag=f'"{sha256_hex(data)}"')
        return sha

    def cdn_file(self, data: bytes) -> FakeFile:
        return self.server.files[f"/cdn/{sha256_hex(data)}"]

    def handle(self, handler: _Handler, entry: Served) -> None:
        route = _route(entry.path)
        repo = self.repos.get(route[:2]) if route else None
        if route is None or repo is None:
            send_status(handler, entry, 401, error_code="RepoNotFound", message="Repository not found")
        elif (refusal := self._refusal(repo, entry, api=route[2] == "api")) is not None:
            status, code = refusal
            message = entry.headers.get("Authorization", "") if repo.echo_auth else "refused"
            send_status(handler, entry, status, error_code=code, message=message)
        elif (commit := repo.branches.get(route[3], route[3])) not in repo.commits:
            send_status(handler, entry, 404, error_code="RevisionNotFound", message="Invalid rev id")
        elif route[2] == "api":
            _send(handler, entry, 200, {"Content-Type": "application/json"}, self._info(repo, commit))
        else:
            self._resolve(handler, entry, repo, commit, route[4])

    def _refusal(self, repo: FakeRepo, entry: Served, *, api: bool) -> tuple[int, str] | None:
        if api and repo.api_statuses:
            return repo.api_statuses.pop(0), ""
        if repo.fail is not None:
            return repo.fail, {401: "RepoNotFound", 403: "GatedRepo", 404: "RepoNotFound"}.get(repo.fail, "")
        if repo.gated_token and entry.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            return 403, "GatedRepo"
        return None

    def _info(self, repo: FakeRepo, commit: str) -> bytes:
        siblings = []
        for path, data in sorted(repo.commits[commit].items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
            if path in repo.lfs:
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_hex(data)}\n".encode()
                sibling |= {"blobId": git_blob_id(pointer),
                            "lfs": {"size": len(data), "sha256": sha256_hex(data), "pointerSize": len(pointer)}}
            siblings.append(sibling)
        return json.dumps({"id": repo.repo_id, "sha": commit, "private": False, "siblings": siblings}).encode()

    def _resolve(self, handler: _Handler, entry: Served, repo: FakeRepo, commit: str, path: str) -> None:
        files = repo.commits[commit]
        if path not in files:
            send_status(handler, entry, 404, error_code="EntryNotFound", message="Entry not found")
            return
        data = files[path]
        if path in repo.lfs:
            # The real Hub answers an LFS file with a redirect to its content-addressed CDN copy.
            headers = {"Location": f"/cdn/{sha256_hex(data)}", "X-Repo-Commit": commit, "Content-Length": "0",
                       "X-Linked-Etag": f'"{sha256_hex(data)}"', "X-Linked-Size": str(len(data))}
            _send(handler, entry, 302, headers, b"")
            return
        file = FakeFile(data=data, etag=f'"{git_blob_id(data)}"', corrupt=path in repo.corrupt)
        self.server.serve_file(handler, entry, file, extra={"X-Repo-Commit": commit})


_API = re.compile(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/(.+))?")
_RESOLVE = re.compile(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


def _route(path: str) -> tuple[str, str, str, str, str] | None:
    """(repo_type, repo_id, 'api' or 'resolve', revision, file path) of a Hub URL path."""
    if match := _API.fullmatch(path):
        repo_type = "dataset" if match.group(1) == "datasets" else "model"
        return repo_type, match.group(2), "api", unquote(match.group(3) or "main"), ""
    if match := _RESOLVE.fullmatch(path):
        repo_type = "dataset" if match.group(1) else "model"
        return repo_type, match.group(2), "resolve", unquote(match.group(3)), unquote(match.group(4))
    return None
