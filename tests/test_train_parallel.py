"""TP x DP groups and the checkpoint protocol across ranks: one spawn of 4 gloo processes (TP 2 x DP 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from model_support import run_distributed
from neva_core.errors import NevaError
from neva_core.train.checkpointing import (
    DEEPSPEED_TAG,
    TorchCollective,
    discover_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from neva_core.train.parallel import init_parallel_groups, make_layout

WORLD, TP = 4, 2


def _members(rank: int, group: Any) -> list[int]:
    members: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(members, rank, group=group)
    return members


def _fake_deepspeed_save(mpu: Any, rank: int):
    """Each rank writes what DeepSpeed's save writes for it: model states on DP rank 0, its optimizer shard."""

    def write(folder: Path) -> None:
        tag = folder / DEEPSPEED_TAG
        tag.mkdir(exist_ok=True)
        tp_rank, dp_rank = mpu.get_tensor_model_parallel_rank(), mpu.get_data_parallel_rank()
        if dp_rank == 0:
            (tag / f"mp_rank_{tp_rank:02d}_model_states.pt").write_bytes(b"model %d" % tp_rank)
        (tag / f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt").write_bytes(b"optim %d" % rank)

    return write


def groups_and_checkpoints(rank: int, world: int, _group: Any, out: str) -> dict[str, Any]:
    mpu = init_parallel_groups(TP)
    summed = torch.tensor([float(rank)])
    dist.all_reduce(summed, group=mpu.get_data_parallel_group())
    result: dict[str, Any] = {
        "tp": (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size(),
               _members(rank, mpu.get_tensor_model_parallel_group())),
        "model": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size(),
                  _members(rank, mpu.get_model_parallel_group())),
        "dp": (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
               _members(rank, mpu.get_data_parallel_group()), mpu.get_data_parallel_group_ranks()),
        "pipeline": (mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size(),
                     _members(rank, mpu.get_pipeline_model_parallel_group())),
        "tp_src": mpu.get_tensor_model_parallel_src_rank(),
        "dp_sum": summed.item(),
    }
    comm = TorchCollective()
    saved = save_checkpoint(Path(out), 5, _fake_deepspeed_save(mpu, rank), comm,
                            rank_state={"loader": {"rank": rank}}, val_loss=0.5)
    found = discover_checkpoint(Path(out), comm)
    result["files"] = sorted(saved.manifest["files"])
    result["found"] = (found.step, found.val_loss, found.rank_state(rank)["loader"]["rank"])
    # Damage a file in the last rank's share of the verification: every rank must refuse the checkpoint.
    if rank == 0:
        last_share = sorted(saved.manifest["files"])[world - 1::world]
        (saved.path / last_share[0]).write_bytes(b"tampered")
    comm.barrier()
    try:
        verify_checkpoint(found, comm)
        result["damage"] = "not detected"
    except NevaError as exc:
        result["damage"] = str(exc)
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("train-parallel")
    return run_distributed(groups_and_checkpoints, WORLD, root / "results", str(root / "out"))


def test_tensor_parallel_groups_are_consecutive_ranks(ranks) -> None:
    assert [r["tp"] for r in ranks] == [(0, 2, [0, 1]), (1, 2, [0, 1]), (0, 2, [2, 3]), (1, 2, [2, 3])]
    assert [r["model"] for r in ranks] == [r["tp"] for r in ranks]
    assert [r["tp_src"] for r in ranks] == [0, 0, 2, 2]


def test_data_parallel_groups_share_the_tensor_rank(ranks) -> None:
    assert [r["dp"] for r in ranks] == [(0, 2, [0, 2], [0, 2]), (0, 2, [1, 3], [1, 3]),
                                       (1, 2, [0, 2], [0, 2]), (1, 2, [1, 3], [1, 3])]
    assert [r["dp_sum"] for r in ranks] == [2.0, 4.0, 2.0, 4.0]
    assert [r["pipeline"] for r in ranks] == [(0, 1, [rank]) for rank in range(WORLD)]


def test_every_rank_commits_and_verifies_one_checkpoint(ranks) -> None:
    files = ranks[0]["files"]
    assert all(r["files"] == files for r in ranks)
    assert files == sorted(
        [f"deepspeed/mp_rank_0{tp}_model_states.pt" for tp in range(TP)]
        + [f"deepspeed/zero_pp_rank_{dp}_mp_rank_0{tp}_optim_states.pt" for dp in range(2) for tp in range(TP)]
        + [f"ranks/rank-0000{rank}.json" for rank in range(WORLD)]
    )
    assert [r["found"] for r in ranks] == [(5, 0.5, rank) for rank in range(WORLD)]
    assert all("is damaged" in r["damage"] for r in ranks)


def test_mpu_has_no_sequence_parallel_hook() -> None:
    from neva_core.train.parallel import ModelParallelUnit

    # With this attribute DeepSpeed's ZeRO-1/2 would ignore the mpu (facts §8).
    assert not hasattr(ModelParallelUnit, "initialize_sequence_parallel")


@pytest.mark.parametrize(("world", "tp", "rank", "message"), [
    (6, 4, 0, "world size 6 is not divisible by --tp 4"),
    (4, 2, 4, "rank 4 is outside the world of 4"),
    (0, 1, 0, "must both be at least 1"),
])
def test_bad_layouts_name_every_factor(world: int, tp: int, rank: int, message: str) -> None:
    with pytest.raises(NevaError, match=message):
        make_layout(world, tp, rank)
