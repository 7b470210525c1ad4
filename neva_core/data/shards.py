"""Webdataset shards from a LLaVA-style JSON list and its images (zip or folder): validate, write, resume.

Output folder (written as a temporary sibling, see `io.commit_output`, renamed when complete):

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
SIGKILL at any moment costs at most the shards in flight: the next run adopts the killed run's temporary
folder (this host's, its writer dead) and keeps what matches its own inputs and parameters. A finished
folder from other inputs or parameters is rebuilt beside it and then replaced; the output's lock makes a
second run wait, then reuse the first one's result.

Work split: the parent streams the JSON, validates records (structure, duplicates), assigns splits and
hands shard-sized batches to a pool of spawned worker processes (at most 2 per worker queued, so memory
does not grow with the dataset); each worker reads and checks the images and writes one whole shard,
hashing it and writing it with direct I/O from a thread of its own (`ChunkedWriter`). Meanwhile the
parent adds each finished shard to energon's sample index, so that little is left after the last one.
Spawned workers import the caller's main module: a script calling `shard_dataset` needs the usual
`if __name__ == "__main__":` guard.

CPU per image (100,000 LCS-558K-like images, 5 GB, 2 cores; `bench/shard.py`): ~65 us in the workers
(sha256 ~28 us, reading the zip entry ~5, the image check ~5, the rest tar bookkeeping and the kernel's
share of the writes) and ~22 us in the parent (JSON parse ~5, validation ~4.5, re-encoding the record
~3.5, the zip lookup ~2, the sample index ~5). Nothing here imports torch (~2 s of CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from neva_core.data.energon import SAMPLE_TYPE, SampleIndexWriter, write_energon_metadata, write_tar_index
from neva_core.data.image_source import ImageReader, ImageSource, ReaderSpec, open_image_source, open_reader
from neva_core.data.images import ImageRejected, check_image
from neva_core.data.records import DUPLICATE_ID, Skip, ValidRecord, iter_json_list, skip_entry, validate_record
from neva_core.errors import NevaError
from neva_core.io import (
    MANIFEST_NAME,
    atomic_file,
    commit_output,
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
SKIPPED_NAME = "skipped.jsonl"
STAGE = "shard"
# Bump when what is written for the same inputs changes (the shards, or the completion records a resume
# reads), so old folders are not resumed into. 2: shard layouts in the completion records are columns.
LAYOUT_VERSION = 2

# Shard bytes go to disk in chunks of this size from a page-aligned buffer: a multiple of any block
# size O_DIRECT may demand, at offsets that are multiples of it too.
_CHUNK = 4 << 20
_CHUNK_BUFFERS = 3  # one being filled, up to two queued for the disk
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
    # Without a manifest there is work to do: start the workers now, so that their start-up overlaps the
    # zip index and the first shard's planning. (A folder found complete after all just never uses them.)
    if out_dir.exists() and not out_dir.is_dir():
        raise NevaError(f"--out {out_dir} is a file; give a folder")
    with _worker_pool(workers, start_now=not (out_dir / MANIFEST_NAME).is_file()) as pool:
        source = open_image_source(images)
        fingerprint = _fingerprint(json_path, source, params)

        def write(tmp: Path) -> ShardResult:
            _claim(tmp, fingerprint)
            _remove_stale_temporaries(tmp)
            result = _write_everything(json_path, source, tmp, params, pool, fingerprint)
            return dataclasses.replace(result, out_dir=str(out_dir))

        # A killed run's folder is resumed (`resume`): its finished shards are kept.
        return commit_output(out_dir, reuse=lambda found: _finished_result(found, fingerprint), build=write,
                             resume=True)


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


def _claim(folder: Path, fingerprint: dict[str, Any]) -> None:
    """Make `folder` (empty, or a killed run's) this run's: keep a killed run's work only if it was
    working from the same inputs and parameters."""
    run_record = folder / STATE_DIR / RUN_RECORD
    previous = _read_run_record(run_record)
    if previous != fingerprint:
        if previous is not None or any(folder.iterdir()):
            log.info("%s holds a killed run's work on other inputs or parameters; starting over", folder)
        for entry in list(folder.iterdir()):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        _write_json(run_record, {"fingerprint": fingerprint})


def _read_run_record(run_record: Path) -> dict[str, Any] | None:
    try:
        return json.loads(run_record.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finished_result(out_dir: Path, fingerprint: dict[str, Any]) -> ShardResult | None:
    """The finished folder's result if it was made from these inputs and parameters; None if from others
    or damaged (it is rebuilt); an error if `neva shard` did not write it (it is never replaced)."""
    if not (out_dir / MANIFEST_NAME).is_file() and not (out_dir / STATE_DIR / RUN_RECORD).is_file():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            return None  # an empty folder: nothing to lose
        raise NevaError(
            f"--out {out_dir} already holds files that `neva shard` did not write; choose a new or empty folder"
        )
    try:
        manifest = read_shard_manifest(out_dir)
    except NevaError as exc:
        log.warning("%s; writing the shards again", exc)
        return None
    if manifest.get("fingerprint") != fingerprint:
        changed = sorted(part for part in fingerprint if manifest.get("fingerprint", {}).get(part) != fingerprint[part])
        log.info("%s was written from different %s; writing the shards again", out_dir, ", ".join(changed))
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
    json_path: Path, source: ImageSource, out_dir: Path, params: ShardParams, pool: _Pool | None,
    fingerprint: dict[str, Any],
) -> ShardResult:
    totals = _Totals()
    tasks = _plan(json_path, source, out_dir, params, totals)
    with SampleIndexWriter(out_dir) as index:
        indexer = _InOrderIndexer(index, out_dir)
        shard_records, reused = _run_tasks(tasks, pool, indexer.finished)
        indexer.add_val_shards(shard_records)
        written = sum(record["samples"] for record in shard_records)
        skipped = _merge_skips(totals.parent_skips, shard_records)
        if written + len(skipped) != totals.records:
            raise RuntimeError(
                f"internal error: {written} written + {len(skipped)} skipped != {totals.records} records"
            )
        _write_skipped(out_dir / SKIPPED_NAME, skipped)
        shards = [record for record in shard_records if record["samples"]]
        energon_files = write_energon_metadata(out_dir, shards, index)
    manifest = _manifest(fingerprint, params, totals.records, shards, skipped, shard_records, energon_files, out_dir)
    write_manifest(out_dir, manifest)
    if not written:
        log.warning("no record of %s could be written; see %s", json_path, out_dir / SKIPPED_NAME)
    return _result(out_dir, manifest, reused_shards=reused)


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
    return record.index, record.key, record.image, ref, _RECORD_ENCODER.encode(record.record).encode()


def _task(name: str, split: str, out_dir: Path, reader: ReaderSpec, samples: list[PlannedSample]) -> ShardTask:
    digest = hashlib.sha256()
    for index, key, _, _, _ in samples:
        digest.update(f"{index}\0{key}\n".encode())
    return ShardTask(name, split, str(out_dir), reader, samples, digest.hexdigest())


class _Pool(NamedTuple):
    executor: ProcessPoolExecutor
    workers: int


@contextlib.contextmanager
def _worker_pool(workers: int, *, start_now: bool) -> Iterator[_Pool | None]:
    """Processes writing shards; None for one worker, which writes them in this process."""
    if workers == 1:
        yield None
        return
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        if start_now:
            # A spawn pool starts one process per call while none is idle: these calls start them all
            # at once, each importing this module (~0.2 s), instead of one per shard as work comes.
            for _ in range(workers):
                executor.submit(_worker_ready)
        yield _Pool(executor, workers)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _worker_ready() -> int:
    return os.getpid()


def _run_tasks(
    tasks: Iterator[ShardTask], pool: _Pool | None, on_finished: Callable[[dict[str, Any]], None]
) -> tuple[list[dict[str, Any]], int]:
    """Run every task not already done, calling `on_finished` with each shard's completion record as
    soon as it is known; returns the records (sorted by name) and the reuse count."""
    records: list[dict[str, Any]] = []
    reused = 0

    def finished(record: dict[str, Any]) -> None:
        records.append(record)
        on_finished(record)

    in_flight: set[Future[dict[str, Any]]] = set()
    try:
        for task in tasks:
            done = _completed_record(task)
            if done is not None:
                reused += 1
                finished(done)
            elif pool is None:
                finished(_logged(write_shard(task)))
            else:
                task.parent_pid = os.getpid()
                in_flight.add(pool.executor.submit(write_shard, task))
                # Bounded: the parent stops reading the JSON while this many shards are queued.
                while len(in_flight) >= _MAX_IN_FLIGHT_PER_WORKER * pool.workers:
                    in_flight = _collect_first(in_flight, finished)
        while in_flight:  # one by one, so each shard is indexed as soon as it is done
            in_flight = _collect_first(in_flight, finished)
    except BrokenProcessPool:  # from submit or from a result
        raise _worker_died() from None
    return sorted(records, key=lambda r: r["name"]), reused


def _collect_first(
    in_flight: set[Future[dict[str, Any]]], finished: Callable[[dict[str, Any]], None]
) -> set[Future[dict[str, Any]]]:
    """Wait for at least one shard; hand over every finished one; return those still running."""
    done, still_running = wait(in_flight, return_when=FIRST_COMPLETED)
    for future in done:
        finished(_logged(future.result()))
    return still_running


class _InOrderIndexer:
    """Adds finished shards to energon's sample index in .info.json order, while the run goes on.

    That order is every train shard by number, then every val shard: a train shard is added once all
    train shards before it are finished; val shards (whose position depends on how many train shards
    hold samples) at the end. A waiting shard costs only its summary: its rows are read from its
    completion record when its turn comes.
    """

    def __init__(self, index: SampleIndexWriter, out_dir: Path) -> None:
        self.index = index
        self.out_dir = out_dir
        self.next_train = 0
        self.waiting: dict[int, dict[str, Any]] = {}  # finished train shards after `next_train`, by number

    def finished(self, record: dict[str, Any]) -> None:
        if record["split"] != TRAIN:
            return
        self.waiting[_shard_number(record["name"])] = record
        while self.next_train in self.waiting:
            self._add(self.waiting.pop(self.next_train))
            self.next_train += 1

    def add_val_shards(self, records: list[dict[str, Any]]) -> None:
        """After the run: the val shards, in name order."""
        if self.waiting:
            raise RuntimeError(f"internal error: train shards {sorted(self.waiting)} were never indexed")
        for record in records:
            if record["split"] == VAL:
                self._add(record)

    def _add(self, record: dict[str, Any]) -> None:
        if record["samples"]:  # empty shards are not written, so they have no place in the index
            self.index.add_shard(_load_shard_record(self.out_dir, record["name"])["layout"])


def _shard_number(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".", 1)[0])  # train-000003.tar -> 3


def _worker_died() -> NevaError:
    return NevaError(
        "a shard worker died (out of memory, or killed); run the same command again to resume. Workers "
        "are started with 'spawn': a script that calls shard_dataset needs an `if __name__ == \"__main__\":` guard"
    )


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


class ChunkedWriter:
    """Appends to a file through page-aligned buffers, written in whole chunks with O_DIRECT if allowed.

    Why: a shard is written once and read much later (by training, often on other machines). Through the
    page cache every byte is first copied into newly allocated cache pages, which cost more CPU than the
    rest of the write (5 GB on the 2-core VM of the benchmark: `dd oflag=direct conv=fsync` 2.2-3.0 s
    with 0.6-1.2 s of system time, `dd conv=fsync` 2.8-16 s with 2.2-13 s), and the new pages push the
    images.zip being read out of the cache. Whole chunks at chunk offsets meet any
    O_DIRECT alignment; the last partial chunk goes through the page cache. A file system that refuses
    O_DIRECT (tmpfs, some network file systems) gets ordinary writes.

    A direct write returns only once the device has the data, so one thread hashes and writes full
    chunks, in order, while the caller fills the next buffer: the worker keeps computing during the
    disk's time, and the sha256 takes one call per 4 MiB instead of three per tar member.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct = _set_direct_io(fd, True)
        # Anonymous maps are page-aligned, as O_DIRECT needs.
        self.views = [memoryview(mmap.mmap(-1, _CHUNK)) for _ in range(_CHUNK_BUFFERS)]
        self.current = 0  # the buffer being filled
        self.view = self.views[0]  # ... and its view
        self.fill = 0
        self.digest = hashlib.sha256()
        self.writer = ThreadPoolExecutor(1)  # one thread, so chunks are hashed and land in order
        self.in_flight: deque[Future[None]] = deque()  # chunk writes, oldest first

    def write(self, data: bytes) -> None:
        end = self.fill + len(data)
        if end < _CHUNK:  # the usual case, kept short: it runs several times per sample
            self.view[self.fill : end] = data
            self.fill = end
            return
        source = memoryview(data)
        while source:
            take = min(len(source), _CHUNK - self.fill)
            self.view[self.fill : self.fill + take] = source[:take]
            self.fill += take
            source = source[take:]
            if self.fill == _CHUNK:
                self._hand_over()

    def flush(self) -> str:
        """Write everything buffered and wait for it (errors surface here); returns the sha256 of all
        bytes written. The caller fsyncs."""
        while self.in_flight:
            self.in_flight.popleft().result()
        if self.fill:
            if self.direct:  # a partial chunk need not meet the alignment: write it through the cache
                self.direct = _set_direct_io(self.fd, False)
            self._write_chunk(self.view[: self.fill])
            self.fill = 0
        return self.digest.hexdigest()

    def close(self) -> None:
        """Stop the writer thread. The buffers are unmapped with this object: a failed write's traceback
        may still hold a view of one, and closing a map with views raises."""
        self.writer.shutdown(wait=True)

    def _hand_over(self) -> None:
        """Queue the full buffer for the writer thread and move on to the next free one."""
        self.in_flight.append(self.writer.submit(self._write_chunk, self.view))
        self.current = (self.current + 1) % _CHUNK_BUFFERS
        self.view = self.views[self.current]
        self.fill = 0
        if len(self.in_flight) == _CHUNK_BUFFERS:
            self.in_flight.popleft().result()  # the oldest write used the buffer we fill next

    def _write_chunk(self, view: memoryview) -> None:
        self.digest.update(view)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct_io(self.fd, False)  # an alignment this file system rejects
                continue
            view = view[written:]  # a short write leaves the rest for the next call


def _set_direct_io(fd: int, enable: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; returns whether it is on (False where the system refuses it)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if enable else flags & ~flag)
    except OSError:
        return False
    return enable


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
