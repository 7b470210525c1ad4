"""Planning a shard run: which split each record goes to and which records each shard holds.

The parent streams the JSON list, validates each record (structure, duplicate keys), gives it a split
from a hash of its key (adding records never moves existing ones) and batches each split into tasks of
`maxcount` records, in input order: shard k of a split holds its records [k*maxcount, (k+1)*maxcount).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neva_core.data.image_source import ImageSource, ReaderSpec
from neva_core.data.records import DUPLICATE_ID, Skip, ValidRecord, iter_json_list, skip_entry, validate_record
from neva_core.errors import NevaError

DEFAULT_MAXCOUNT = 10000  # Megatron-LM's convert_llava_pretrain_to_wds.py uses the same
DEFAULT_VAL_FRACTION = 0.0  # the LLaVA recipes pretrain on every record; opt in to a validation split
TRAIN, VAL = "train", "val"
_RECORD_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # compact, UTF-8 kept as is


@dataclass(frozen=True)
class ShardParams:
    """Everything besides the inputs that decides the output bytes (the worker count does not)."""

    maxcount: int = DEFAULT_MAXCOUNT
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0
    # Put before every record's image path to find it in the archive or folder: COCO's train2017.zip holds
    # `train2017/<file>` while LLaVA-Instruct-150K's records name `<file>`.
    image_prefix: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.maxcount, bool) or not isinstance(self.maxcount, int) or self.maxcount < 1:
            raise NevaError(f"--maxcount must be a positive integer (samples per shard), got {self.maxcount!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise NevaError(f"--val-fraction must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise NevaError(f"--split-seed must be an integer, got {self.split_seed!r}")
        prefix = self.image_prefix
        if prefix and (not prefix.endswith("/") or prefix.startswith("/") or ".." in prefix.split("/")
                       or "\\" in prefix):
            raise NevaError(f"--image-prefix {prefix!r} must be a relative folder path ending with '/' "
                            "(such as 'train2017/'), without '..' or backslashes")


# One record as a worker gets it: (index in the input list, sample key, relative image path or None for a
# text-only record, the image source's locator for it, the record's JSON member bytes). A plain tuple,
# as 10,000 of them are pickled per shard: a NamedTuple costs 5x more to pickle and unpickle.
PlannedSample = tuple[int, str, str | None, Any, bytes]


@dataclass
class ShardTask:
    name: str
    split: str
    out_dir: str
    reader: ReaderSpec
    samples: list[PlannedSample]
    digest: str  # identifies the batch, so a completion record is only trusted for the same records
    parent_pid: int | None = None  # workers stop if this process disappears


@dataclass
class PlanTotals:
    records: int = 0
    parent_skips: list[dict[str, Any]] = field(default_factory=list)


def split_of(key: str, val_fraction: float, seed: int) -> str:
    """Stable train/val assignment from the sample key alone."""
    if val_fraction <= 0.0:
        return TRAIN
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return VAL if int.from_bytes(digest, "big") < val_fraction * 2.0**64 else TRAIN


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def plan_tasks(
    json_path: Path, source: ImageSource, out_dir: Path, params: ShardParams, totals: PlanTotals
) -> Iterator[ShardTask]:
    """Stream the records and yield one task per shard, in input order; record-level skips go to totals."""
    first_index: dict[str, int] = {}
    batches: dict[str, list[PlannedSample]] = {TRAIN: [], VAL: []}
    numbers = {TRAIN: 0, VAL: 0}

    def task_for(split: str) -> ShardTask:
        samples, batches[split] = batches[split], []
        numbers[split] += 1
        return _task(shard_name(split, numbers[split] - 1), split, out_dir, source.reader_spec, samples)

    for index, obj in iter_json_list(json_path):
        totals.records += 1
        verdict = validate_record(index, obj)
        if isinstance(verdict, ValidRecord) and verdict.key in first_index:
            earlier = first_index[verdict.key]
            verdict = Skip(DUPLICATE_ID, f"sample key {verdict.key!r} was already used by record {earlier}")
        if isinstance(verdict, Skip):
            totals.parent_skips.append(skip_entry(index, obj.get("id") if isinstance(obj, dict) else None, verdict))
            continue
        first_index[verdict.key] = index
        split = split_of(verdict.key, params.val_fraction, params.split_seed)
        batches[split].append(_planned(verdict, source, params.image_prefix))
        if len(batches[split]) == params.maxcount:
            yield task_for(split)
    for split in (TRAIN, VAL):
        if batches[split]:
            yield task_for(split)


def _planned(record: ValidRecord, source: ImageSource, image_prefix: str) -> PlannedSample:
    ref = None if record.image is None else source.locate(image_prefix + record.image)
    return record.index, record.key, record.image, ref, _RECORD_ENCODER.encode(record.record).encode()


def _task(name: str, split: str, out_dir: Path, reader: ReaderSpec, samples: list[PlannedSample]) -> ShardTask:
    digest = hashlib.sha256()
    for index, key, _, _, _ in samples:
        digest.update(f"{index}\0{key}\n".encode())
    return ShardTask(name, split, str(out_dir), reader, samples, digest.hexdigest())
