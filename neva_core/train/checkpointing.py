"""Crash-safe training checkpoints around DeepSpeed's `save_checkpoint`.

A save goes (every rank takes part):

1. rank 0 checks the free disk (a clear error, nothing written, when it is short);
2. every rank writes into OUT/checkpoints/.step-N.tmp-<host>-<pid>/: DeepSpeed's files (under
   `deepspeed/`, by the caller's `write`) and its own state (`ranks/rank-RRRRR.json`: RNG states and
   loader state, as JSON so that nothing of ours is ever unpickled);
3. after all have written, the ranks share out the files: each hashes and fsyncs its part;
4. rank 0 writes manifest.json (each file's size and sha256) last, then renames the folder to
   OUT/checkpoints/step-N/ and fsyncs the parent: that rename is the commit;
5. rank 0 prunes: the newest plus the --keep-best best by val loss stay; older ones go only now, after
   a newer one is committed.

A checkpoint counts only as `step-N/` with a manifest naming step N. Anything else in checkpoints/
(temporaries of killed runs, DeepSpeed's `latest`) is never trusted; discovery removes it with a
warning. Before DeepSpeed's torch.load reads a checkpoint, every file is checked against the manifest.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from neva_core.errors import NevaError
from neva_core.io import MANIFEST_NAME, fsync_dir, read_manifest, verify_files, write_json_atomic, write_manifest

log = logging.getLogger(__name__)

FORMAT = "neva-train-checkpoint"
FORMAT_VERSION = 1
DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's tag folder inside step-N/: load_checkpoint(step-N, tag=DEEPSPEED_TAG)
RANKS_DIR = "ranks"
_STEP_NAME = re.compile(r"step-(?P<step>\d+)")
_TEMP_NAME = re.compile(r"\.step-(?P<step>\d+)\.tmp-(?P<host>.+)-(?P<pid>\d+)")
_HASH_CHUNK = 8 << 20
T = TypeVar("T")


class Collective(Protocol):
    """The three collectives a save needs, over all ranks (torch.distributed's world, or one process)."""

    rank: int
    world_size: int

    def barrier(self) -> None: ...

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        ...

    def all_gather(self, obj: T) -> list[T]: ...


class SingleProcess:
    rank = 0
    world_size = 1

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: T) -> T:
        return obj

    def all_gather(self, obj: T) -> list[T]:
        return [obj]


class TorchCollective:
    """Collectives over torch.distributed's default (world) group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def barrier(self) -> None:
        self._dist.barrier()

    def broadcast(self, obj: T) -> T:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        gathered: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(gathered, obj)
        return gathered


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: OUT/checkpoints/step-N/ with its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def val_loss(self) -> float | None:
        return self.manifest.get("val_loss")

    @property
    def total_bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.manifest["files"].values())

    def rank_state(self, rank: int) -> dict[str, Any]:
        """The per-rank state saved by `rank` (verify the checkpoint first)."""
        return json.loads((self.path / _rank_file(rank)).read_text())


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def _rank_file(rank: int) -> str:
    return f"{RANKS_DIR}/rank-{rank:05d}.json"


def _read_committed(path: Path) -> Checkpoint | None:
    match = _STEP_NAME.fullmatch(path.name)
    if match is None or not (path / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(path)
    except NevaError:
        return None
    if manifest.get("format") != FORMAT or manifest.get("step") != int(match["step"]):
        return None
    return Checkpoint(path, manifest)


def committed_checkpoints(out: Path) -> list[Checkpoint]:
    """Every committed checkpoint under OUT/checkpoints, oldest first (files not yet verified)."""
    folder = checkpoints_dir(out)
    if not folder.is_dir():
        return []
    found = [ckpt for entry in folder.iterdir() if (ckpt := _read_committed(entry)) is not None]
    return sorted(found, key=lambda ckpt: ckpt.step)


def _owned_by_live_local_process(name: str) -> bool:
    match = _TEMP_NAME.fullmatch(name)
    if match is None or match["host"] != socket.gethostname() or int(match["pid"]) == os.getpid():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_uncommitted(out: Path) -> list[Path]:
    """Delete everything in OUT/checkpoints that is not a committed checkpoint, with a warning each."""
    folder = checkpoints_dir(out)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if _read_committed(entry) is not None:
            continue
        if _owned_by_live_local_process(entry.name):
            raise NevaError(f"{entry} is being written by another live process on this host: is another "
                            f"`neva train` using --out {out}? Run one training per output folder")
        log.warning("removing %s: not a committed checkpoint (left by an interrupted save, or not ours)", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def _hash_and_fsync(path: Path) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _verify_share(path: Path, names: list[str], files: dict[str, Any]) -> str | None:
    try:
        verify_files(path, {name: files[name] for name in names})
    except NevaError as exc:
        return str(exc)
    return None


def verify_checkpoint(ckpt: Checkpoint, comm: Collective) -> None:
    """Check every file of `ckpt` against its manifest (sizes, sha256, no extra file), shared over the ranks.

    Call it before DeepSpeed's load_checkpoint: only files this run committed are ever unpickled.
    """
    files = ckpt.manifest["files"]
    problem = None
    if comm.rank == 0:
        extra = sorted(set(_files_under(ckpt.path)) - set(files) - {MANIFEST_NAME})
        if extra:
            problem = (f"{ckpt.path / extra[0]} is not in the manifest of {ckpt.path}: the checkpoint was changed "
                       f"after it was committed; delete {ckpt.path} to resume from the one before")
    share = sorted(files)[comm.rank::comm.world_size]
    problems = [p for p in comm.all_gather(problem or _verify_share(ckpt.path, share, files)) if p]
    if problems:
        raise NevaError(f"checkpoint {ckpt.path} is damaged: {problems[0]} (delete it to resume from the one before)")


def discover_checkpoint(out: Path, comm: Collective) -> Checkpoint | None:
    """The newest committed checkpoint, verified, after removing anything uncommitted (None: start afresh)."""
    newest = None
    if comm.rank == 0:
        remove_uncommitted(out)
        committed = committed_checkpoints(out)
        newest = str(committed[-1].path) if committed else None
    newest = comm.broadcast(newest)
    if newest is None:
        return None
    ckpt = _read_committed(Path(newest))
    if ckpt is None:
        raise NevaError(f"{newest} cannot be read from rank {comm.rank}: is --out on a filesystem every node shares?")
    verify_checkpoint(ckpt, comm)
    return ckpt


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.3f} MB"


def _disk_problem(out: Path, step: int, expected_bytes: int) -> str | None:
    committed = committed_checkpoints(out)
    needed = max([expected_bytes, *(ckpt.total_bytes for ckpt in committed[-1:])])
    free = shutil.disk_usage(checkpoints_dir(out)).free
    if free >= needed:
        return None
    last = f"the last checkpoint {committed[-1].path} is intact" if committed else "no checkpoint was written"
    return (f"not enough free disk to save step {step} under {checkpoints_dir(out)}: {_size(free)} free, "
            f"about {_size(needed)} needed; free some space (or lower --keep-best) and rerun to resume; {last}")


def _write_share(write: Callable[[Path], None], tmp: Path, rank: int,
                 rank_state: dict[str, Any]) -> tuple[str | None, BaseException | None]:
    """Write this rank's files; a failure is returned, not raised, so every rank learns of it (no hang)."""
    try:
        write(tmp)
        write_json_atomic(tmp / _rank_file(rank), rank_state)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return f"rank {rank} ran out of disk space writing {tmp}; free some space and rerun to resume", None
        return f"rank {rank} failed writing {tmp}: {exc}", exc
    except Exception as exc:  # noqa: BLE001 - re-raised below on this rank, after the others know
        return f"rank {rank} failed writing {tmp}: {type(exc).__name__}: {exc}", exc
    return None, None


def _commit(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    for folder in sorted({path.parent for path in tmp.rglob("*")} | {tmp}, reverse=True):
        fsync_dir(folder)
    write_manifest(tmp, manifest)
    if final.exists():
        # The same step again (a rerun's final save): uncommit the old one first, then swap.
        stale = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-old")
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def save_checkpoint(
    out: Path,
    step: int,
    write: Callable[[Path], None],
    comm: Collective,
    *,
    rank_state: dict[str, Any],
    val_loss: float | None = None,
    meta: dict[str, Any] | None = None,
    keep_best: int = 1,
    expected_bytes: int = 0,
) -> Checkpoint:
    """Save and commit checkpoint `step` on every rank; returns it once committed (and pruned).

    write(folder): this rank's DeepSpeed save into folder, e.g.
        lambda d: engine.save_checkpoint(d, tag=DEEPSPEED_TAG, save_latest=False)
    rank_state: this rank's JSON-able state (`capture_rank_state`). meta: run facts for the manifest
    (counters, config, code version). expected_bytes: the size a first save is checked against.
    """
    folder = checkpoints_dir(out)
    # Not io.commit_output: every rank writes into this folder and rank 0 commits it after a barrier.
    tmp = folder / f".step-{step}.tmp-{socket.gethostname()}-{os.getpid()}"
    problem = None
    if comm.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        problem = _disk_problem(out, step, expected_bytes)
        if problem is None:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANKS_DIR).mkdir(parents=True)
    problem, tmp = comm.broadcast((problem, tmp))
    if problem:
        raise NevaError(problem)

    problem, failure = _write_share(write, tmp, comm.rank, rank_state)
    problems = [p for p in comm.all_gather(problem) if p]
    if problems:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier()
        if failure is not None:
            raise failure
        raise NevaError(f"cannot save step {step}: {problems[0]}; the last committed checkpoint is intact")

    names = comm.broadcast(_files_under(tmp) if comm.rank == 0 else None)
    entries: dict[str, Any] = {}
    for share in comm.all_gather({name: _hash_and_fsync(tmp / name) for name in names[comm.rank::comm.world_size]}):
        entries.update(share)

    final = folder / f"step-{step}"
    if comm.rank == 0:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "val_loss": val_loss,
                    "world_size": comm.world_size, "run": meta or {}, "files": dict(sorted(entries.items()))}
        _commit(tmp, final, manifest)
        prune_checkpoints(out, keep_best)
    comm.barrier()
    ckpt = _read_committed(final)
    if ckpt is None:
        raise NevaError(f"{final} is not visible from rank {comm.rank}: is --out on a filesystem every node shares?")
    return ckpt


def checkpoints_to_keep(committed: list[Checkpoint], keep_best: int) -> set[int]:
    """Steps that stay: the newest, plus the `keep_best` lowest val losses (earlier step first on ties)."""
    if not committed:
        return set()
    scored = sorted((ckpt.val_loss, ckpt.step) for ckpt in committed if ckpt.val_loss is not None)
    return {committed[-1].step} | {step for _, step in scored[:keep_best]}


def prune_checkpoints(out: Path, keep_best: int) -> list[Path]:
    """Remove committed checkpoints that are neither the newest nor among the best; uncommit each first."""
    committed = committed_checkpoints(out)
    keep = checkpoints_to_keep(committed, keep_best)
    removed = []
    for ckpt in committed:
        if ckpt.step in keep:
            continue
        # Renamed to a temporary name first, so a kill mid-delete never leaves a half checkpoint that looks committed.
        doomed = ckpt.path.with_name(f".{ckpt.path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        os.rename(ckpt.path, doomed)
        shutil.rmtree(doomed)
        removed.append(ckpt.path)
    if removed:
        fsync_dir(checkpoints_dir(out))
    return removed


def capture_rank_state(loader_state: Any, **counters: Any) -> dict[str, Any]:
    """This rank's RNG states (python, numpy, torch CPU and CUDA) and loader state, as JSON-able values."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [base64.b64encode(state.numpy().tobytes()).decode() for state in torch.cuda.get_rng_state_all()] \
        if torch.cuda.is_available() else []
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": cuda,
        "loader": loader_state,
        "counters": counters,
    }


def restore_rank_state(state: dict[str, Any]) -> Any:
    """Put the saved RNG states back; returns the loader state to restore the loader with."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state((saved["kind"], np.array(saved["keys"], dtype=np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))

    def as_tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(as_tensor(state["torch"]))
    if state["cuda"]:
        torch.cuda.set_rng_state_all([as_tensor(text) for text in state["cuda"]])
    return state["loader"]
