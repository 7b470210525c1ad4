"""Safe, atomic and resumable zip extraction (the LLaVA image zips: up to ~600k files, tens of GB).

`unzip` refuses entries that could write outside DEST (absolute paths, `..`, Windows paths, links,
devices), zip bombs (declared total, per-entry ratio, and the bytes each entry really yields), and
archives that do not fit on disk. It extracts into a temporary folder beside DEST and renames it into
place only after every entry passed its CRC check, so DEST either holds the whole archive or does not
exist. A completion record inside DEST ties it to the archive's central directory, which makes a rerun
on the same archive a no-op.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import lzma
import os
import posixpath
import re
import shutil
import stat
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from neva_core.data.image_source import check_entry_separators
from neva_core.errors import NevaError
from neva_core.io import commit_output, write_json_atomic

log = logging.getLogger(__name__)

RECORD_NAME = ".neva-unzip.json"
DEFAULT_MAX_BYTES = 1 << 40  # 1 TiB: the largest LLaVA image set (mix665k) unpacks to well under this
DEFAULT_MAX_RATIO = 200.0  # JPEGs barely compress and text reaches ~10:1; only a bomb goes past 200:1
RATIO_CHECK_MIN_BYTES = 4 << 20  # small entries may legitimately be all zeros; the total limit covers them

_COPY_BUFFER = 4 << 20
# zipfile decompresses bzip2 and LZMA input in whole read-sized steps with no output limit, so a
# small read keeps one step's output (and memory) bounded even for a crafted stream.
_UNBOUNDED_METHOD_READ = 64 << 10
_BOUNDED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_SUPPORTED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_ALLOWED_KINDS = (0, stat.S_IFREG, stat.S_IFDIR)  # 0: made on a system that stores no Unix mode
_ENCRYPTED_FLAG = 0x1
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_PROGRESS_SECONDS = 30.0
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)


@dataclass(frozen=True)
class UnzipResult:
    dest: Path
    files: int  # regular files extracted (directories not counted)
    bytes: int  # uncompressed bytes of those files
    fingerprint: str  # zip_fingerprint of the archive DEST was made from
    skipped: bool = False  # True when DEST already held this archive and nothing was done


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    path: str  # safe relative POSIX path
    is_dir: bool


@dataclass(frozen=True)
class _Plan:
    members: list[_Member]
    files: int
    bytes: int


def check_member(info: zipfile.ZipInfo) -> str:
    """The entry's safe relative path inside DEST (POSIX, no trailing slash), or a NevaError naming it."""
    name = info.filename
    _check_name(name)
    _check_kind(info)
    _check_readable(info)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        raise NevaError(f"entry {name!r} has an empty path; the archive is malformed")
    return "/".join(parts)


def zip_fingerprint(zip_path: Path | str) -> str:
    """sha256 of the central directory listing (names, sizes, CRCs). Reads no member data."""
    with _open_zip(Path(zip_path)) as archive:
        return _fingerprint(archive.infolist())


def read_record(dest: Path | str) -> dict[str, Any] | None:
    """The completion record of a finished extraction in `dest`, or None when there is none."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NevaError(f"{dest} exists and is not a folder; remove it or choose another DEST")
    path = dest / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NevaError(f"{path} is unreadable ({exc}); delete {dest} and unzip again") from exc
    if not (
        isinstance(record, dict)
        and isinstance(record.get("fingerprint"), str)
        and isinstance(record.get("files"), int)
        and isinstance(record.get("bytes"), int)
    ):
        raise NevaError(f"{path} lacks its fingerprint, files or bytes; delete {dest} and unzip again")
    return record


def unzip(
    zip_path: Path | str,
    dest: Path | str,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> UnzipResult:
    """Extract `zip_path` into the new folder `dest`; a no-op when `dest` already holds this archive.

    `max_bytes` limits the declared uncompressed total (None: no limit); `max_ratio` limits the
    uncompressed/compressed ratio of each entry larger than RATIO_CHECK_MIN_BYTES.
    """
    zip_path, dest = Path(os.path.abspath(zip_path)), Path(os.path.abspath(dest))
    _check_limits(max_bytes, max_ratio)
    if not dest.name:
        raise NevaError(f"DEST {dest} is a file system root; choose a folder to create")
    with _open_zip(zip_path) as archive:
        fingerprint = _fingerprint(archive.infolist())

        def extract(tmp: Path) -> UnzipResult:
            plan = _plan(zip_path, archive, max_bytes, max_ratio)
            _check_free_space(zip_path, dest, plan.bytes)
            _extract(zip_path, archive, plan, tmp, fingerprint)
            log.info("extracted %d files (%s) from %s into %s", plan.files, format_bytes(plan.bytes), zip_path, dest)
            return UnzipResult(dest=dest, files=plan.files, bytes=plan.bytes, fingerprint=fingerprint)

        return commit_output(dest, reuse=lambda found: _finished_result(zip_path, found, fingerprint), build=extract)


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# --- checks on one entry -------------------------------------------------------------------------


def _check_name(name: str) -> None:
    unsafe = "the archive is unsafe; get it from a trusted source"
    check_entry_separators(name)
    if name.startswith("/"):
        raise NevaError(f"entry {name!r} has an absolute path; {unsafe}")
    if _DRIVE_LETTER.match(name):
        raise NevaError(f"entry {name!r} starts with a Windows drive letter; {unsafe}")
    if ".." in name.split("/"):
        raise NevaError(f"entry {name!r} has a '..' component and could write outside DEST; {unsafe}")


def _check_kind(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise NevaError(f"entry {info.filename!r} is a symbolic link; links are never extracted")
    if kind not in _ALLOWED_KINDS:
        raise NevaError(
            f"entry {info.filename!r} is a special file (mode {mode:#o}: device, fifo or socket); "
            "only regular files and folders are extracted"
        )
    if _is_dir(info) and info.file_size:
        raise NevaError(f"entry {info.filename!r} is marked as a folder but holds data; the archive is malformed")


def _check_readable(info: zipfile.ZipInfo) -> None:
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise NevaError(f"entry {info.filename!r} is encrypted; decrypt the archive before extracting it")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise NevaError(
            f"entry {info.filename!r} uses compression method {info.compress_type}, which cannot be read; "
            "repack the archive with deflate"
        )


def _is_dir(info: zipfile.ZipInfo) -> bool:
    return info.filename.endswith("/") or stat.S_ISDIR(info.external_attr >> 16)


# --- the archive as a whole ----------------------------------------------------------------------


@contextlib.contextmanager
def _open_zip(zip_path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        handle = open(zip_path, "rb")
    except OSError as exc:
        raise NevaError(f"cannot open the archive {zip_path}: {exc.strerror or exc}") from exc
    with handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
            raise NevaError(f"{zip_path} is truncated or not a zip file ({exc}): re-download it") from exc
        with archive:
            yield archive


def _fingerprint(infos: list[zipfile.ZipInfo]) -> str:
    digest = hashlib.sha256()
    for info in infos:
        # One JSON array per line: unambiguous even for names holding newlines or quotes.
        digest.update(json.dumps([info.filename, info.file_size, info.CRC]).encode() + b"\n")
    return digest.hexdigest()


def _check_limits(max_bytes: int | None, max_ratio: float) -> None:
    if max_bytes is not None and max_bytes <= 0:
        raise NevaError(f"max_bytes must be positive (or None for no limit), got {max_bytes}")
    if not max_ratio > 0:  # also rejects NaN
        raise NevaError(f"max_ratio must be positive, got {max_ratio}")


def _plan(zip_path: Path, archive: zipfile.ZipFile, max_bytes: int | None, max_ratio: float) -> _Plan:
    members = [_member(zip_path, info, max_ratio) for info in archive.infolist()]
    _check_layout(zip_path, members)
    files = [member for member in members if not member.is_dir]
    total = sum(member.info.file_size for member in files)
    if max_bytes is not None and total > max_bytes:
        raise NevaError(
            f"{zip_path} declares {format_bytes(total)} ({total} bytes) of content, above the limit of "
            f"{format_bytes(max_bytes)}; if you trust this archive, raise --max-bytes"
        )
    return _Plan(members=members, files=len(files), bytes=total)


def _member(zip_path: Path, info: zipfile.ZipInfo, max_ratio: float) -> _Member:
    try:
        path = check_member(info)
    except NevaError as exc:
        raise NevaError(f"{zip_path}: {exc}") from None
    if info.file_size > RATIO_CHECK_MIN_BYTES:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > max_ratio:
            raise NevaError(
                f"{zip_path}: entry {info.filename!r} expands {ratio:.0f}:1 ({format_bytes(info.compress_size)} "
                f"to {format_bytes(info.file_size)}), above the limit of {max_ratio:g}:1; this looks like a "
                "zip bomb. If you trust this archive, raise --max-ratio"
            )
    return _Member(info=info, path=path, is_dir=_is_dir(info))


def _check_layout(zip_path: Path, members: list[_Member]) -> None:
    """Refuse entries that would collide: duplicates, a file used as a folder, our own record."""
    is_dir_by_path: dict[str, bool] = {}
    for member in members:
        if member.path == RECORD_NAME:
            raise NevaError(f"{zip_path}: entry {member.info.filename!r} collides with the completion record")
        seen_as_dir = is_dir_by_path.get(member.path)
        if seen_as_dir is not None and not (seen_as_dir and member.is_dir):
            raise NevaError(f"{zip_path}: entry {member.info.filename!r} appears twice; the archive is ambiguous")
        is_dir_by_path[member.path] = member.is_dir
    checked: set[str] = set()
    for member in members:
        parent = posixpath.dirname(member.path)
        while parent and parent not in checked:
            if is_dir_by_path.get(parent) is False:
                raise NevaError(
                    f"{zip_path}: entry {member.info.filename!r} lies inside {parent!r}, which is a file entry"
                )
            checked.add(parent)
            parent = posixpath.dirname(parent)


def _check_free_space(zip_path: Path, dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest.parent).free
    if needed > free:
        raise NevaError(
            f"extracting {zip_path} needs {format_bytes(needed)} ({needed} bytes) but only {format_bytes(free)} "
            f"is free where {dest} goes; free some space or choose another DEST"
        )


# --- DEST: locking, earlier runs -----------------------------------------------------------------


def _finished_result(zip_path: Path, dest: Path, fingerprint: str) -> UnzipResult | None:
    record = read_record(dest)
    if record is None:
        raise NevaError(
            f"{dest} already exists but has no {RECORD_NAME}: it was not made by `neva unzip` or is incomplete. "
            "It is never merged into or overwritten; remove it or choose another DEST"
        )
    if record["fingerprint"] != fingerprint:
        log.info("%s holds an extraction of another archive (%s); extracting %s", dest, record.get("zip"), zip_path)
        return None
    log.info("%s already holds %s (%d files); nothing to do", dest, zip_path, record["files"])
    return UnzipResult(dest=dest, files=record["files"], bytes=record["bytes"], fingerprint=fingerprint, skipped=True)


# --- extraction ----------------------------------------------------------------------------------


def _extract(zip_path: Path, archive: zipfile.ZipFile, plan: _Plan, tmp: Path, fingerprint: str) -> None:
    zip_stat = zip_path.stat()
    log.info("extracting %d files (%s) from %s", plan.files, format_bytes(plan.bytes), zip_path)
    _extract_members(zip_path, archive, plan, tmp)
    # One system-wide sync instead of an fsync per file: with hundreds of thousands of small files,
    # per-file fsyncs serialise on the journal and cost minutes. Everything is on disk before the
    # record (itself fsynced) and the rename make DEST trusted, so a crash before then leaves only
    # a temporary folder that the next run removes.
    os.sync()
    record = {
        "zip": str(zip_path),
        "zip_bytes": zip_stat.st_size,
        "zip_mtime_ns": zip_stat.st_mtime_ns,
        "fingerprint": fingerprint,
        "entries": len(plan.members),
        "files": plan.files,
        "bytes": plan.bytes,
    }
    write_json_atomic(tmp / RECORD_NAME, record)


def _extract_members(zip_path: Path, archive: zipfile.ZipFile, plan: _Plan, root: Path) -> None:
    made_dirs: set[Path] = {root}
    done_files, done_bytes, last_report = 0, 0, time.monotonic()
    for member in plan.members:
        target = root.joinpath(*member.path.split("/"))
        if member.is_dir:
            _make_dirs(zip_path, target, made_dirs)
            continue
        _make_dirs(zip_path, target.parent, made_dirs)
        _extract_file(zip_path, archive, member.info, target)
        done_files, done_bytes = done_files + 1, done_bytes + member.info.file_size
        if time.monotonic() - last_report > _PROGRESS_SECONDS:
            log.info("unzip %s: %d/%d files, %s", zip_path.name, done_files, plan.files, format_bytes(done_bytes))
            last_report = time.monotonic()
    # Folder times last: creating anything inside a folder resets its mtime. Deepest first, for the same reason.
    for member in sorted((m for m in plan.members if m.is_dir), key=lambda m: -m.path.count("/")):
        mtime = _zip_mtime(member.info)
        os.utime(root.joinpath(*member.path.split("/")), (mtime, mtime))


def _make_dirs(zip_path: Path, folder: Path, made_dirs: set[Path]) -> None:
    if folder in made_dirs:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NevaError(f"cannot create {folder} while extracting {zip_path}: {exc}") from exc
    made_dirs.add(folder)


def _extract_file(zip_path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    with _open_member(zip_path, archive, info) as src:
        try:
            dst = open(target, "xb")  # exclusive: never writes through anything already at target
        except OSError as exc:
            raise NevaError(f"cannot create {target} for entry {info.filename!r} of {zip_path}: {exc}") from exc
        with dst:
            written = _copy_counted(zip_path, info, src, dst)
    if written != info.file_size:
        raise NevaError(
            f"entry {info.filename!r} of {zip_path} holds {written} bytes but its header declares "
            f"{info.file_size}: the archive is corrupt; re-download it"
        )
    mtime = _zip_mtime(info)
    os.utime(target, (mtime, mtime))  # the zip's time, so a rerun produces identical files


@contextlib.contextmanager
def _open_member(zip_path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
    # zipfile stops at the declared size and silently drops the rest of a longer stream. Lifting that
    # stop lets _copy_counted see what the stream really holds and refuse it as soon as it passes the
    # declared size; zipfile still checks the CRC when the stream ends.
    unbounded = copy.copy(info)
    unbounded.file_size = 1 << 62
    try:
        src = archive.open(unbounded)
    except _READ_ERRORS as exc:
        raise _corrupt(zip_path, info, exc) from exc
    with src:
        yield src


def _copy_counted(zip_path: Path, info: zipfile.ZipInfo, src: IO[bytes], dst: IO[bytes]) -> int:
    step = _COPY_BUFFER if info.compress_type in _BOUNDED_METHODS else _UNBOUNDED_METHOD_READ
    written = 0
    while True:
        try:
            chunk = src.read(step)
        except _READ_ERRORS as exc:
            raise _corrupt(zip_path, info, exc) from exc
        if not chunk:
            return written
        written += len(chunk)
        if written > info.file_size:
            raise NevaError(
                f"entry {info.filename!r} of {zip_path} holds more data than the {info.file_size} bytes its header "
                "declares (a forged header, as in zip bombs); the archive is unsafe: get it from a trusted source"
            )
        try:
            dst.write(chunk)
        except OSError as exc:
            raise NevaError(
                f"cannot write entry {info.filename!r} of {zip_path} to {dst.name}: {exc.strerror or exc}"
            ) from exc


def _corrupt(zip_path: Path, info: zipfile.ZipInfo, exc: BaseException) -> NevaError:
    reason = str(exc) or type(exc).__name__
    return NevaError(f"entry {info.filename!r} of {zip_path} is corrupt or truncated ({reason}): re-download it")


def _zip_mtime(info: zipfile.ZipInfo) -> float:
    return time.mktime(info.date_time + (0, 0, -1))  # zip times are local time; -1: let mktime find DST
