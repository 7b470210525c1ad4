"""The work of one shard, in a worker process: read and check each image, write the tar and its energon
index (.idx), then the completion record that lets a later run keep the shard."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from neva_core.data.energon import write_tar_index
from neva_core.data.image_source import ImageReader, open_reader
from neva_core.data.images import ImageRejected, check_image
from neva_core.data.records import Skip, skip_entry
from neva_core.data.shard_manifest import record_path, shard_summary, write_json
from neva_core.data.shard_plan import ShardTask
from neva_core.data.tar_writer import TarShardWriter
from neva_core.errors import NevaError

def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard tar (temporary name, fsync, rename), then its completion record; return its summary."""
    out_dir = Path(task.out_dir)
    reader = open_reader(task.reader)
    try:
        record = _write_tar(task, out_dir / task.name, reader)
    finally:
        reader.close()
    write_json(record_path(out_dir, task.name), record)
    return shard_summary(record)


def _write_tar(task: ShardTask, dest: Path, reader: ImageReader) -> dict[str, Any]:
    skipped: list[dict[str, Any]] = []
    converted: Counter[str] = Counter()
    relabeled: Counter[str] = Counter()
    try:
        with TarShardWriter(dest) as writer:
            for index, key, image_path, image_ref, record_json in task.samples:
                if task.parent_pid is not None and os.getppid() != task.parent_pid:
                    os._exit(1)  # the run was killed: stop now; the next run removes our temporary file
                if image_path is None:
                    writer.add(key, record_json)
                    continue
                try:
                    image = check_image(reader.read(image_ref, image_path), image_path)
                except ImageRejected as exc:
                    record_id = json.loads(record_json).get("id")
                    skipped.append(skip_entry(index, record_id, Skip(exc.reason, exc.detail)))
                    continue
                if image.converted_from:
                    converted[image.converted_from] += 1
                if image.relabeled:
                    relabeled[image.relabeled] += 1
                writer.add(key, record_json, image.extension, image.data)
            layout = writer.commit() if writer.keys else writer.discard()
        if layout["keys"]:
            write_tar_index(dest, layout["offsets"], layout["end"])
        else:
            dest.unlink(missing_ok=True)  # energon refuses empty shards
    except OSError as exc:
        raise NevaError(f"cannot write {dest}: {exc.strerror or exc} (disk full?); free space and rerun") from exc
    return {
        "name": task.name, "split": task.split, "digest": task.digest, "records": len(task.samples),
        "samples": len(layout["keys"]), "bytes": layout["bytes"], "sha256": layout["sha256"],
        "skipped": skipped, "converted_by_reason": dict(converted), "relabeled_by_format": dict(relabeled),
        "layout": layout,
    }
