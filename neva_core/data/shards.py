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

One job per module: `shard_plan` (splits and batches), `shard_pool` (the worker processes, keeping a killed
run's finished shards), `shard_worker` (one shard), `tar_writer` (the tar bytes and their layout),
`direct_writer` (O_DIRECT chunks, hashed), `shard_manifest` (completion records, manifest, result); this
module runs the stage: the output folder, its fingerprint and resume, and energon's index in order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from neva_core.data.energon import SampleIndexWriter, write_energon_metadata
from neva_core.data.image_source import ImageSource, open_image_source
from neva_core.data.shard_manifest import (
    RUN_RECORD,
    SKIPPED_NAME,
    STATE_DIR,
    ShardResult,
    build_manifest,
    load_shard_record,
    merge_skips,
    read_shard_manifest,
    shard_result,
    write_json,
    write_skipped,
)
from neva_core.data.shard_plan import DEFAULT_MAXCOUNT, DEFAULT_VAL_FRACTION, TRAIN, VAL, PlanTotals, ShardParams, plan_tasks
from neva_core.data.shard_pool import WorkerPool, run_tasks, worker_pool
from neva_core.errors import NevaError
from neva_core.io import MANIFEST_NAME, commit_output, is_temp_name, sha256_file, write_manifest

log = logging.getLogger(__name__)

# Bump when what is written for the same inputs changes (the shards, or the completion records a resume
# reads), so old folders are not resumed into. 2: shard layouts in the completion records are columns.
LAYOUT_VERSION = 2


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
    image_prefix: str = "",
) -> ShardResult:
    """Validate every record and image and write webdataset shards plus energon metadata into `out_dir`.

    Idempotent: a complete folder made from the same inputs is returned as is; an interrupted one is
    resumed, keeping its finished shards. The result is byte-identical whatever `workers` is.
    """
    json_path, images, out_dir = Path(json_path), Path(images), Path(out_dir)
    params = ShardParams(maxcount=maxcount, val_fraction=val_fraction, split_seed=split_seed,
                         image_prefix=image_prefix)
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise NevaError(f"--workers must be a positive integer, got {workers!r}")
    if not json_path.is_file():
        raise NevaError(f"--json {json_path} does not exist or is not a file")
    # Without a manifest there is work to do: start the workers now, so that their start-up overlaps the
    # zip index and the first shard's planning. (A folder found complete after all just never uses them.)
    if out_dir.exists() and not out_dir.is_dir():
        raise NevaError(f"--out {out_dir} is a file; give a folder")
    with worker_pool(workers, start_now=not (out_dir / MANIFEST_NAME).is_file()) as pool:
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
        write_json(run_record, {"fingerprint": fingerprint})


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
    return shard_result(out_dir, manifest, reused_shards=len(manifest["shards"]), already_complete=True)


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
    json_path: Path, source: ImageSource, out_dir: Path, params: ShardParams, pool: WorkerPool | None,
    fingerprint: dict[str, Any],
) -> ShardResult:
    totals = PlanTotals()
    tasks = plan_tasks(json_path, source, out_dir, params, totals)
    with SampleIndexWriter(out_dir) as index:
        indexer = InOrderIndexer(index, out_dir)
        shard_records, reused = run_tasks(tasks, pool, indexer.finished)
        indexer.add_val_shards(shard_records)
        written = sum(record["samples"] for record in shard_records)
        skipped = merge_skips(totals.parent_skips, shard_records)
        if written + len(skipped) != totals.records:
            raise RuntimeError(
                f"internal error: {written} written + {len(skipped)} skipped != {totals.records} records"
            )
        write_skipped(out_dir / SKIPPED_NAME, skipped)
        shards = [record for record in shard_records if record["samples"]]
        energon_files = write_energon_metadata(out_dir, shards, index)
    manifest = build_manifest(fingerprint, params, totals.records, shards, skipped, shard_records, energon_files, out_dir)
    write_manifest(out_dir, manifest)
    if not written:
        log.warning("no record of %s could be written; see %s", json_path, out_dir / SKIPPED_NAME)
    return shard_result(out_dir, manifest, reused_shards=reused)


class InOrderIndexer:
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
            self.index.add_shard(load_shard_record(self.out_dir, record["name"])["layout"])


def _shard_number(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".", 1)[0])  # train-000003.tar -> 3
