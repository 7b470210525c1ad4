"""Webdataset shards from a LLaVA-style JSON list and its images (zip or folder): validate, write, resume.

Output folder:

    train-000000.tar ...  val-000000.tar ...     sample = {key}.json (+ {key}.jpg or {key}.png)
    <shard>.tar.idx, .nv-meta/                    megatron-energon metadata (`neva_core.data.energon`)
    skipped.jsonl                                 one line per skipped record: index, id, reason, detail
    .neva-shard/run.json                          fingerprint of the inputs and parameters
    .neva-shard/train-000000.json ...             per-shard completion record (written after tar and .idx)
    manifest.json                                 written last: the folder is complete

Determinism: every valid record gets its split from a hash of its key (adding records never moves
existing ones) and its shard from its position in that split: shard k holds the split's records
[k*maxcount, (k+1)*maxcount) minus those whose image is rejected. A shard's bytes therefore depend only
on the inputs and parameters, never on the number of workers or on scheduling, and tar metadata is fixed
(mtime 0, uid/gid 0, no user names, mode 0644). A shard whose records are all rejected is not written
(energon refuses empty shards), which leaves a gap in the numbering.

Resume: a shard counts as done when its completion record exists (for the same batch of records) and
its tar has the recorded size; the record is written only after the tar is fsynced and renamed, so a
SIGKILL at any moment costs at most the shards in flight. Rerunning into a folder made from other inputs
or parameters is refused, and a lock keeps two runs out of one folder.

Work split: the parent streams the JSON, validates records (structure, duplicates), assigns splits and
hands shard-sized batches to a pool of spawned worker processes (at most 2 per worker queued, so memory
does not grow with the dataset); each worker reads and checks the images and writes one whole shard.
Spawned workers import the caller's main module: a script calling `shard_dataset` needs the usual
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from neva_core.data.energon import SAMPLE_TYPE, write_energon_metadata, write_tar_index
from neva_core.data.image_source import ImageReader, ImageSource, ReaderSpec, open_image_source, open_reader
from neva_core.data.images import ImageRejected, check_image
from neva_core.data.records import DUPLICATE_ID, Skip, ValidRecord, iter_json_list, skip_entry, validate_record
from neva_core.errors import NevaError
from neva_core.io import (
    MANIFEST_NAME,
    atomic_file,
    file_entry,
    fsync_dir,
    is_temp_name,
    read_manifest,
    sha256_file,
    temp_name,
    verify_files,
    write_manifest,
)

log = logging.getLogger(__name__)

DEFAULT_MAXCOUNT = 10000  # Megatron-LM's convert_llava_pretrain_to_wds.py uses the same
DEFAULT_VAL_FRACTION = 0.0  # the LLaVA recipes pretrain on every record; opt in to a validation split
TRAIN, VAL = "train", "val"
STATE_DIR = ".neva-shard"
RUN_RECORD = "run.json"
LOCK_NAME = "lock"
SKIPPED_NAME = "skipped.jsonl"
STAGE = "shard"
# Bump when the bytes written for the same inputs change, so old folders are not resumed into.
LAYOUT_VERSION = 1

_WRITE_BYTES = 1 << 20  # tar pieces are written in one writev once this much is pending
_WRITE_PIECES = 512  # ... or this many pieces (below the system's IOV_MAX of 1024)
_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads archives to whole records; so do we
_USTAR_MAX_SIZE = 8**11 - 1
_USTAR_BEFORE_SIZE = b"0000644\0" + b"0000000\0" + b"0000000\0"
_USTAR_AFTER_SIZE = b"00000000000\0"  # mtime 0
_USTAR_AFTER_CHECKSUM = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
# The checksum is the byte sum of the header with its own 8-byte field read as spaces.
_USTAR_FIXED_SUM = sum(_USTAR_BEFORE_SIZE + _USTAR_AFTER_SIZE + b" " * 8 + _USTAR_AFTER_CHECKSUM)
_MAX_IN_FLIGHT_PER_WORKER = 2
_RECORD_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # compact, UTF-8 kept as is


@dataclass(frozen=True)
class ShardParams:
    """Everything besides the inputs that decides the output bytes (the worker count does not)."""

    maxcount: int = DEFAULT_MAXCOUNT
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.maxcount, bool) or not isinstance(self.maxcount, int) or self.maxcount < 1:
            raise NevaError(f"--maxcount must be a positive integer (samples per shard), got {self.maxcount!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise NevaError(f"--val-fraction must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise NevaError(f"--split-seed must be an integer, got {self.split_seed!r}")


@dataclass(frozen=True)
class ShardResult:
    """What the Prefect task returns: small and JSON-able."""

    out_dir: str
    records: int
    written: int
    skipped: int
    skipped_by_reason: dict[str, int]
    converted_by_reason: dict[str, int]
    split_samples: dict[str, int]
    shards: int
    reused_shards: int = 0  # shards kept from an interrupted earlier run
    already_complete: bool = False  # the folder was complete before this call

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlannedSample(NamedTuple):
    index: int  # position in the input list
    key: str
    image: str | None  # relative image path, None for text-only records
    image_ref: Any  # the image source's locator for it (see image_source)
    record_json: bytes


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
class _Totals:
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


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def shard_dataset(
    json_path: Path | str,
    images: Path | str,
    out_dir: Path | str,
    *,
    maxcount: int = DEFAULT_MAXCOUNT,
    workers: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> ShardResult:
    """Validate every record and image and write webdataset shards plus energon metadata into `out_dir`.

    Idempotent: a complete folder made from the same inputs is returned as is; an interrupted one is
    resumed, keeping its finished shards. The result is byte-identical whatever `workers` is.
    """
    json_path, images, out_dir = Path(json_path), Path(images), Path(out_dir)
    params = ShardParams(maxcount=maxcount, val_fraction=val_fraction, split_seed=split_seed)
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise NevaError(f"--workers must be a positive integer, got {workers!r}")
    if not json_path.is_file():
        raise NevaError(f"--json {json_path} does not exist or is not a file")
    source = open_image_source(images)
    fingerprint = _fingerprint(json_path, source, params)
    with _locked_output(out_dir, fingerprint):
        finished = _finished_result(out_dir, fingerprint)
        if finished is not None:
            return finished
        _remove_stale_temporaries(out_dir)
        return _write_everything(json_path, source, out_dir, params, workers, fingerprint)


def read_shard_manifest(out_dir: Path | str, *, deep: bool = False) -> dict[str, Any]:
    """The manifest of a finished shard folder, after checking every shard's size (and sha256 if deep)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest.get("stage") != STAGE:
        raise NevaError(f"{out_dir / MANIFEST_NAME} is not a `neva shard` manifest; point at a shard folder")
    verify_files(out_dir, manifest["files"], check_hash=deep)
    for name in manifest["energon"]["files"]:
        if not (out_dir / name).is_file():
            raise NevaError(
                f"{out_dir / name} (megatron-energon metadata) is missing; delete {MANIFEST_NAME} and rerun "
                "`neva shard` with the same arguments to rewrite it"
            )
    return manifest


# --- fingerprint, output folder, resume -------------------------------------------------------------


def _fingerprint(json_path: Path, source: ImageSource, params: ShardParams) -> dict[str, Any]:
    # The whole JSON is hashed (0.2 s for LCS-558K's 181 MB): content, not mtime, decides a resume.
    return {
        "layout": LAYOUT_VERSION,
        "json": {"bytes": json_path.stat().st_size, "sha256": sha256_file(json_path)},
        "images": source.fingerprint(),
        "params": asdict(params),
    }


@contextlib.contextmanager
def _locked_output(out_dir: Path, fingerprint: dict[str, Any]) -> Iterator[None]:
    """Claim `out_dir` for this run: refuse foreign folders, other inputs and concurrent runs."""
    state = out_dir / STATE_DIR
    run_record = state / RUN_RECORD
    if out_dir.exists() and not out_dir.is_dir():
        raise NevaError(f"--out {out_dir} is a file; give a folder")
    if out_dir.is_dir() and not run_record.is_file() and _has_foreign_entries(out_dir):
        raise NevaError(
            f"--out {out_dir} already holds files that `neva shard` did not write; choose a new or empty folder"
        )
    state.mkdir(parents=True, exist_ok=True)
    with open(state / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NevaError(f"another `neva shard` run is writing to {out_dir}; wait for it to finish") from None
        _check_run_record(run_record, fingerprint, out_dir)
        yield


def _has_foreign_entries(out_dir: Path) -> bool:
    return any(entry.name != STATE_DIR and not is_temp_name(Path(entry.name)) for entry in os.scandir(out_dir))


def _check_run_record(run_record: Path, fingerprint: dict[str, Any], out_dir: Path) -> None:
    if not run_record.is_file():
        _write_json(run_record, {"fingerprint": fingerprint})
        return
    try:
        previous = json.loads(run_record.read_text())["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise NevaError(f"{run_record} is damaged; delete {out_dir} and run again") from None
    if previous != fingerprint:
        changed = sorted(part for part in fingerprint if previous.get(part) != fingerprint[part])
        raise NevaError(
            f"--out {out_dir} was written from different {', '.join(changed)} (compare {run_record}); "
            "use a new --out folder, or delete this one to start over"
        )


def _finished_result(out_dir: Path, fingerprint: dict[str, Any]) -> ShardResult | None:
    if not (out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_shard_manifest(out_dir)
    except NevaError as exc:
        log.warning("%s; rewriting what is missing", exc)
        (out_dir / MANIFEST_NAME).unlink()
        return None
    if manifest.get("fingerprint") != fingerprint:
        (out_dir / MANIFEST_NAME).unlink()  # same run record but an older manifest: recompute it
        return None
    log.info("%s is already complete (%d samples); nothing to do", out_dir, manifest["written"])
    return _result(out_dir, manifest, reused_shards=len(manifest["shards"]), already_complete=True)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files of a killed run: never trusted, removed before writing anything."""
    for folder in (out_dir, out_dir / STATE_DIR, out_dir / ".nv-meta"):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if is_temp_name(Path(entry.name)):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)


# --- the run --------------------------------------------------------------------------------------------


def _write_everything(
    json_path: Path, source: ImageSource, out_dir: Path, params: ShardParams, workers: int,
    fingerprint: dict[str, Any],
) -> ShardResult:
    # megatron.energon imports torch (~2 s of CPU): with worker processes, the parent imports it while
    # they write shards. In-process (one worker) there is nothing to overlap with.
    energon_import = _start_import("megatron.energon") if workers > 1 else None
    totals = _Totals()
    tasks = _plan(json_path, source, out_dir, params, totals)
    shard_records, reused = _run_tasks(tasks, workers)
    written = sum(record["samples"] for record in shard_records)
    skipped = _merge_skips(totals.parent_skips, shard_records)
    if written + len(skipped) != totals.records:
        raise RuntimeError(f"internal error: {written} written + {len(skipped)} skipped != {totals.records} records")
    _write_skipped(out_dir / SKIPPED_NAME, skipped)
    shards = [record for record in shard_records if record["samples"]]
    if energon_import is not None:
        energon_import.join()  # a package half-imported by another thread cannot be imported from here
    energon_files = write_energon_metadata(out_dir, shards, lambda name: _load_shard_record(out_dir, name)["layout"])
    manifest = _manifest(fingerprint, params, totals.records, shards, skipped, shard_records, energon_files, out_dir)
    write_manifest(out_dir, manifest)
    if not written:
        log.warning("no record of %s could be written; see %s", json_path, out_dir / SKIPPED_NAME)
    return _result(out_dir, manifest, reused_shards=reused)


def _start_import(module: str) -> threading.Thread:
    """Import `module` in a background thread; a failure resurfaces, with its message, at the real import."""
    thread = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    thread.start()
    return thread


def _plan(
    json_path: Path, source: ImageSource, out_dir: Path, params: ShardParams, totals: _Totals
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
        batches[split].append(_planned(verdict, source))
        if len(batches[split]) == params.maxcount:
            yield task_for(split)
    for split in (TRAIN, VAL):
        if batches[split]:
            yield task_for(split)


def _planned(record: ValidRecord, source: ImageSource) -> PlannedSample:
    ref = None if record.image is None else source.locate(record.image)
    record_json = _RECORD_ENCODER.encode(record.record).encode()
    return PlannedSample(record.index, record.key, record.image, ref, record_json)


def _task(name: str, split: str, out_dir: Path, reader: ReaderSpec, samples: list[PlannedSample]) -> ShardTask:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.index}\0{sample.key}\n".encode())
    return ShardTask(name, split, str(out_dir), reader, samples, digest.hexdigest())


def _run_tasks(tasks: Iterator[ShardTask], workers: int) -> tuple[list[dict[str, Any]], int]:
    """Run every task not already done; returns the completion records (sorted by name) and the reuse count."""
    records: list[dict[str, Any]] = []
    reused = 0
    if workers == 1:
        for task in tasks:
            done = _completed_record(task)
            reused += done is not None
            records.append(done or _logged(write_shard(task)))
        return sorted(records, key=lambda r: r["name"]), reused
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    in_flight: set[Future[dict[str, Any]]] = set()
    try:
        for task in tasks:
            done = _completed_record(task)
            if done is not None:
                reused += 1
                records.append(done)
                continue
            task.parent_pid = os.getpid()
            in_flight.add(pool.submit(write_shard, task))
            # Bounded: the parent stops reading the JSON while this many shards are queued.
            if len(in_flight) >= _MAX_IN_FLIGHT_PER_WORKER * workers:
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                records.extend(_outcome(future) for future in finished)
        records.extend(_outcome(future) for future in wait(in_flight).done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(records, key=lambda r: r["name"]), reused


def _outcome(future: Future[dict[str, Any]]) -> dict[str, Any]:
    try:
        return _logged(future.result())
    except BrokenProcessPool:
        raise NevaError(
            "a shard worker died (out of memory, or killed); run the same command again to resume. Workers "
            "are started with 'spawn': a script that calls shard_dataset needs an `if __name__ == \"__main__\":` guard"
        ) from None


def _logged(summary: dict[str, Any]) -> dict[str, Any]:
    log.info("%s: %d samples written, %d skipped", summary["name"], summary["samples"], len(summary["skipped"]))
    return summary


def _completed_record(task: ShardTask) -> dict[str, Any] | None:
    """The summary of a shard a previous run finished, if its record and tar are intact."""
    out_dir = Path(task.out_dir)
    try:
        record = _load_shard_record(out_dir, task.name)
    except (OSError, ValueError):
        return None
    if record.get("digest") != task.digest:
        return None
    tar = out_dir / task.name
    if record["samples"] and (not tar.is_file() or tar.stat().st_size != record["bytes"]):
        return None
    if record["samples"] and not tar.with_name(tar.name + ".idx").is_file():
        return None
    log.debug("%s: kept from an earlier run", task.name)
    return _summary(record)


# --- the worker -------------------------------------------------------------------------------------------


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard tar (temporary name, fsync, rename), then its completion record; return its summary."""
    out_dir = Path(task.out_dir)
    reader = open_reader(task.reader)
    try:
        record = _write_tar(task, out_dir / task.name, reader)
    finally:
        reader.close()
    _write_json(_record_path(out_dir, task.name), record)
    return _summary(record)


def _write_tar(task: ShardTask, dest: Path, reader: ImageReader) -> dict[str, Any]:
    skipped: list[dict[str, Any]] = []
    converted: Counter[str] = Counter()
    relabeled: Counter[str] = Counter()
    try:
        with TarShardWriter(dest) as writer:
            for sample in task.samples:
                if task.parent_pid is not None and os.getppid() != task.parent_pid:
                    os._exit(1)  # the run was killed: stop now; the next run removes our temporary file
                members = _sample_members(sample, reader, converted, relabeled)
                if isinstance(members, Skip):
                    skipped.append(skip_entry(sample.index, json.loads(sample.record_json).get("id"), members))
                else:
                    writer.add(sample.key, members)
            layout = writer.commit() if writer.positions else writer.discard()
        if layout["positions"]:
            write_tar_index(dest, [offset for _, offset, _, _ in layout["positions"]], layout["end"])
        else:
            dest.unlink(missing_ok=True)  # energon refuses empty shards
    except OSError as exc:
        raise NevaError(f"cannot write {dest}: {exc.strerror or exc} (disk full?); free space and rerun") from exc
    return {
        "name": task.name, "split": task.split, "digest": task.digest, "records": len(task.samples),
        "samples": len(layout["positions"]), "bytes": layout["bytes"], "sha256": layout["sha256"],
        "skipped": skipped, "converted_by_reason": dict(converted), "relabeled_by_format": dict(relabeled),
        "layout": layout,
    }


def _sample_members(
    sample: PlannedSample, reader: ImageReader, converted: Counter[str], relabeled: Counter[str]
) -> list[tuple[str, bytes]] | Skip:
    members = [("json", sample.record_json)]
    if sample.image is not None:
        try:
            image = check_image(reader.read(sample.image_ref, sample.image), sample.image)
        except ImageRejected as exc:
            return Skip(exc.reason, exc.detail)
        if image.converted_from:
            converted[image.converted_from] += 1
        if image.relabeled:
            relabeled[image.relabeled] += 1
        members.append((image.extension, image.data))
    return sorted(members)  # fixed member order: jpg < json < png


class TarShardWriter:
    """A tar written under a temporary name with fixed metadata; records each sample's byte layout.

    The layout (sample and member offsets) is what energon's index needs, so the index is built from it
    instead of re-reading every tar. Pieces are hashed as they come and written with one `writev` per
    ~1 MiB, without copying image bytes into an intermediate buffer.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tmp = temp_name(dest)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.digest = hashlib.sha256()
        self.offset = 0
        self.positions: list[list[Any]] = []  # per sample: key, offset, size, [[member, offset, size], ...]

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        start = self.offset
        parts = []
        for extension, data in members:
            self._put(tar_header(f"{key}.{extension}", len(data)))
            parts.append([extension, self.offset, len(data)])
            self._put(data)
            if len(data) % _TAR_BLOCK:
                self._put(_ZERO_BLOCK[: -len(data) % _TAR_BLOCK])
        self.positions.append([key, start, self.offset - start, parts])

    def commit(self) -> dict[str, Any]:
        end = self.offset
        self._put(b"\0" * (2 * _TAR_BLOCK))
        self._put(b"\0" * (-self.offset % _TAR_RECORD))
        self._flush()
        os.fsync(self.fd)  # one fsync per finished shard, not per sample
        self._close()
        os.replace(self.tmp, self.dest)
        fsync_dir(self.dest.parent)
        return {"positions": self.positions, "end": end, "bytes": self.offset, "sha256": self.digest.hexdigest()}

    def discard(self) -> dict[str, Any]:
        return {"positions": [], "end": 0, "bytes": 0, "sha256": None}

    def _put(self, data: bytes) -> None:
        self.digest.update(data)
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.offset += len(data)
        if self.pending_bytes >= _WRITE_BYTES or len(self.pending) >= _WRITE_PIECES:
            self._flush()

    def _flush(self) -> None:
        pieces = self.pending
        while pieces:
            written = os.writev(self.fd, pieces)
            pieces = _after(pieces, written)  # writev may write less than asked
        self.pending, self.pending_bytes = [], 0

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _after(pieces: list[bytes], written: int) -> list[bytes]:
    """What is left of `pieces` once their first `written` bytes are on disk."""
    for index, piece in enumerate(pieces):
        if written < len(piece):
            return [piece[written:], *pieces[index + 1 :]]
        written -= len(piece)
    return []


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


# --- outputs ---------------------------------------------------------------------------------------------


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "layout"}


def _load_shard_record(out_dir: Path, name: str) -> dict[str, Any]:
    return json.loads(_record_path(out_dir, name).read_bytes())


def _record_path(out_dir: Path, shard: str) -> Path:
    return out_dir / STATE_DIR / f"{Path(shard).stem}.json"  # train-000003.tar -> .neva-shard/train-000003.json


def _merge_skips(parent_skips: list[dict[str, Any]], shard_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    skipped = list(parent_skips)
    for record in shard_records:
        skipped.extend(record["skipped"])
    return sorted(skipped, key=lambda entry: entry["index"])


def _write_skipped(path: Path, skipped: list[dict[str, Any]]) -> None:
    with atomic_file(path, "w") as f:
        for entry in skipped:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # one write, not json.dump's many
    with atomic_file(path, "w") as f:
        f.write(text)


def _manifest(
    fingerprint: dict[str, Any], params: ShardParams, records: int, shards: list[dict[str, Any]],
    skipped: list[dict[str, Any]], shard_records: list[dict[str, Any]], energon_files: list[str], out_dir: Path,
) -> dict[str, Any]:
    written = sum(shard["samples"] for shard in shards)
    converted: Counter[str] = Counter()
    relabeled: Counter[str] = Counter()
    for record in shard_records:
        converted.update(record["converted_by_reason"])
        relabeled.update(record["relabeled_by_format"])
    files = {shard["name"]: {"bytes": shard["bytes"], "sha256": shard["sha256"]} for shard in shards}
    files[SKIPPED_NAME] = file_entry(out_dir / SKIPPED_NAME)
    return {
        "stage": STAGE,
        "format": "webdataset",
        "fingerprint": fingerprint,
        "params": asdict(params),
        "records": records,
        "written": written,
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(entry["reason"] for entry in skipped).items())),
        "converted_by_reason": dict(sorted(converted.items())),
        "relabeled_by_format": dict(sorted(relabeled.items())),
        "splits": {
            split: {
                "samples": sum(s["samples"] for s in shards if s["split"] == split),
                "shards": [s["name"] for s in shards if s["split"] == split],
            }
            for split in (TRAIN, VAL)
        },
        "shards": [{k: shard[k] for k in ("name", "split", "samples", "bytes", "sha256")} for shard in shards],
        "files": files,
        "skipped_file": SKIPPED_NAME,
        "energon": {"sample_type": SAMPLE_TYPE, "files": energon_files},
    }


def _result(
    out_dir: Path, manifest: dict[str, Any], *, reused_shards: int, already_complete: bool = False
) -> ShardResult:
    return ShardResult(
        out_dir=str(out_dir),
        records=manifest["records"],
        written=manifest["written"],
        skipped=manifest["skipped"],
        skipped_by_reason=manifest["skipped_by_reason"],
        converted_by_reason=manifest["converted_by_reason"],
        split_samples={split: info["samples"] for split, info in manifest["splits"].items()},
        shards=len(manifest["shards"]),
        reused_shards=reused_shards,
        already_complete=already_complete,
    )
