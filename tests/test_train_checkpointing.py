"""Checkpoint commit, discovery, pruning and verification, with fake DeepSpeed files; and a SIGKILL mid-save."""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest

from neva_core.errors import NevaError
from neva_core.train import checkpointing
from neva_core.train.checkpointing import (
    DEEPSPEED_TAG,
    SingleProcess,
    capture_rank_state,
    checkpoints_dir,
    committed_checkpoints,
    discover_checkpoint,
    restore_rank_state,
    save_checkpoint,
    verify_checkpoint,
)

ONE = SingleProcess()


def fake_deepspeed_save(payload: bytes):
    """Files named and nested as DeepSpeed's save_checkpoint(folder, tag=DEEPSPEED_TAG) writes them."""

    def write(folder: Path) -> None:
        tag = folder / DEEPSPEED_TAG
        tag.mkdir()
        (tag / "mp_rank_00_model_states.pt").write_bytes(payload)
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload * 2)

    return write


def save(out: Path, step: int, val_loss: float | None = None, keep_best: int = 1, **kwargs):
    return save_checkpoint(out, step, fake_deepspeed_save(b"step %d " % step), ONE,
                           rank_state={"loader": {"step": step}}, val_loss=val_loss, keep_best=keep_best,
                           meta={"samples": step * 8}, **kwargs)


def test_save_commits_a_folder_with_a_manifest_of_every_file(tmp_path: Path) -> None:
    ckpt = save(tmp_path, 3, val_loss=1.5)
    assert ckpt.path == checkpoints_dir(tmp_path) / "step-3"
    files = ckpt.manifest["files"]
    assert sorted(files) == ["deepspeed/mp_rank_00_model_states.pt",
                             "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ranks/rank-00000.json"]
    assert files["deepspeed/mp_rank_00_model_states.pt"]["bytes"] == len(b"step 3 ")
    assert (ckpt.step, ckpt.val_loss, ckpt.manifest["run"]) == (3, 1.5, {"samples": 24})
    assert ckpt.rank_state(0) == {"loader": {"step": 3}}
    assert [entry.name for entry in checkpoints_dir(tmp_path).iterdir()] == ["step-3"]  # no temporary left


def test_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5), (4, None), (5, 2.2)]:
        save(tmp_path, step, val_loss=loss, keep_best=2)
    assert [ckpt.step for ckpt in committed_checkpoints(tmp_path)] == [2, 5]  # 5 is newest and second best
    save(tmp_path, 6, keep_best=2)
    assert [ckpt.step for ckpt in committed_checkpoints(tmp_path)] == [2, 5, 6]
    save(tmp_path, 7, keep_best=0)
    assert [ckpt.step for ckpt in committed_checkpoints(tmp_path)] == [7]


def test_discovery_trusts_only_committed_checkpoints(tmp_path: Path, caplog) -> None:
    save(tmp_path, 2)
    folder = checkpoints_dir(tmp_path)
    unfinished = folder / ".step-4.tmp-otherhost-12345"  # a killed save on another node
    (unfinished / DEEPSPEED_TAG).mkdir(parents=True)
    (folder / "latest").write_text(".step-4.tmp-otherhost-12345/deepspeed")  # DeepSpeed's own pointer
    (folder / "step-9").mkdir()  # no manifest: never committed
    forged = folder / "step-7"
    forged.mkdir()
    (forged / "manifest.json").write_text(json.dumps({"format": "neva-train-checkpoint", "step": 8, "files": {}}))
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        ckpt = discover_checkpoint(tmp_path, ONE)
    assert ckpt is not None and ckpt.step == 2
    assert sorted(entry.name for entry in folder.iterdir()) == ["step-2"]
    assert sum("not a committed checkpoint" in record.message for record in caplog.records) == 4
    assert discover_checkpoint(tmp_path / "fresh", ONE) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra"])
def test_verification_catches_any_change_before_loading(tmp_path: Path, damage: str) -> None:
    ckpt = save(tmp_path, 1)
    model = ckpt.path / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
    if damage == "flip":
        model.write_bytes(b"STEP 1 ")  # same size, other bytes
    elif damage == "truncate":
        model.write_bytes(b"step")
    elif damage == "delete":
        model.unlink()
    else:
        (ckpt.path / DEEPSPEED_TAG / "injected.pt").write_bytes(b"pickle")
    with pytest.raises(NevaError, match="is damaged"):
        verify_checkpoint(ckpt, ONE)
    with pytest.raises(NevaError, match="is damaged"):
        discover_checkpoint(tmp_path, ONE)


def test_too_little_disk_is_a_clear_error_that_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    first = save(tmp_path, 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(100, 90, first.total_bytes - 1))
    with pytest.raises(NevaError, match=r"not enough free disk to save step 2 .*step-1 is intact"):
        save(tmp_path, 2)
    with pytest.raises(NevaError, match="not enough free disk"):
        save_checkpoint(tmp_path / "new", 1, fake_deepspeed_save(b"x"), ONE, rank_state={}, expected_bytes=10**6)
    assert [entry.name for entry in checkpoints_dir(tmp_path).iterdir()] == ["step-1"]
    verify_checkpoint(discover_checkpoint(tmp_path, ONE), ONE)


def test_a_failed_write_mid_save_leaves_nothing(tmp_path: Path) -> None:
    save(tmp_path, 1)

    def full_disk(folder: Path) -> None:
        (folder / "partial.pt").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    def broken(folder: Path) -> None:
        (folder / "partial.pt").write_bytes(b"half")
        raise RuntimeError("serialisation failed")

    with pytest.raises(NevaError, match="ran out of disk space"):
        save_checkpoint(tmp_path, 2, full_disk, ONE, rank_state={})
    with pytest.raises(RuntimeError, match="serialisation failed"):  # a bug keeps its traceback
        save_checkpoint(tmp_path, 2, broken, ONE, rank_state={})
    assert [entry.name for entry in checkpoints_dir(tmp_path).iterdir()] == ["step-1"]


def test_rank_state_restores_every_rng_and_the_loader_state() -> None:
    import numpy as np
    import torch

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the python state
    state = json.loads(json.dumps(capture_rank_state({"epoch": 1, "offsets": [3, 4]}, step=7)))
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert restore_rank_state(state) == {"epoch": 1, "offsets": [3, 4]}
    assert (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected
    assert state["counters"] == {"step": 7}


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from neva_core.train import checkpointing as ck

    out, point = Path(sys.argv[1]), sys.argv[2]

    def write(folder):
        (folder / ck.DEEPSPEED_TAG).mkdir()
        (folder / ck.DEEPSPEED_TAG / "mp_rank_00_model_states.pt").write_bytes(b"model" * 1000)
        if point == "after-deepspeed-files":
            os.kill(os.getpid(), signal.SIGKILL)

    def manifest_then_die(folder, manifest):
        original(folder, manifest)
        os.kill(os.getpid(), signal.SIGKILL)

    one = ck.SingleProcess()
    ck.save_checkpoint(out, 1, lambda folder: (folder / ck.DEEPSPEED_TAG).mkdir(), one, rank_state={})
    original = ck.write_manifest
    if point == "after-manifest":
        ck.write_manifest = manifest_then_die
    ck.save_checkpoint(out, 2, write, one, rank_state={})
""")


@pytest.mark.parametrize("point", ["after-deepspeed-files", "after-manifest"])
def test_a_save_killed_before_its_commit_leaves_nothing_trusted(tmp_path: Path, point: str) -> None:
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), point], capture_output=True,
                            text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [entry.name for entry in checkpoints_dir(tmp_path).iterdir()]
    assert "step-1" in leftovers and any(name.startswith(".step-2.tmp-") for name in leftovers)
    ckpt = discover_checkpoint(tmp_path, ONE)
    assert ckpt is not None and ckpt.step == 1
    assert [entry.name for entry in checkpoints_dir(tmp_path).iterdir()] == ["step-1"]


def test_saving_a_committed_step_again_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 3, val_loss=2.0)
    again = save(tmp_path, 3, val_loss=1.0)
    assert again.val_loss == 1.0
    assert [entry.name for entry in checkpoints_dir(tmp_path).iterdir()] == ["step-3"]
    verify_checkpoint(again, ONE)
