"""The worker pool: spawned processes that write shards, fed at most two tasks each (memory does not grow
with the dataset); shards a killed run finished (completion record and tar intact) are kept, not rewritten."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

from neva_core.data.shard_manifest import load_shard_record, shard_summary
from neva_core.data.shard_plan import ShardTask
from neva_core.data.shard_worker import write_shard
from neva_core.errors import NevaError

log = logging.getLogger(__name__)

_MAX_IN_FLIGHT_PER_WORKER = 2


class WorkerPool(NamedTuple):
    executor: ProcessPoolExecutor
    workers: int


@contextlib.contextmanager
def worker_pool(workers: int, *, start_now: bool) -> Iterator[WorkerPool | None]:
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
        yield WorkerPool(executor, workers)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _worker_ready() -> int:
    return os.getpid()


def run_tasks(
    tasks: Iterator[ShardTask], pool: WorkerPool | None, on_finished: Callable[[dict[str, Any]], None]
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
        record = load_shard_record(out_dir, task.name)
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
    return shard_summary(record)
