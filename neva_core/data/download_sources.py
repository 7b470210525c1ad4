"""What can be downloaded: a Hub repo or file (hf://), a URL, a local file or folder, parsed and validated."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from neva_core.data.download_http import display_url
from neva_core.errors import NevaError


_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HUB_FORMS = "hf://<org>/<name>[/<path>][@revision] or hf://datasets/<org>/<name>[/<path>][@revision]"


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
        check_relpath(repo_path, text)
    return HubSource(repo_type=repo_type, repo_id=f"{org}/{name}", path=repo_path, revision=revision)


def check_relpath(relpath: str, where: str) -> None:
    """A repo path must stay inside DEST: no empty, '.' or '..' parts, not absolute."""
    parts = relpath.split("/")
    if relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise NevaError(f"{where}: the path {relpath!r} is not a plain relative path inside the repo")
