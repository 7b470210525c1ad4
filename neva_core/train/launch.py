"""How `neva train` starts its processes, and how a process learns its place.

Four ways to run, one command line each (argv lists, never a shell):

- one node, `--nproc N`:          torchrun --standalone (a free port, so runs side by side never clash);
- one launcher per node,          torchrun --nnodes N --node-rank I --master-addr A --master-port P
  `--nnodes N --node-rank I`:     (static rendezvous: every node runs the same command but its rank);
- `--hostfile H`:                 the DeepSpeed launcher, which starts every host's slots over pdsh/ssh;
  `--hostfile H --no-ssh --node-rank I`: the DeepSpeed launcher on one host (`--no_ssh --node_rank`);
- a Kubeflow PyTorchJob pod:      the per-node form, with the node's place read from the environment the
                                  operator sets (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, else RANK
                                  and WORLD_SIZE counting pods; MASTER_ADDR/PORT point at the master pod).

The launched processes read RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT (`worker_from_environment`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neva_core.errors import NevaError

if TYPE_CHECKING:
    from neva_core.train.config import TrainConfig

_HOSTFILE_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\d+)\s*")


@dataclass(frozen=True)
class Worker:
    """A launched process's place in the world, as its launcher set it in the environment."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    if not value.isdigit():
        raise NevaError(f"environment variable {name}={value!r} is not a non-negative integer; the launcher "
                        "(torchrun, deepspeed or the PyTorchJob operator) sets it, so check how the job is started")
    return int(value)


def worker_from_environment(env: Mapping[str, str]) -> Worker | None:
    """This process's rank and world, or None when no launcher started it (a single process)."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if "LOCAL_RANK" not in env:
        return None
    missing = [name for name in names if name not in env]
    if missing:
        raise NevaError(f"LOCAL_RANK is set but {', '.join(missing)} are not: start the workers with torchrun "
                        "or the DeepSpeed launcher (as `neva train` does)")
    worker = Worker(rank=_int_var(env, "RANK"), local_rank=_int_var(env, "LOCAL_RANK"),
                    world_size=_int_var(env, "WORLD_SIZE"), master_addr=env["MASTER_ADDR"],
                    master_port=_int_var(env, "MASTER_PORT"))
    if worker.rank >= worker.world_size:
        raise NevaError(f"RANK={worker.rank} is not below WORLD_SIZE={worker.world_size}")
    return worker


def _static_count(env: Mapping[str, str], name: str) -> int | None:
    """PET_NNODES is "N" or an elastic "MIN:MAX"; only a fixed size can give exact resume."""
    value = env.get(name)
    if value is None or value in ("auto", "cpu", "gpu"):
        return None
    low, _, high = value.partition(":")
    if not low.isdigit() or (high and high != low):
        raise NevaError(f"{name}={value!r}: neva trains on a fixed number of nodes and processes (exact resume "
                        "needs the same topology); set a fixed count in the PyTorchJob (no elastic policy)")
    return int(low)


def node_from_environment(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The TrainConfig node fields of a Kubeflow PyTorchJob pod (None outside one, or inside a launched worker).

    Keys: nnodes, node_rank, nproc (None when the job leaves it to the command), master_addr, master_port.
    """
    is_pod = "PET_NNODES" in env or all(name in env for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR"))
    if "LOCAL_RANK" in env or not is_pod:
        return None
    nnodes = _static_count(env, "PET_NNODES")
    node_rank_var = "PET_NODE_RANK" if "PET_NODE_RANK" in env else "RANK"
    master_addr = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")
    port_var = "PET_MASTER_PORT" if "PET_MASTER_PORT" in env else "MASTER_PORT"
    if master_addr is None or port_var not in env or node_rank_var not in env:
        raise NevaError("this looks like a PyTorchJob pod (PET_NNODES is set) but MASTER_ADDR, MASTER_PORT or "
                        "RANK is missing; check the job's spec")
    return {
        # Without PET_NNODES the operator's WORLD_SIZE and RANK count pods, one per node.
        "nnodes": nnodes if nnodes is not None else _int_var(env, "WORLD_SIZE"),
        "node_rank": _int_var(env, node_rank_var),
        "nproc": _static_count(env, "PET_NPROC_PER_NODE"),
        "master_addr": master_addr,
        "master_port": _int_var(env, port_var),
    }


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile, refusing what the DeepSpeed launcher would refuse."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise NevaError(f"--hostfile {path}: cannot read it ({exc.strerror})") from None
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = _HOSTFILE_LINE.fullmatch(text)
        if match is None:
            raise NevaError(f"--hostfile {path} line {number}: {text!r} is not 'HOST slots=N'")
        host, slots = match["host"], int(match["slots"])
        if host in hosts:
            raise NevaError(f"--hostfile {path} line {number}: {host} is listed twice; the DeepSpeed launcher "
                            "refuses duplicate hosts (to run several launchers on one machine, use the per-node "
                            "form --nnodes/--node-rank)")
        if slots < 1:
            raise NevaError(f"--hostfile {path} line {number}: {host} has slots={slots}; give at least 1")
        hosts[host] = slots
    if not hosts:
        raise NevaError(f"--hostfile {path} lists no host; write one 'HOST slots=N' line per node")
    return list(hosts.items())


def world_size(config: TrainConfig) -> int:
    """How many processes the launch starts over all nodes."""
    if config.hostfile is not None:
        return sum(slots for _, slots in read_hostfile(config.hostfile))
    return config.nnodes * config.nproc


def torchrun_command(config: TrainConfig, module: str, module_args: Sequence[str],
                     python: str = sys.executable) -> list[str]:
    """torchrun for this node: standalone on one node, a static rendezvous at node 0 across nodes."""
    argv = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(config.nproc)]
    if config.nnodes == 1:
        argv.append("--standalone")
    else:
        argv += ["--nnodes", str(config.nnodes), "--node-rank", str(config.node_rank),
                 "--master-addr", str(config.master_addr), "--master-port", str(config.master_port)]
    return [*argv, "-m", module, *module_args]


def deepspeed_command(config: TrainConfig, module: str, module_args: Sequence[str],
                      python: str = sys.executable) -> list[str]:
    """The DeepSpeed launcher over --hostfile: every host from here (pdsh/ssh), or this host only (--no-ssh)."""
    if config.hostfile is None:
        raise NevaError("the DeepSpeed launcher needs --hostfile")
    hosts = read_hostfile(config.hostfile)
    argv = [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(config.hostfile),
            "--master_port", str(config.master_port)]
    if config.master_addr is not None:
        argv += ["--master_addr", config.master_addr]
    if not config.ssh:
        if config.node_rank >= len(hosts):
            raise NevaError(f"--node-rank {config.node_rank} is not below the {len(hosts)} hosts of "
                            f"--hostfile {config.hostfile}")
        if config.master_addr is None:
            raise NevaError("--no-ssh needs --master-addr: the address of the hostfile's first host")
        argv += ["--no_ssh", "--node_rank", str(config.node_rank)]
    # The workers read LOCAL_RANK from the environment; no --local_rank argument.
    return [*argv, "--no_local_rank", "--module", module, *module_args]


def launch_command(config: TrainConfig, module: str, module_args: Sequence[str],
                   python: str = sys.executable) -> list[str]:
    """The launcher command line for this config: DeepSpeed's with --hostfile, else torchrun."""
    if config.hostfile is not None:
        return deepspeed_command(config, module, module_args, python)
    return torchrun_command(config, module, module_args, python)


def launch_environment(env: Mapping[str, str], *, cpu: bool) -> dict[str, str]:
    """The launcher's environment: `env` plus unbuffered output (log lines reach Prefect as they come),
    one OpenMP thread per rank unless set, and DeepSpeed's CPU accelerator when there is no GPU."""
    launched = dict(env)
    launched["PYTHONUNBUFFERED"] = "1"
    launched.setdefault("OMP_NUM_THREADS", "1")
    if cpu:
        launched.setdefault("DS_ACCELERATOR", "cpu")
    return launched


def run_launcher(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the launcher in its own process group and wait for it; returns its exit status.

    The group is ours: SIGTERM and SIGINT are passed on to it (the workers then save within their grace),
    and any way out of here (an exception, a KeyboardInterrupt, a cancelled Prefect task) kills the whole
    group, grandchildren included, so no worker outlives the command.
    """
    import os
    import signal
    import subprocess

    process = subprocess.Popen(list(argv), env=dict(env), start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
