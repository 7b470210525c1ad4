"""The DeepSpeed config of a TrainConfig, and one real deepspeed.initialize (CPU, one process) with our mpu."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_support import free_port
from neva_core.train.config import TrainConfig
from neva_core.train.deepspeed_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
BASE = dict(shards="s", llm="l", vision="v", tokenizer="t", out="o", stage="finetune", template="vicuna_v1")


def make_config(**changes) -> TrainConfig:
    values = dict(max_steps=12, micro_batch=2, global_batch=4, lr=1e-2, min_lr=1e-3, warmup_steps=4,
                  dtype="fp32", betas=(0.9, 0.95), weight_decay=0.1, clip_grad=0.5)
    return TrainConfig(**(BASE | values | changes))


def expected_lr(config: TrainConfig, step: int) -> float:
    """The documented schedule: DeepSpeed's iteration (step - 1), linear warmup from 0, then cosine to min_lr."""
    warmup, total, iteration = config.resolved_warmup_steps, config.max_steps, step - 1
    if iteration < 0:
        return 0.0
    if iteration < warmup:
        return config.lr * iteration / warmup
    progress = min(1.0, (iteration - warmup + 1) / (total - warmup))
    return config.min_lr + (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress)) / 2


def test_bf16_config_accumulates_in_fp32_over_the_data_parallel_ranks() -> None:
    config = make_config(dtype="bf16", zero=2, tp=2, micro_batch=4, global_batch=32, nproc=8)
    plan = config.plan(8)
    ds = deepspeed_config(config, plan, torch_adam=False)
    assert (plan.dp, plan.grad_accum) == (4, 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (32, 4, 2)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1, "torch_adam": False}}
    assert ds["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 12, "warmup_num_steps": 4, "warmup_type": "linear", "warmup_min_ratio": 0.0,
        "cos_min_ratio": pytest.approx(0.1)}}
    json.dumps(ds)  # plain JSON


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_fp32_config_for_every_zero_stage(zero: int) -> None:
    ds = deepspeed_config(make_config(zero=zero), make_config(zero=zero).plan(1), torch_adam=True)
    assert ds["zero_optimization"]["stage"] == zero
    assert ds["bf16"] == {"enabled": False} and "data_types" not in ds
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (zero == 3)


def test_warmup_ratio_rounds_up_to_whole_steps() -> None:
    config = make_config(warmup_steps=None, warmup_ratio=0.03, max_steps=1000)
    assert deepspeed_config(config, config.plan(1), torch_adam=True)["scheduler"]["params"]["warmup_num_steps"] == 30


DEEPSPEED_RUN = """
import json, sys
from pathlib import Path
import deepspeed, torch
from neva_core.train import checkpointing as ck
from neva_core.train.config import TrainConfig
from neva_core.train.deepspeed_config import deepspeed_config
from neva_core.train.parallel import init_parallel_groups

config = TrainConfig(**json.loads(sys.argv[1]))
deepspeed.init_distributed(dist_backend="gloo")
mpu = init_parallel_groups(config.tp)
plan = config.plan(1)
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), mpu=mpu,
                                               config=deepspeed_config(config, plan, torch_adam=True))

def train(steps):
    lrs = []
    for _ in steps:
        lrs.append(engine.get_lr()[0])
        for _ in range(plan.grad_accum):
            engine.backward(engine(torch.randn(plan.micro_batch, 4)).pow(2).sum())
            engine.step()
    return lrs

half = config.max_steps // 2
lrs = train(range(half))
comm = ck.TorchCollective()
ckpt = ck.save_checkpoint(config.out, half, lambda d: engine.save_checkpoint(str(d), tag=ck.DEEPSPEED_TAG,
                          save_latest=False), comm, rank_state=ck.capture_rank_state({"batches": half}))
lrs += train(range(half, config.max_steps))
weights = [p.detach().clone() for p in engine.module.parameters()]
found = ck.discover_checkpoint(config.out, comm)
engine.load_checkpoint(str(found.path), tag=ck.DEEPSPEED_TAG)
loader = ck.restore_rank_state(found.rank_state(0))
resumed_lrs = train(range(half, config.max_steps))
groups = engine.optimizer.optimizer.param_groups if hasattr(engine.optimizer, "optimizer") \\
    else engine.optimizer.param_groups
print(json.dumps({"lrs": lrs, "final_lr": engine.get_lr()[0], "train_batch_size": engine.train_batch_size(),
                  "grad_accum": engine.gradient_accumulation_steps(), "clip": engine.gradient_clipping(),
                  "scheduler": type(scheduler).__name__, "optimizer_steps": engine.global_steps,
                  "betas": list(groups[0]["betas"]), "weight_decay": groups[0]["weight_decay"],
                  "dp": engine.dp_world_size, "files": sorted(ckpt.manifest["files"]), "found": found.step,
                  "loader": loader, "resumed_lrs": resumed_lrs, "lrs_after_half": lrs[half:],
                  "bit_identical": all(torch.equal(a, b) for a, b in zip(weights, engine.module.parameters()))}))
"""


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, dict]:
    config = make_config(zero=1, out=tmp_path_factory.mktemp("deepspeed-run"))
    extensions = REPO / ".torch_extensions"  # the shm-comm JIT build is kept here between runs (gitignored)
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": "1",
                        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_RUN, config.model_dump_json()], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return config, json.loads(done.stdout.strip().splitlines()[-1])


def test_deepspeed_takes_the_config_and_the_mpu(deepspeed_run) -> None:
    config, run = deepspeed_run
    assert (run["train_batch_size"], run["grad_accum"], run["dp"]) == (4, 2, 1)
    assert (run["clip"], run["betas"], run["weight_decay"]) == (0.5, [0.9, 0.95], 0.1)
    assert run["scheduler"] == "WarmupCosineLR"


def test_learning_rate_follows_the_documented_schedule(deepspeed_run) -> None:
    config, run = deepspeed_run
    expected = [expected_lr(config, step) for step in range(config.max_steps)]
    assert run["lrs"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert run["lrs"][:2] == [0.0, 0.0] and run["final_lr"] == pytest.approx(config.min_lr)


def test_a_real_deepspeed_save_commits_and_resumes_bit_identically(deepspeed_run) -> None:
    config, run = deepspeed_run
    half = config.max_steps // 2
    assert run["found"] == half and run["loader"] == {"batches": half}
    assert "latest" not in " ".join(run["files"])  # DeepSpeed's pointer is never written, never trusted
    assert "deepspeed/mp_rank_00_model_states.pt" in run["files"] and "ranks/rank-00000.json" in run["files"]
    assert any(name.endswith("optim_states.pt") for name in run["files"])
    assert run["resumed_lrs"] == run["lrs_after_half"]
    assert run["bit_identical"]  # the scheduler, optimizer and torch RNG (the batches) all came back
