"""megatron-energon metadata for the shard folder, so Megatron-LM's own loader reads it directly.

What `energon prepare` (megatron-energon 7.4) writes: ``.nv-meta/index.sqlite`` (the tables and
indexes of energon's `SqliteIndexWriter`), ``.nv-meta/.info.json`` (`WebdatasetInfo`),
``.nv-meta/split.yaml`` (`WebdatasetSplits`, brace-collapsed like energon's `collapse`),
``.nv-meta/index.uuid``, ``.nv-meta/dataset.yaml`` and ``<shard>.tar.idx``.
The differences: `energon prepare` re-reads every tar to find the sample offsets (~0.1 ms per sample
here, about as long as writing the shards), while the shard writer already knows them and hands them
over as each shard's layout; and this module writes the files with the standard library instead of
importing energon, which pulls in torch (~2 s of CPU, as much as sharding 20,000 images). The tests
check that every file (sqlite by schema and rows) equals what `energon prepare` writes for the same
shards, and read the shards back through energon's loader.

Sample type: ``CrudeWebdataset``. Our samples hold ``json`` plus ``jpg`` *or* ``png`` *or* no image
(text-only records); the typed samples (VQASample, CaptioningSample) require an image field, so the
training side supplies a `Cooker` (function marked ``@stateless``) that turns the crude dict into its
sample. ``index.uuid`` is derived from the shards' sha256, so identical data gets an identical id.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sqlite3
import uuid
from array import array
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import yaml

from neva_core.io import atomic_file, fsync_dir, temp_name

SAMPLE_TYPE = "CrudeWebdataset"
SPLITS = ("train", "val")
# File names from energon's flavors/webdataset/config.py.
META_DIR = ".nv-meta"
INDEX_SQLITE = "index.sqlite"
INDEX_UUID = "index.uuid"
INFO_JSON = ".info.json"
SPLIT_YAML = "split.yaml"
DATASET_YAML = "dataset.yaml"
_UUID_NAMESPACE = uuid.UUID("5b0c6c3e-8f5e-4d55-9d0e-6f7a2e1c9b41")
_ONE_NUMBER = re.compile(r"(\D*)(\d+)(\D*)")

# energon's SqliteIndexWriter (enable_sample_tables=True, no media metadata), statement for statement,
# so that sqlite_master holds the same schema text. Its `PRAGMA busy_timeout` is left out: it only
# sets how long that connection waits for a lock and is not stored in the file.
_CREATE_TABLES = (
    """
                CREATE TABLE IF NOT EXISTS samples (
                    tar_file_id INTEGER NOT NULL,
                    sample_key TEXT NOT NULL UNIQUE,
                    sample_index INTEGER NOT NULL,
                    byte_offset INTEGER,
                    byte_size INTEGER
                )
                """,
    """
                CREATE TABLE IF NOT EXISTS sample_parts (
                    tar_file_id INTEGER,
                    sample_index INTEGER,
                    part_name TEXT,
                    content_byte_offset INTEGER,
                    content_byte_size INTEGER
                )
                """,
)
_INSERT_SAMPLES = (
    "INSERT INTO samples (tar_file_id, sample_key, sample_index, byte_offset, byte_size) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_PARTS = (
    "INSERT INTO sample_parts (tar_file_id, sample_index, part_name, content_byte_offset, content_byte_size) "
    "VALUES (?, ?, ?, ?, ?)"
)
# Created after the rows, as energon does (faster than maintaining them row by row).
_CREATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_samples_by_tar_and_idx ON samples(tar_file_id, sample_index)",
    "CREATE INDEX IF NOT EXISTS idx_sample_parts_seq ON sample_parts(tar_file_id, sample_index, content_byte_offset)",
    "CREATE INDEX IF NOT EXISTS idx_sample_parts_full ON sample_parts(tar_file_id, sample_index, part_name, "
    "content_byte_offset, content_byte_size)",
)


def write_energon_metadata(out_dir: Path, shards: Sequence[dict[str, Any]], index: SampleIndexWriter) -> list[str]:
    """Write the `.nv-meta/` files for `shards` (dicts with name, split, samples, sha256), in this order.

    Each shard's `.tar.idx` is already there (`write_tar_index`, by the worker that wrote the shard), and
    `index` holds every shard's rows (`SampleIndexWriter.add_shard`, in this order). Returns every
    energon file, `.tar.idx` included, relative to `out_dir`.
    """
    meta = out_dir / META_DIR
    index.commit(len(shards))
    _write_text(meta / INDEX_UUID, str(uuid.uuid5(_UUID_NAMESPACE, ",".join(s["sha256"] for s in shards))))
    _write_info(meta / INFO_JSON, shards)
    _write_splits(meta / SPLIT_YAML, shards)
    sample_type = {"__module__": "megatron.energon", "__class__": SAMPLE_TYPE}
    _write_text(meta / DATASET_YAML, yaml.dump(sample_type, sort_keys=False))
    names = [INDEX_SQLITE, INDEX_UUID, INFO_JSON, SPLIT_YAML, DATASET_YAML]
    return [f"{META_DIR}/{name}" for name in names] + [f"{s['name']}.idx" for s in shards]


def write_tar_index(tar_path: Path, offsets: Sequence[int], end: int) -> Path:
    """`<shard>.tar.idx`: each sample's byte offset, then the end of the last one, as native uint64.

    The bytes energon's `TarIndexWriter` writes (one `struct.pack("Q")` per sample); written here in one
    piece by the shard's own worker.
    """
    index_path = tar_path.with_name(tar_path.name + ".idx")
    with atomic_file(index_path) as f:
        f.write(array("Q", [*offsets, end]).tobytes())
    return index_path


def energon_version() -> str:
    """The installed megatron-energon's version, read without importing it; "unknown" as energon says."""
    try:
        return importlib.metadata.version("megatron-energon")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def collapse_shard_names(names: Sequence[str]) -> list[str]:
    """energon's `collapse(names, keep_order=True)` for names holding one number, like ours.

    A run of two or more names that differ only in that number, counting up by one at the same width,
    becomes ``prefix{first..last}suffix``; anything else stays as it is.
    """
    out: list[str] = []
    run: list[tuple[str, str, str]] = []  # (prefix, digits, suffix) of the current run
    for name in names:
        match = _ONE_NUMBER.fullmatch(name)
        parts = (match.group(1), match.group(2), match.group(3)) if match else None
        if run and parts is not None and _continues(run[-1], parts):
            run.append(parts)
            continue
        _flush_run(run, out)
        if parts is None:
            out.append(name)
        else:
            run.append(parts)
    _flush_run(run, out)
    return out


def _continues(last: tuple[str, str, str], parts: tuple[str, str, str]) -> bool:
    (prefix, digits, suffix), (next_prefix, next_digits, next_suffix) = last, parts
    same_template = (next_prefix, next_suffix, len(next_digits)) == (prefix, suffix, len(digits))
    return same_template and int(next_digits) == int(digits) + 1


def _flush_run(run: list[tuple[str, str, str]], out: list[str]) -> None:
    if len(run) == 1:
        out.append("".join(run[0]))
    elif run:
        prefix, first, suffix = run[0]
        out.append(f"{prefix}{{{first}..{run[-1][1]}}}{suffix}")
    run.clear()


class SampleIndexWriter:
    """energon's sample index, `.nv-meta/index.sqlite`, filled one shard at a time.

    Shards are added in their .info.json order (their position there is their `tar_file_id`) while the
    run is still writing later shards, so little is left to do after the last one. The file is built
    under a temporary name in one transaction without sqlite's journal and syncs: it is trusted only
    once complete, fsynced and renamed by `commit`, so a crash leaves nothing to recover. Use it as a
    context manager: leaving without `commit` removes the temporary file.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / META_DIR / INDEX_SQLITE
        self.path.parent.mkdir(exist_ok=True)
        self.tmp = temp_name(self.path)
        self.db: sqlite3.Connection | None = sqlite3.connect(self.tmp, isolation_level=None)  # explicit BEGIN
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        for statement in _CREATE_TABLES:
            self.db.execute(statement)
        self.db.execute("BEGIN")
        self.shards = 0

    def __enter__(self) -> SampleIndexWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def add_shard(self, layout: dict[str, Any]) -> None:
        """The next shard's samples, then its parts (the row order energon's indexer inserts them in).

        `layout` is the shard's layout as `TarShardWriter.commit` recorded it: one list per column, so
        the rows are zipped together in C rather than built one by one.
        """
        db, tar_file_id, samples = self._open_db(), self.shards, len(layout["keys"])
        db.executemany(_INSERT_SAMPLES, zip(
            repeat(tar_file_id), layout["keys"], range(samples), layout["offsets"], layout["sizes"],
        ))
        db.executemany(_INSERT_PARTS, zip(
            repeat(tar_file_id), layout["part_samples"], layout["part_names"], layout["part_offsets"],
            layout["part_sizes"],
        ))
        self.shards += 1

    def commit(self, expected_shards: int) -> None:
        """Create energon's indexes and put the file in place; `expected_shards` guards the caller's count."""
        if self.shards != expected_shards:
            raise RuntimeError(f"internal error: {self.shards} shards indexed, {expected_shards} written")
        db = self._open_db()
        for statement in _CREATE_INDEXES:  # after the rows, as energon does: faster than row by row
            db.execute(statement)
        db.execute("COMMIT")
        self._close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def _open_db(self) -> sqlite3.Connection:
        if self.db is None:
            raise RuntimeError(f"internal error: {self.tmp} is already closed")
        return self.db

    def _close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def _write_info(path: Path, shards: Sequence[dict[str, Any]]) -> None:
    # energon writes `json.dump(to_json_object(WebdatasetInfo(...)), f, indent=2)`: these two keys.
    info = {"energon_version": energon_version(), "shard_counts": {s["name"]: s["samples"] for s in shards}}
    _write_text(path, json.dumps(info, indent=2))


def _write_splits(path: Path, shards: Sequence[dict[str, Any]]) -> None:
    # `to_json_object(WebdatasetSplits(split_parts=...))` dumped with sort_keys=False, as energon does.
    parts = {split: collapse_shard_names([s["name"] for s in shards if s["split"] == split]) for split in SPLITS}
    _write_text(path, yaml.dump({"split_parts": parts, "exclude": []}, sort_keys=False))


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)
