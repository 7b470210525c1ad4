"""One shard tar with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), written under a
temporary name and renamed once fsynced; it records every sample's byte layout for energon's index."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

from neva_core.data.direct_writer import ChunkedWriter
from neva_core.io import fsync_dir, temp_name

_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads archives to whole records; so do we
_USTAR_MAX_SIZE = 8**11 - 1
_USTAR_BEFORE_SIZE = b"0000644\0" + b"0000000\0" + b"0000000\0"
_USTAR_AFTER_SIZE = b"00000000000\0"  # mtime 0
_USTAR_AFTER_CHECKSUM = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
# The checksum is the byte sum of the header with its own 8-byte field read as spaces.
_USTAR_FIXED_SUM = sum(_USTAR_BEFORE_SIZE + _USTAR_AFTER_SIZE + b" " * 8 + _USTAR_AFTER_CHECKSUM)


class TarShardWriter:
    """A tar written under a temporary name with fixed metadata; records each sample's byte layout.

    The layout (sample and member offsets) is what energon's index needs, so the index is built from it
    instead of re-reading every tar. It is kept as columns, one list per field (samples: key, offset of
    its first header, byte size; members: sample number, extension, data offset, data size), which load
    from JSON and go into sqlite ~2x faster than a list per sample. Bytes are written (and hashed)
    through `ChunkedWriter`.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tmp = temp_name(dest)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.out = ChunkedWriter(self.fd)
        except BaseException:  # no buffers (out of memory): leave nothing open or behind
            os.close(self.fd)
            self.tmp.unlink()
            raise
        self.offset = 0
        self.keys: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.part_samples: list[int] = []
        self.part_names: list[str] = []
        self.part_offsets: list[int] = []
        self.part_sizes: list[int] = []

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def add(self, key: str, record_json: bytes, image_extension: str | None = None, image: bytes = b"") -> None:
        """One sample: its JSON record and, unless text-only, its image (member "jpg" or "png")."""
        start = self.offset
        if image_extension is None:
            self._member(key, "json", record_json)
        elif image_extension < "json":  # members in name order, like a sorted tar: jpg < json < png
            self._member(key, image_extension, image)
            self._member(key, "json", record_json)
        else:
            self._member(key, "json", record_json)
            self._member(key, image_extension, image)
        self.keys.append(key)
        self.offsets.append(start)
        self.sizes.append(self.offset - start)

    def _member(self, key: str, extension: str, data: bytes) -> None:
        """Write one member: header, data, padding to the block."""
        self._put(tar_header(f"{key}.{extension}", len(data)))
        self.part_samples.append(len(self.keys))
        self.part_names.append(extension)
        self.part_offsets.append(self.offset)
        self.part_sizes.append(len(data))
        self._put(data)
        if len(data) % _TAR_BLOCK:
            self._put(_ZERO_BLOCK[: -len(data) % _TAR_BLOCK])

    def commit(self) -> dict[str, Any]:
        end = self.offset
        self._put(b"\0" * (2 * _TAR_BLOCK))
        self._put(b"\0" * (-self.offset % _TAR_RECORD))
        sha256 = self.out.flush()
        os.fsync(self.fd)  # one fsync per finished shard, not per sample
        self._close()
        os.replace(self.tmp, self.dest)
        fsync_dir(self.dest.parent)
        return self._layout(end, self.offset, sha256)

    def discard(self) -> dict[str, Any]:
        """The layout of a shard with no sample, which is not kept (energon refuses empty shards)."""
        return self._layout(0, 0, None)

    def _layout(self, end: int, size: int, sha256: str | None) -> dict[str, Any]:
        return {
            "keys": self.keys, "offsets": self.offsets, "sizes": self.sizes, "part_samples": self.part_samples,
            "part_names": self.part_names, "part_offsets": self.part_offsets, "part_sizes": self.part_sizes,
            "end": end, "bytes": size, "sha256": sha256,
        }

    def _put(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def _close(self) -> None:
        if self.fd >= 0:
            self.out.close()
            os.close(self.fd)
            self.fd = -1


def tar_header(name: str, size: int) -> bytes:
    """The tar header tarfile would write for a regular file with our fixed metadata."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not encoded.isascii() or size > _USTAR_MAX_SIZE:
        return _pax_header(name, size)
    size_field = b"%011o\0" % size
    checksum = _USTAR_FIXED_SUM + sum(encoded) + sum(size_field)
    return b"".join((
        encoded.ljust(100, b"\0"), _USTAR_BEFORE_SIZE, size_field, _USTAR_AFTER_SIZE,
        b"%06o\0 " % checksum, _USTAR_AFTER_CHECKSUM,
    ))


def _pax_header(name: str, size: int) -> bytes:
    # Long or non-ASCII names need a pax extended header; tarfile writes that one.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
