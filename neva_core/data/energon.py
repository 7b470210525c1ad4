"""megatron-energon metadata for the shard folder, so Megatron-LM's own loader reads it directly.

What `energon prepare` would write: ``.nv-meta/index.sqlite`` (energon's `SqliteIndexWriter`),
``.nv-meta/.info.json`` (`WebdatasetInfo`), ``.nv-meta/split.yaml`` (`WebdatasetSplits`, brace-collapsed
with energon's `collapse`), ``.nv-meta/index.uuid``, ``.nv-meta/dataset.yaml`` and ``<shard>.tar.idx``.
The difference: `energon prepare` re-reads every tar to find the sample offsets (~0.1 ms per sample
here, about as long as writing the shards), while the shard writer already knows them and hands them
over as each shard's layout. The tests check that every file (sqlite by rows) equals what
`energon prepare` writes for the same shards. Importing energon pulls in torch (~2 s), so only the
parent process does, never a shard worker: workers write their `.tar.idx` with `write_tar_index`.

Sample type: ``CrudeWebdataset``. Our samples hold ``json`` plus ``jpg`` *or* ``png`` *or* no image
(text-only records); the typed samples (VQASample, CaptioningSample) require an image field, so the
training side supplies a `Cooker` (function marked ``@stateless``) that turns the crude dict into its
sample. ``index.uuid`` is derived from the shards' sha256, so identical data gets an identical id.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from neva_core.io import atomic_file, fsync_dir, temp_name

SAMPLE_TYPE = "CrudeWebdataset"
DATASET_YAML = "dataset.yaml"
SPLITS = ("train", "val")
_UUID_NAMESPACE = uuid.UUID("5b0c6c3e-8f5e-4d55-9d0e-6f7a2e1c9b41")


def write_energon_metadata(
    out_dir: Path, shards: Sequence[dict[str, Any]], load_layout: Callable[[str], dict[str, Any]]
) -> list[str]:
    """Write the `.nv-meta/` files for `shards` (dicts with name, split, samples, sha256), in this order.

    Each shard's `.tar.idx` is already there (`write_tar_index`, by the worker that wrote the shard).
    `load_layout(name)` returns a shard's layout as `TarShardWriter.commit` recorded it. Returns every
    energon file, `.tar.idx` included, relative to `out_dir`.
    """
    from megatron.energon.flavors.webdataset.config import (
        INDEX_SQLITE_FILENAME,
        INDEX_UUID_FILENAME,
        INFO_JSON_FILENAME,
        MAIN_FOLDER_NAME,
        SPLIT_YAML_FILENAME,
    )

    meta = out_dir / MAIN_FOLDER_NAME
    meta.mkdir(exist_ok=True)
    _write_sqlite_index(meta / INDEX_SQLITE_FILENAME, shards, load_layout)
    _write_text(meta / INDEX_UUID_FILENAME, str(uuid.uuid5(_UUID_NAMESPACE, ",".join(s["sha256"] for s in shards))))
    _write_info(meta / INFO_JSON_FILENAME, shards)
    _write_splits(meta / SPLIT_YAML_FILENAME, shards)
    sample_type = {"__module__": "megatron.energon", "__class__": SAMPLE_TYPE}
    _write_text(meta / DATASET_YAML, yaml.dump(sample_type, sort_keys=False))
    names = [INDEX_SQLITE_FILENAME, INDEX_UUID_FILENAME, INFO_JSON_FILENAME, SPLIT_YAML_FILENAME, DATASET_YAML]
    return [f"{MAIN_FOLDER_NAME}/{name}" for name in names] + [f"{s['name']}.idx" for s in shards]


def write_tar_index(tar_path: Path, offsets: Sequence[int], end: int) -> Path:
    """`<shard>.tar.idx`: each sample's byte offset, then the end of the last one, as native uint64.

    The bytes `TarIndexWriter` writes (one `struct.pack("Q")` per sample, through energon's storage
    layer at ~6 us a call); written here in one piece by the shard's own worker.
    """
    index_path = tar_path.with_name(tar_path.name + ".idx")
    with atomic_file(index_path) as f:
        f.write(array("Q", [*offsets, end]).tobytes())
    return index_path


class _SampleRow(NamedTuple):
    """One row of energon's `samples` table: the attributes `SqliteIndexWriter.append_samples` reads."""

    tar_file_id: int
    sample_key: str
    sample_index: int
    byte_offset: int
    byte_size: int


class _PartRow(NamedTuple):
    """One row of energon's `sample_parts` table: the attributes `SqliteIndexWriter.append_parts` reads."""

    tar_file_id: int
    sample_index: int
    part_name: str
    content_byte_offset: int
    content_byte_size: int


def _write_sqlite_index(
    sqlite_path: Path, shards: Sequence[dict[str, Any]], load_layout: Callable[[str], dict[str, Any]]
) -> None:
    """energon's sample index; `tar_file_id` is the shard's position in .info.json.

    Rows are plain named tuples with the attributes of energon's IndexSample/IndexSamplePart (a third of
    their cost for LCS-558K's 1.7 million rows); the tests compare the rows with `energon prepare`'s.
    """
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.indexing import SqliteIndexWriter

    tmp = temp_name(sqlite_path)
    try:
        with _cyclic_gc_paused():
            writer = SqliteIndexWriter(EPath(tmp))
            for tar_file_id, shard in enumerate(shards):
                _append_shard_rows(writer, tar_file_id, load_layout(shard["name"])["positions"])
            writer.close()
        os.replace(tmp, sqlite_path)
        fsync_dir(sqlite_path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _append_shard_rows(writer: Any, tar_file_id: int, positions: list[list[Any]]) -> None:
    writer.append_samples([
        _SampleRow(tar_file_id, key, index, offset, size) for index, (key, offset, size, _) in enumerate(positions)
    ])
    writer.append_parts([
        _PartRow(tar_file_id, index, part, start, length)
        for index, (_, _, _, parts) in enumerate(positions)
        for part, start, length in parts
    ])


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Millions of short-lived rows make Python's cyclic GC re-scan every live object (torch's modules
    included) again and again: measured 3x the cost of the rows themselves. They form no cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _write_info(path: Path, shards: Sequence[dict[str, Any]]) -> None:
    from megatron.energon import __version__
    from megatron.energon.flavors.webdataset.structs import WebdatasetInfo
    from megatron.energon.typed_converter import to_json_object

    info = WebdatasetInfo(energon_version=__version__, shard_counts={s["name"]: s["samples"] for s in shards})
    _write_text(path, json.dumps(to_json_object(info), indent=2))


def _write_splits(path: Path, shards: Sequence[dict[str, Any]]) -> None:
    from megatron.energon.bracecollapse import collapse
    from megatron.energon.flavors.webdataset.structs import WebdatasetSplits
    from megatron.energon.typed_converter import to_json_object

    parts = {split: collapse([s["name"] for s in shards if s["split"] == split], keep_order=True) for split in SPLITS}
    _write_text(path, yaml.dump(to_json_object(WebdatasetSplits(split_parts=parts)), sort_keys=False))


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)
