"""HTTP transport for the download stage: ranged GETs, status classification, bounded retries and
redaction of secrets (the Hub token, credentials embedded in a URL) from every message.

Exceptions raised by `requests` carry the request, Authorization header included; they are turned
into `NevaError` / `TransientError` *outside* their `except` block so that no reference to them
survives in `__context__` (an exception a scheduler pickles or logs must not hold the token).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from neva_core.errors import NevaError, TransientError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 120.0  # per socket read, not per file: a 27 GB body streams for as long as it needs
USER_AGENT = "neva-download/0.1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_TRANSPORT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)

GATED_HINT = (
    "this repo may be gated (e.g. meta-llama/Llama-2-7b-chat-hf): accept the licence on its Hub page and set "
    "HF_TOKEN (or the Prefect Secret block) to a token with access"
)
T = TypeVar("T")


class Redactor:
    """Replaces every secret it was given by '***' in text bound for a message, log line or file."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        # Longest first, so a secret that contains another is removed whole. Very short strings are
        # skipped: replacing every 'a' in a message would hide the message, not a secret.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secrets)"


_active_secrets: collections.Counter[str] = collections.Counter()
_secrets_lock = threading.Lock()
_factory_installed = False


def _scrub(record: logging.LogRecord) -> None:
    with _secrets_lock:
        secrets = list(_active_secrets)
    if not secrets:
        return
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        return  # a malformed record fails in the handler as it would have anyway
    if any(secret in message for secret in secrets):
        record.msg, record.args = Redactor(secrets)(message), ()


def _install_scrubbing_factory() -> None:
    global _factory_installed
    with _secrets_lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True


@contextlib.contextmanager
def secrets_kept_out_of_logs(secrets: Iterable[str | None]) -> Iterator[None]:
    """While active, the secrets are replaced by '***' in every log record, whichever library emits it.

    HTTP libraries log response headers at debug level; a server that echoes the Authorization header
    into one would otherwise put the token into the log. Concurrent downloads each register their own.
    """
    wanted = [s for s in secrets if s and len(s) >= 4]
    _install_scrubbing_factory()
    with _secrets_lock:
        _active_secrets.update(wanted)
    try:
        yield
    finally:
        with _secrets_lock:
            _active_secrets.subtract(wanted)
            for secret in [s for s, count in _active_secrets.items() if count <= 0]:
                del _active_secrets[secret]


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that may be credentials: a user:password and a (signed) query string."""
    parts = urlsplit(url)
    return [s for s in (parts.password, parts.username, parts.query) if s]


def display_url(url: str) -> str:
    """The URL without user info or query string, fit for messages, logs and records."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))


def same_origin(url: str, other: str) -> bool:
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in count and in delay."""

    max_retries: int = 5
    backoff_s: float = 1.0  # the first delay; doubles with each consecutive failure
    max_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise NevaError(f"max_retries must be 0 or more, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_delay_s < 0:
            raise NevaError("retry delays must not be negative")

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(self.max_delay_s, retry_after)
        ceiling = min(self.max_delay_s, self.backoff_s * 2 ** (failures - 1))
        # "Equal jitter": never less than half the step, so parallel clients spread out without
        # collapsing to an immediate retry.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class RetryAfterError(TransientError):
    """A 429/5xx answer; `retry_after` is the server's requested wait in seconds, when it gave one."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Retrier:
    """Counts consecutive transient failures of one operation; sleeps between them, gives up at the limit.

    `progressed()` resets the count: a long transfer that keeps advancing between dropped connections
    is not abandoned because its drops add up.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._failures = 0

    def progressed(self) -> None:
        self._failures = 0

    def failed(self, error: TransientError) -> None:
        self._failures += 1
        if self._failures > self._policy.max_retries:
            raise TransientError(f"{error} (gave up after {self._failures} attempts)")
        delay = self._policy.delay(self._failures, getattr(error, "retry_after", None))
        log.warning("%s; retrying in %.1f s (retry %d of %d)", error, delay, self._failures, self._policy.max_retries)
        time.sleep(delay)


def call_with_retries(operation: Callable[[], T], policy: RetryPolicy) -> T:
    retrier = Retrier(policy)
    while True:
        try:
            return operation()
        except TransientError as error:
            retrier.failed(error)


def status_error(status: int, subject: str, *, hub: bool, detail: str = "",
                 retry_after: float | None = None) -> NevaError:
    """The error for a failed HTTP status: transient for 429/5xx, immediate and explained otherwise."""
    suffix = f" ({detail})" if detail else ""
    if status == 429 or status >= 500:
        return RetryAfterError(f"{subject}: the server answered HTTP {status}{suffix}", retry_after)
    if status in (401, 403) and hub:
        also = "; or the repo does not exist: check its name" if status == 401 else ""
        return NevaError(f"{subject}: access denied (HTTP {status}){suffix}: {GATED_HINT}{also}")
    if status in (401, 403):
        return NevaError(f"{subject}: access denied (HTTP {status}){suffix}; check the URL and whether it needs "
                         "credentials, or fetch the file yourself and pass its local path")
    if status == 404:
        what = "the repo name, the revision and the path in the repo" if hub else "the URL"
        return NevaError(f"{subject}: not found (HTTP 404){suffix}; check {what}")
    return NevaError(f"{subject}: the server answered HTTP {status}{suffix}")


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None  # the HTTP-date form is rare; backoff covers it


def resource_validator(headers: requests.structures.CaseInsensitiveDict) -> tuple[str | None, str | None]:
    """(validator, If-Range value) from a response: a strong ETag, else Last-Modified, else nothing.

    A weak ETag (W/"...") may not be used in If-Range, and would not prove the bytes are identical.
    """
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return f"etag:{etag}", etag
    modified = headers.get("Last-Modified")
    if modified:
        return f"last-modified:{modified}", modified
    return None, None


@dataclass
class RangeResponse:
    """An open response body: `start` is the offset of its first byte within the remote file."""

    start: int
    total: int | None
    validator: str | None
    chunks: Iterator[bytes]


@dataclass(frozen=True)
class HttpTarget:
    """One remote URL and how to talk to it. `token` is sent only to the Hub's own origin."""

    url: str
    subject: str
    redact: Redactor
    hub: bool
    token: str | None = None
    if_range: str | None = None

    def __repr__(self) -> str:
        return f"HttpTarget({self.subject!r})"

    def headers(self, offset: int) -> dict[str, str]:
        # identity: a gzip-encoded body would make byte offsets and Content-Length disagree with the file.
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.if_range:
                headers["If-Range"] = self.if_range
        return headers


def _transport_error(target: HttpTarget, error: Exception) -> TransientError:
    return TransientError(f"{target.subject}: connection failed ({type(error).__name__}: {target.redact(str(error))})")


def _get(session: requests.Session, target: HttpTarget, headers: dict[str, str]) -> requests.Response:
    failure: Exception
    try:
        response = session.get(target.url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except _TRANSPORT_ERRORS as error:
        failure = _transport_error(target, error)
    except requests.RequestException as error:
        failure = NevaError(f"{target.subject}: request failed ({type(error).__name__}: {target.redact(str(error))})")
    else:
        return response
    raise failure


def _raise_for_status(response: requests.Response, target: HttpTarget) -> None:
    if response.status_code < 400:
        return
    detail = target.redact(response.headers.get("X-Error-Message", ""))
    retry_after = _retry_after(response)
    response.close()
    raise status_error(response.status_code, target.subject, hub=target.hub, detail=detail, retry_after=retry_after)


def _body(response: requests.Response, target: HttpTarget) -> Iterator[bytes]:
    """The response's bytes as they arrive; a dropped connection or short body becomes a TransientError.

    read1 hands over whatever has arrived, so the bytes received before a drop are kept and the resume
    starts right after them (a buffered read of a fixed size would discard its incomplete last block).
    """
    failure: Exception | None = None
    try:
        while chunk := response.raw.read1(CHUNK_BYTES, decode_content=False):
            yield chunk
    except (urllib3.exceptions.HTTPError, OSError) as error:
        failure = _transport_error(target, error)
    finally:
        response.close()
    if failure is not None:
        raise failure


def _check_encoding(response: requests.Response, target: HttpTarget) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", ""):
        response.close()
        raise NevaError(f"{target.subject}: the server sent the file {encoding}-encoded although asked not to; "
                        "byte offsets and sizes would not match the file. Fetch it another way")


def _content_range(response: requests.Response, target: HttpTarget) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not match:
        response.close()
        raise TransientError(f"{target.subject}: partial answer without a valid Content-Range header")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


@contextlib.contextmanager
def open_http_range(session: requests.Session, target: HttpTarget, offset: int) -> Iterator[RangeResponse]:
    """GET the remote file from `offset`. The server may answer with the whole file (start 0)."""
    response = _get(session, target, target.headers(offset))
    if response.status_code == 416:
        # The partial no longer fits the remote file (it shrank, or a proxy forgot the range): start over.
        response.close()
        response = _get(session, target, target.headers(0))
    try:
        _raise_for_status(response, target)
        _check_encoding(response, target)
        validator, _ = resource_validator(response.headers)
        if response.status_code == 206:
            start, total = _content_range(response, target)
        else:
            start, total = 0, _content_length(response)
        yield RangeResponse(start=start, total=total, validator=validator, chunks=_body(response, target))
    finally:
        response.close()


@dataclass(frozen=True)
class Probe:
    """What the server says about a URL before any body is read."""

    size: int | None
    validator: str | None
    if_range: str | None


def probe_url(session: requests.Session, target: HttpTarget) -> Probe:
    """Ask for the first byte only: works where HEAD is refused (signed URLs), and yields the full size."""
    headers = target.headers(0) | {"Range": "bytes=0-0"}
    response = _get(session, target, headers)
    try:
        _raise_for_status(response, target)
        validator, if_range = resource_validator(response.headers)
        size = _content_range(response, target)[1] if response.status_code == 206 else _content_length(response)
        return Probe(size=size, validator=validator, if_range=if_range)
    finally:
        response.close()
