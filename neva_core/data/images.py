"""Image checks for the shard writer: what is really in the file, and is it usable for training.

Policy (the real format comes from the magic bytes, never from the file name):

- JPEG and PNG keep their original bytes, stored under their *real* extension (``jpg``/``png``): a PNG
  named ``.jpg`` becomes a ``png`` member and is counted as ``png_named_jpg``.
- Any other format Pillow can read (GIF, WEBP, BMP, TIFF, ...) is converted to PNG (first frame, RGB)
  and counted under its real format in ``converted_by_reason``; LLaVA's GIFs-named-.jpg land here.
- Rejections: ``empty_image`` (0 bytes), ``corrupt_image`` (Pillow cannot read the header, or the image
  is truncated). ``missing_image`` and ``unreadable_image`` come from the image source.

Truncation without a full decode: a full JPEG decode costs ~0.7 ms per LCS-558K image (~6 CPU-minutes
for the set, several times the cost of copying the bytes), so a JPEG passes when Pillow reads its header
and its end-of-image marker (FF D9) follows the first scan near the end of the file. Inside entropy-coded
data FF is always followed by 00 or a restart marker, so FF D9 there is the real end. Only a JPEG without
that marker (cut short, or with a long trailer) is fully decoded, and accepted only if that succeeds, so
the fast path never rejects a file Pillow could decode. PNGs are checked with Pillow's ``verify()``,
which walks every chunk to IEND and checks its CRC without inflating the pixels.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image, UnidentifiedImageError

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
EMPTY_IMAGE = "empty_image"
CORRUPT_IMAGE = "corrupt_image"

JPEG, PNG = "jpeg", "png"
MEMBER_EXTENSION = {JPEG: "jpg", PNG: "png"}

_FORMAT_OF_SUFFIX = {
    "jpg": JPEG, "jpeg": JPEG, "jpe": JPEG, "jfif": JPEG, "png": PNG, "gif": "gif", "webp": "webp",
    "bmp": "bmp", "tif": "tiff", "tiff": "tiff",
}
_MAGIC = (
    (b"\xff\xd8\xff", JPEG),
    (b"\x89PNG\r\n\x1a\n", PNG),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = 0xDA
# Markers that stand alone, without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8}
# The end marker may be followed by a little padding; a longer trailer takes the full-decode path.
_EOI_WINDOW = 4096
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ImageRejected(Exception):
    """An image that cannot be used; the record is skipped with `reason` (never fatal)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CheckedImage:
    extension: str  # the sample's member extension: "jpg" or "png"
    data: bytes
    converted_from: str | None = None  # real format when the bytes were re-encoded as PNG
    relabeled: str | None = None  # e.g. "png_named_jpg": original bytes kept under their real extension


def sniff_format(data: bytes) -> str | None:
    """The format the magic bytes announce (jpeg, png, gif, bmp, tiff, webp), or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_image(data: bytes, name: str) -> CheckedImage:
    """Validate one image's bytes (`name` is its path, used for the extension check only)."""
    if not data:
        raise ImageRejected(EMPTY_IMAGE, f"{name} has 0 bytes")
    real = sniff_format(data)
    if real in MEMBER_EXTENSION:
        _verify_kept_image(data, real, name)
        return CheckedImage(MEMBER_EXTENSION[real], data, relabeled=_relabel(real, name))
    png, source_format = _convert_to_png(data, name)
    return CheckedImage("png", png, converted_from=source_format)


def _relabel(real: str, name: str) -> str | None:
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    if _FORMAT_OF_SUFFIX.get(suffix) == real:
        return None
    return f"{MEMBER_EXTENSION[real]}_named_{suffix or 'no_extension'}"


def _verify_kept_image(data: bytes, real: str, name: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:  # parses the header: dimensions, mode, markers
            width, height = image.size
            if real == PNG:
                image.verify()
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageRejected(CORRUPT_IMAGE, f"{name}: Pillow cannot read this {real.upper()} ({_describe(exc)})") from None
    if width <= 0 or height <= 0:
        raise ImageRejected(CORRUPT_IMAGE, f"{name}: the header declares a {width}x{height} image")
    if real == PNG:
        return
    if not _jpeg_ends_cleanly(data):
        _full_decode(data, name)


def _jpeg_ends_cleanly(data: bytes) -> bool:
    scan_start = _jpeg_scan_start(data)
    if scan_start is None:
        return False
    return data.rfind(_JPEG_EOI, max(scan_start, len(data) - _EOI_WINDOW)) != -1


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first start-of-scan marker, found by walking the marker segments from SOI."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == _JPEG_SOS:
            return pos
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _full_decode(data: bytes, name: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"{name}: truncated or damaged image data ({_describe(exc)})") from None


def _convert_to_png(data: bytes, name: str) -> tuple[bytes, str]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            source_format = (image.format or "unknown").lower()
            image.seek(0)  # first frame of an animation
            rgb = image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageRejected(
            CORRUPT_IMAGE, f"{name}: not an image Pillow can read (starts with {data[:8].hex(' ')})"
        ) from None
    except Exception as exc:
        raise ImageRejected(CORRUPT_IMAGE, f"{name}: unreadable image ({_describe(exc)})") from None
    out = io.BytesIO()
    rgb.save(out, "PNG")
    return out.getvalue(), source_format


def _describe(exc: Exception) -> str:
    # Pillow messages may embed object addresses, which would make skipped.jsonl differ between runs.
    return f"{type(exc).__name__}: {_OBJECT_ADDRESS.sub('', str(exc))}"
