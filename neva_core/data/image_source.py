"""Image bytes by relative path, from the dataset's images.zip as downloaded or from an extracted folder.

Reading straight from the zip saves the full extraction (27 GB written, then read again) that the
original recipe starts with. The parent process parses the zip's central directory once into a compact
index and hands each worker only the entry's location, so workers neither re-parse the directory nor
hold ~600k `ZipInfo` objects each; a worker reads an entry with two `pread` calls on its own handle.

Paths in records are checked lexically before they get here (`records.normalise_image_path`): relative,
no `..`, so nothing outside the image root is ever named. Zip entry names follow one rule here and in
`neva unzip`: '/' separates, and a backslash makes the archive an error (`check_entry_separators`). Every
entry read is checked against its CRC-32 from the central directory, so a damaged body that still looks
like a JPEG is skipped, never written into a shard.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neva_core.data.images import CORRUPT_IMAGE, MISSING_IMAGE, UNREADABLE_IMAGE, ImageRejected
from neva_core.errors import NevaError
from neva_core.fingerprint import folder_fingerprint

ZIP, FOLDER = "zip", "folder"

_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_CENTRAL_SIG = b"PK\x01\x02"
# The fields of a central directory record (`_CENTRAL`) that the index and `locate` need:
_CENTRAL_NAME_FIELDS = struct.Struct("<4s4xH18xHHH12x")  # signature, flags, name/extra/comment lengths
_CENTRAL_LOCATION = struct.Struct("<8xHH4xLLLHH10xL")  # flags, method, crc, sizes, name/extra lengths, offset
_LOCAL = struct.Struct("<4s5H3L2H")
_LOCAL_SIG = b"PK\x03\x04"
_ZIP64_EXTRA_ID = 0x0001
_ZIP64_PLACEHOLDER = 0xFFFFFFFF  # a 32-bit field whose real value is in the zip64 extra field
_MAX_COMMENT = 0xFFFF
_UTF8_FLAG = 0x800
_ENCRYPTED_FLAG = 0x1
_STORED, _DEFLATED = 0, 8


# Where one zip entry's bytes are, all a worker needs to read and check it: (local header offset, compressed
# size, size, compression method, flags, CRC-32). A plain tuple: one goes to a worker per record, and
# pickling a NamedTuple costs several times more.
ZipEntryRef = tuple[int, int, int, int, int, int]


def check_entry_separators(name: str, archive: Path | str | None = None) -> None:
    """Raise unless the zip entry name uses '/' only: a backslash is a Windows separator that zip tools
    disagree on (a file name character to some, a folder separator to others), so it is never guessed."""
    if "\\" in name:
        where = f"{archive}: " if archive else ""
        raise NevaError(f"{where}entry {name!r} contains a backslash (a Windows path separator); zip entries must "
                        "use '/'. Re-create the archive with '/' separators")


@dataclass(frozen=True)
class ReaderSpec:
    """Picklable description of an image source; each worker opens its own reader from it."""

    kind: str
    path: str


class ZipImageSource:
    """images.zip: its central directory (~80 bytes per entry) and a name -> record offset index into it."""

    kind = ZIP

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._directory = _read_central_directory(f, path)
        self._digest = hashlib.sha256(self._directory.data).hexdigest()
        self._records: dict[str, int] = {}  # file name -> offset of its record in the directory
        self._index_names()

    def __len__(self) -> int:
        return len(self._records)

    def fingerprint(self) -> dict[str, Any]:
        # The central directory lists every entry's name, sizes and CRC-32, so its hash follows the
        # content; the mtime is left out so that a re-download of the same archive still resumes.
        return {
            "kind": ZIP, "bytes": self.path.stat().st_size, "entries": len(self),
            "central_directory_sha256": self._digest,
        }

    def locate(self, relative: str) -> ZipEntryRef | None:
        record = self._records.get(relative)
        if record is None:
            return None
        flags, method, crc, compressed, size, name_len, extra_len, offset = _CENTRAL_LOCATION.unpack_from(
            self._directory.data, record
        )
        if _ZIP64_PLACEHOLDER in (size, compressed, offset):
            extra_start = record + _CENTRAL.size + name_len
            extra = memoryview(self._directory.data)[extra_start : extra_start + extra_len]
            size, compressed, offset = _apply_zip64(extra, size, compressed, offset)
        return offset + self._directory.shift, compressed, size, method, flags, crc

    @property
    def reader_spec(self) -> ReaderSpec:
        return ReaderSpec(ZIP, str(self.path))

    def _index_names(self) -> None:
        """Walk the directory once, reading only what finds the names. Nothing else can start before
        this index exists (LCS-558K: 558K entries), so the rest of each record is decoded by `locate`."""
        data, records, unpack_at = self._directory.data, self._records, _CENTRAL_NAME_FIELDS.unpack_from
        pos = 0
        while pos < len(data):
            try:
                signature, flags, name_len, extra_len, comment_len = unpack_at(data, pos)
            except struct.error:
                signature = b""
            if signature != _CENTRAL_SIG:
                raise NevaError(
                    f"{self.path}: damaged zip central directory at entry {len(records)}; re-download the archive"
                )
            name_start = pos + _CENTRAL.size
            name = data[name_start : name_start + name_len].decode("utf-8" if flags & _UTF8_FLAG else "cp437")
            check_entry_separators(name, self.path)
            if not name.endswith("/"):  # names ending in "/" are folder entries
                records[name] = pos
            pos = name_start + name_len + extra_len + comment_len


class FolderImageSource:
    """An extracted image folder (e.g. `neva unzip` output)."""

    kind = FOLDER

    def __init__(self, root: Path) -> None:
        self.path = root

    def fingerprint(self) -> dict[str, Any]:
        """A digest of every file's relative path, size and mtime (nothing is read)."""
        return {"kind": FOLDER, **folder_fingerprint(self.path)}

    def locate(self, relative: str) -> str:
        return relative  # existence is checked when the worker opens the file

    @property
    def reader_spec(self) -> ReaderSpec:
        return ReaderSpec(FOLDER, str(self.path))


ImageSource = ZipImageSource | FolderImageSource


def open_image_source(path: Path) -> ImageSource:
    """A folder of images, or a zip archive of them."""
    if path.is_dir():
        return FolderImageSource(path)
    if path.is_file():
        return ZipImageSource(path)
    raise NevaError(f"--images {path} does not exist; give the dataset's images.zip or its extracted folder")


class ZipReader:
    """One worker's handle on images.zip."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise NevaError(f"cannot open {path}: {exc.strerror or exc}; was it moved during the run?") from None

    def close(self) -> None:
        os.close(self.fd)

    def read(self, ref: ZipEntryRef | None, name: str) -> bytes:
        if ref is None:
            raise ImageRejected(MISSING_IMAGE, f"{name} is not in {self.path}")
        header_offset, compressed_size, size, method, flags, crc = ref
        if flags & _ENCRYPTED_FLAG:
            raise ImageRejected(UNREADABLE_IMAGE, f"{name} is encrypted in {self.path}")
        if method not in (_STORED, _DEFLATED):
            raise ImageRejected(
                UNREADABLE_IMAGE,
                f"{name} uses zip compression method {method}; only stored and deflate are read (re-zip it)",
            )
        raw = os.pread(self.fd, compressed_size, self._data_offset(header_offset, name))
        if len(raw) != compressed_size:
            raise ImageRejected(CORRUPT_IMAGE, f"{name}: the zip entry is cut short (archive truncated?)")
        data = raw if method == _STORED else _inflate(raw, size, name)
        if len(data) != size:
            raise ImageRejected(CORRUPT_IMAGE, f"{name}: the zip entry has {len(data)} bytes, expected {size}")
        if zlib.crc32(data) != crc:
            raise ImageRejected(CORRUPT_IMAGE, f"{name}: the bytes in {self.path} fail the entry's CRC-32 check "
                                               "(damaged archive; re-download it)")
        return data

    def _data_offset(self, header_offset: int, name: str) -> int:
        header = os.pread(self.fd, _LOCAL.size, header_offset)
        if len(header) != _LOCAL.size or header[:4] != _LOCAL_SIG:
            raise ImageRejected(CORRUPT_IMAGE, f"{name}: damaged zip entry header in {self.path}")
        fields = _LOCAL.unpack(header)
        return header_offset + _LOCAL.size + fields[9] + fields[10]


class FolderReader:
    def __init__(self, path: str) -> None:
        self.root = path

    def close(self) -> None:
        """Nothing is held open between reads."""

    def read(self, ref: str, name: str) -> bytes:
        path = os.path.join(self.root, ref)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise ImageRejected(MISSING_IMAGE, f"{name} is not in {self.root}") from None
        except IsADirectoryError:
            raise ImageRejected(MISSING_IMAGE, f"{name} is a folder in {self.root}, not a file") from None
        except OSError as exc:
            raise ImageRejected(UNREADABLE_IMAGE, f"{name}: {exc.strerror or exc}") from None


ImageReader = ZipReader | FolderReader


def open_reader(spec: ReaderSpec) -> ImageReader:
    return ZipReader(spec.path) if spec.kind == ZIP else FolderReader(spec.path)


def _inflate(raw: bytes, size: int, name: str) -> bytes:
    try:
        return zlib.decompress(raw, -15, size or 1)
    except zlib.error as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"{name}: damaged compressed data in the zip ({exc})") from None


@dataclass(frozen=True)
class _CentralDirectory:
    data: bytes
    shift: int  # bytes prepended before the archive (self-extractors); added to every stored offset


def _read_central_directory(f: Any, path: Path) -> _CentralDirectory:
    size = os.fstat(f.fileno()).st_size
    tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
    f.seek(tail_start)
    tail = f.read()
    found = tail.rfind(_EOCD_SIG)
    if found < 0 or found + _EOCD.size > len(tail):
        raise NevaError(f"--images {path} is not a zip archive (no end-of-central-directory record)")
    eocd_at = tail_start + found
    _, disk, _, _, _, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, found)
    directory_end = eocd_at
    locator = _read_at(f, eocd_at - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size)
    if locator[:4] == _ZIP64_LOCATOR_SIG:
        directory_end = eocd_at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        record = _read_at(f, directory_end, _ZIP64_EOCD.size)
        if record[:4] != _ZIP64_EOCD_SIG:
            raise NevaError(f"{path}: damaged zip64 end record; re-download the archive")
        fields = _ZIP64_EOCD.unpack(record)
        disk, cd_size, cd_offset = fields[4], fields[8], fields[9]
    if disk != 0:
        raise NevaError(f"{path} is a multi-part (spanned) zip; join the parts into one archive first")
    shift = directory_end - cd_size - cd_offset
    if shift < 0:
        raise NevaError(f"{path}: the central directory lies outside the file (truncated download?)")
    data = _read_at(f, directory_end - cd_size, cd_size)
    if len(data) != cd_size:
        raise NevaError(f"{path}: the central directory is cut short (truncated download?)")
    return _CentralDirectory(data, shift)


def _read_at(f: Any, offset: int, size: int) -> bytes:
    if offset < 0:
        return b""
    f.seek(offset)
    return f.read(size)


def _apply_zip64(extra: memoryview, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF placeholders with the 64-bit values of the zip64 extra field."""
    pos = 0
    while pos + 4 <= len(extra):
        field_id, field_len = struct.unpack_from("<HH", extra, pos)
        if field_id == _ZIP64_EXTRA_ID:
            values = iter(struct.unpack_from(f"<{field_len // 8}Q", extra, pos + 4))
            # Only the fields whose 32-bit value overflowed are present, in this fixed order.
            size = next(values) if size == _ZIP64_PLACEHOLDER else size
            compressed = next(values) if compressed == _ZIP64_PLACEHOLDER else compressed
            offset = next(values) if offset == _ZIP64_PLACEHOLDER else offset
            return size, compressed, offset
        pos += 4 + field_len
    return size, compressed, offset
