"""Launcher command lines and the environment a process reads its place from."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_core.errors import NevaError
from neva_core.train.config import TrainConfig
from neva_core.train.launch import (
    Worker,
    launch_command,
    launch_environment,
    node_from_environment,
    read_hostfile,
    worker_from_environment,
    world_size,
)

MODULE, ARGS = "neva_core.train.worker", ["--run", "OUT/run.json"]


def make_config(**changes) -> TrainConfig:
    values = dict(shards="s", llm="l", vision="v", tokenizer="t", out="o", stage="pretrain", template="plain",
                  max_steps=10, micro_batch=1, global_batch=8, lr=1e-3)
    return TrainConfig(**(values | changes))


def test_one_node_is_standalone_torchrun() -> None:
    argv = launch_command(make_config(nproc=4), MODULE, ARGS, python="py")
    assert argv == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                    "-m", MODULE, *ARGS]


def test_per_node_launch_is_a_static_torchrun_rendezvous() -> None:
    config = make_config(nproc=2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600)
    assert launch_command(config, MODULE, ARGS, python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1",
        "--master-addr", "10.0.0.1", "--master-port", "29600", "-m", MODULE, *ARGS]


def test_hostfile_launch_uses_the_deepspeed_launcher(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nworker-0 slots=4\n\nworker-1 slots=4\n")
    config = make_config(hostfile=hostfile)
    assert world_size(config) == 8
    assert launch_command(config, MODULE, ARGS, python="py") == [
        "py", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_port", "29500",
        "--no_local_rank", "--module", MODULE, *ARGS]
    one_host = make_config(hostfile=hostfile, ssh=False, node_rank=1, master_addr="worker-0")
    argv = launch_command(one_host, MODULE, ARGS, python="py")
    assert argv[argv.index("--master_addr") + 1] == "worker-0"
    assert argv[argv.index("--no_ssh") + 1:argv.index("--no_ssh") + 3] == ["--node_rank", "1"]
    with pytest.raises(NevaError, match="--node-rank 2 is not below the 2 hosts"):
        launch_command(make_config(hostfile=hostfile, ssh=False, node_rank=2, master_addr="w"), MODULE, ARGS)


@pytest.mark.parametrize(
    ("text", "message"),
    [("a slots=1\na slots=2\n", "line 2: a is listed twice"), ("a slots=x\n", "line 1: 'a slots=x' is not"),
     ("a slots=0\n", "slots=0"), ("# none\n", "lists no host")],
)
def test_bad_hostfiles_are_refused(tmp_path: Path, text: str, message: str) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)
    with pytest.raises(NevaError, match=message):
        read_hostfile(hostfile)


def test_pytorchjob_pod_environment() -> None:
    pod = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "m-0",
           "PET_MASTER_PORT": "23456", "MASTER_ADDR": "m-0", "MASTER_PORT": "23456", "WORLD_SIZE": "32",
           "RANK": "2"}
    assert node_from_environment(pod) == {"nnodes": 4, "node_rank": 2, "nproc": 8, "master_addr": "m-0",
                                          "master_port": 23456}
    # The older operator: WORLD_SIZE and RANK count pods, one per node; NODE_RANK comes from RANK.
    legacy = {"MASTER_ADDR": "m-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "1"}
    assert node_from_environment(legacy) == {"nnodes": 3, "node_rank": 1, "nproc": None, "master_addr": "m-0",
                                             "master_port": 23456}
    with pytest.raises(NevaError, match="PET_NNODES='1:4'"):
        node_from_environment(pod | {"PET_NNODES": "1:4"})
    assert node_from_environment({}) is None
    # A process a launcher already started is a worker, not a pod.
    assert node_from_environment(legacy | {"LOCAL_RANK": "0"}) is None


def test_worker_environment() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert worker_from_environment(env) == Worker(rank=5, local_rank=1, world_size=8, master_addr="h",
                                                  master_port=29500)
    assert worker_from_environment({"RANK": "0"}) is None
    with pytest.raises(NevaError, match="MASTER_PORT"):
        worker_from_environment({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(NevaError, match="RANK=9 is not below WORLD_SIZE=8"):
        worker_from_environment(env | {"RANK": "9"})


def test_launch_environment() -> None:
    env = launch_environment({"PATH": "/bin", "OMP_NUM_THREADS": "4"}, cpu=True)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "4", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    assert "DS_ACCELERATOR" not in launch_environment({}, cpu=False)
    assert launch_environment({}, cpu=False)["OMP_NUM_THREADS"] == "1"


def test_hostfile_world_is_checked_against_the_batch(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=3\nb slots=3\n")
    with pytest.raises(NevaError, match=r"--tp 4 does not divide the world size 6 \(the slots of --hostfile "):
        make_config(hostfile=hostfile, tp=4).plan(world_size(make_config(hostfile=hostfile)))
    with pytest.raises(NevaError, match="--global-batch 8 is not micro-batch 1 x gradient-accumulation x "
                                        "data-parallel 6"):
        make_config(hostfile=hostfile).plan(6)
    assert make_config(hostfile=hostfile, global_batch=12).plan(6).grad_accum == 2
