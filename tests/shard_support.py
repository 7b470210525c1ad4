"""Tiny LLaVA-shaped datasets for the record, shard and energon tests: records, images, zip and folder."""

from __future__ import annotations

import contextlib
import io
import json
import random
import sqlite3
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from neva_core.io import MANIFEST_NAME

INSTRUCTION = "Render a clear and concise summary of the photo."


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    """A small deterministic picture (a gradient whose colours depend on `seed`) encoded as `fmt`."""
    image = Image.new("RGB", size)
    image.putdata([((x * 9 + seed * 37) % 256, (y * 13 + seed * 11) % 256, (seed * 53) % 256)
                   for y in range(size[1]) for x in range(size[0])])
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def record(record_id: Any, image: str | None = None, *, tag_first: bool = True, caption: str = "a photo") -> dict:
    """A pretraining record; `<image>` before the instruction (tag_first) or after it, as in LCS-558K."""
    if image is None:
        human = INSTRUCTION
    else:
        human = f"<image>\n{INSTRUCTION}" if tag_first else f"{INSTRUCTION}\n<image>"
    rec: dict[str, Any] = {"id": record_id}
    if image is not None:
        rec["image"] = image
    rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]
    return rec


def image_name(i: int) -> str:
    return f"{i // 1000:05d}/{i:09d}.jpg"  # the LCS-558K layout: 00000/000000000.jpg


def valid_dataset(count: int, *, first: int = 0) -> tuple[list[dict], dict[str, bytes]]:
    """`count` good records with JPEGs; every third one has its <image> tag after the instruction."""
    records, images = [], {}
    for i in range(first, first + count):
        name = image_name(i)
        records.append(record(f"{i:09d}", name, tag_first=i % 3 != 0, caption=f"caption {i}"))
        images[name] = image_bytes(i)
    return records, images


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def write_zip(path: Path, images: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in sorted(images.items()):
            archive.writestr(name, data)
    return path


def write_folder(root: Path, images: dict[str, bytes]) -> Path:
    for name, data in images.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    root.mkdir(parents=True, exist_ok=True)
    return root


def dataset(tmp: Path, records: list[Any], images: dict[str, bytes]) -> tuple[Path, Path, Path]:
    """The JSON file, an images.zip and an extracted folder holding the same images."""
    return (
        write_json(tmp / "data.json", records),
        write_zip(tmp / "images.zip", images),
        write_folder(tmp / "images", images),
    )


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar]


def shard_files(out: Path) -> dict[str, bytes]:
    """Every shard tar's bytes, by name."""
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


def skipped_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


def assert_invariant(out: Path) -> dict:
    """written + skipped == records, in the manifest, in the shards and in skipped.jsonl."""
    data = manifest(out)
    skipped = skipped_lines(out)
    assert data["written"] + data["skipped"] == data["records"]
    assert len(skipped) == data["skipped"]
    assert sum(shard["samples"] for shard in data["shards"]) == data["written"]
    assert sum(data["skipped_by_reason"].values()) == data["skipped"]
    samples = sum(len({name.split(".", 1)[0] for name, _ in tar_members(out / s["name"])}) for s in data["shards"])
    assert samples == data["written"]
    return data


def faulty_dataset() -> tuple[list[Any], dict[str, bytes], list[str | None]]:
    """Every fault the shard stage must survive, among good records.

    Returns the records, the images (by path) and, per record, the expected skip reason (None: written).
    """
    good = image_bytes(1)
    images = {
        "ok/before.jpg": image_bytes(2),
        "ok/after.jpg": image_bytes(3),
        "odd/png-named.jpg": image_bytes(4, "PNG"),
        "odd/gif-named.jpg": image_bytes(5, "GIF"),
        "odd/picture.bmp": image_bytes(6, "BMP"),
        "odd/trailer.jpg": image_bytes(7) + b"\0trailer" * 1000,  # junk after the end marker: still decodable
        "bad/truncated.jpg": good[:-9],
        "bad/header-cut.jpg": good[: len(good) // 2],
        "bad/garbage.jpg": bytes(range(256)) * 3,
        "bad/jpeg-magic-garbage.jpg": b"\xff\xd8\xff" + bytes(range(256)) * 3,
        "bad/empty.jpg": b"",
        "dup/first.jpg": image_bytes(8),
        "dup/second.jpg": image_bytes(9),
        "dot/x.jpg": image_bytes(10),
        "tags/x.jpg": image_bytes(11),
    }
    cases: list[tuple[Any, str | None]] = [
        (record("ok-before", "ok/before.jpg", tag_first=True), None),
        (record("ok-after", "ok/after.jpg", tag_first=False), None),
        (record("text-only"), None),
        (record("png-as-jpg", "odd/png-named.jpg"), None),
        (record("gif-as-jpg", "odd/gif-named.jpg"), None),
        (record("bmp", "odd/picture.bmp"), None),
        (record("trailer", "odd/trailer.jpg"), None),
        (record("a.b", "dot/x.jpg"), None),
        (record("dup", "dup/first.jpg"), None),
        (record("dup", "dup/second.jpg"), "duplicate_id"),
        (record("truncated", "bad/truncated.jpg"), "corrupt_image"),
        (record("header-cut", "bad/header-cut.jpg"), "corrupt_image"),
        (record("garbage", "bad/garbage.jpg"), "corrupt_image"),
        (record("jpeg-magic-garbage", "bad/jpeg-magic-garbage.jpg"), "corrupt_image"),
        (record("empty", "bad/empty.jpg"), "empty_image"),
        (record("missing", "bad/not-there.jpg"), "missing_image"),
        (record("a-folder", "ok"), "missing_image"),
        (record("escape", "../outside.jpg"), "bad_image_path"),
        (record("absolute", "/etc/hostname"), "bad_image_path"),
        ({"id": "no-conversations", "image": "tags/x.jpg"}, "bad_conversations"),
        ({"id": "gpt-first", "image": "tags/x.jpg", "conversations": [
            {"from": "gpt", "value": "<image>"}, {"from": "human", "value": "x"}]}, "bad_conversations"),
        ({"id": "no-tag", "image": "tags/x.jpg", "conversations": [
            {"from": "human", "value": "describe"}, {"from": "gpt", "value": "x"}]}, "bad_image_tag_count"),
        ({"id": "two-tags", "image": "tags/x.jpg", "conversations": [
            {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]}, "bad_image_tag_count"),
        ({"id": "tag-without-image", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, "bad_image_tag_count"),
        ({"image": "tags/x.jpg", "conversations": []}, "bad_id"),
        (42, "not_an_object"),
    ]
    return [rec for rec, _ in cases], images, [reason for _, reason in cases]


def index_rows(sqlite_path: Path) -> list[list[tuple]]:
    """energon's index.sqlite: its schema, then the rows of both tables in the order they were inserted."""
    with contextlib.closing(sqlite3.connect(sqlite_path)) as db:
        schema = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
        return [schema] + [db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
                           for table in ("samples", "sample_parts")]


def jpeg_bytes(mode: str = "RGB", size: tuple[int, int] = (24, 16), seed: int = 0, **save_options: Any) -> bytes:
    """A small JPEG in `mode` (RGB, L or CMYK), saved by Pillow with `save_options`."""
    rng = random.Random(seed)
    image = Image.new(mode, size)
    image.putdata([tuple(rng.randrange(256) for _ in mode) if len(mode) > 1 else rng.randrange(256)
                   for _ in range(size[0] * size[1])])
    out = io.BytesIO()
    image.save(out, "JPEG", **save_options)
    return out.getvalue()


def jpeg_variants() -> list[bytes]:
    """JPEGs as Pillow writes them in every mode, baseline and progressive, with the extra segments
    photos carry (EXIF, ICC profile, comment, JFIF density) and odd sizes."""
    exif = Image.Exif()
    exif[0x0110] = "camera"
    extras: list[dict[str, Any]] = [
        {}, {"exif": exif.tobytes()}, {"icc_profile": bytes(range(256)) * 3}, {"comment": b"a comment"},
        {"dpi": (300, 300)}, {"optimize": True, "quality": 30},
    ]
    variants = []
    for seed, (mode, progressive, extra) in enumerate(
        (mode, progressive, extra) for mode in ("RGB", "L", "CMYK") for progressive in (False, True) for extra in extras
    ):
        size = (1 + seed * 7 % 41, 1 + seed * 11 % 37)
        subsampling = {"subsampling": seed % 3} if mode == "RGB" else {}
        variants.append(jpeg_bytes(mode, size, seed, progressive=progressive, **subsampling, **extra))
    return variants


def damaged_jpegs(data: bytes, seed: int) -> Iterator[bytes]:
    """`data` itself, then copies damaged the ways files break: cut short, a byte changed in each header
    segment's marker, length and first fields, a fill or junk byte between segments, random bytes after
    SOI, a trailer, the end marker lost, and random byte flips in the header."""
    rng = random.Random(seed)
    yield data
    for cut in sorted({3, 4, 6, 10, 20, 40, 80, 160, 320, len(data) // 2, len(data) - 2, len(data) - 1}):
        if cut < len(data):
            yield data[:cut]
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        for at in range(pos + 1, min(pos + 11, len(data))):
            for value in (0x00, 0x01, 0x0C, 0xFF, data[at] ^ 0x10):
                yield data[:at] + bytes([value]) + data[at + 1 :]
        yield data[:pos] + b"\xff" + data[pos:]
        yield data[:pos] + b"\x00" + data[pos:]
        if data[pos + 1] == 0xDA:  # start of scan: the header ends here
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    yield data[:2] + bytes(rng.randrange(256) for _ in range(50)) + data[2:]
    yield data + b"\0trailer" * 700
    yield data[:-2]
    for _ in range(10):
        at = rng.randrange(2, min(len(data), 400))
        yield data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
