"""Benchmark a pretrain-stage optimizer step under deepspeed.initialize: our NevaModel (as `neva train` wraps it)
against transformers' LlavaForConditionalGeneration, same weights, batch, ZeRO stage and optimizer; ONE JSON line.

Each side runs in fresh single-process DeepSpeed runs of two lengths (--steps N and 2N optimizer steps); the
per-step time is the difference of their wall times over N, so process start, imports, model load and
DeepSpeed's set-up cancel out. Both sides get the DeepSpeed JSON `deepspeed_config` builds from one TrainConfig
(AdamW, WarmupCosineLR, clipping, ZeRO stage, gradient accumulation) and train the projector only.

    python bench/train.py [--size small|7b] [--device cpu|cuda] [--dtype fp32|bf16] [--zero 0|1|2]
                          [--micro-batch B] [--grad-accum A] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from forward import SIZES, make_batch, write_model  # noqa: E402


def train_config(args: argparse.Namespace, steps: int) -> Any:
    from neva_core.train.config import TrainConfig

    return TrainConfig(shards="unused", llm="unused", vision="unused", tokenizer="unused", out="unused",
                       stage="pretrain", template="plain", max_steps=max(steps, 3), micro_batch=args.micro_batch,
                       global_batch=args.micro_batch * args.grad_accum, lr=1e-3, warmup_steps=2, seed=0,
                       dtype=args.dtype, zero=args.zero)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import deepspeed
    import torch

    from neva_core.train.deepspeed_config import deepspeed_config

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    config = train_config(args, args.steps)
    plan = config.plan(1)
    folder = Path(args.model)
    model_config = json.loads((folder / "config.json").read_text())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    module, trainable, step = (_ours if args.impl == "ours" else _hf)(folder, model_config, dtype)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable,
                                           config=deepspeed_config(config, plan, torch_adam=args.device == "cpu"))
    batch = make_batch(model_config, args.size, args.micro_batch, str(engine.device))
    batch["images"] = batch["images"].to(dtype)
    for _ in range(args.steps * plan.grad_accum):
        engine.backward(step(engine, batch))
        engine.step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"optimizer_steps": engine.global_steps}


def _ours(folder: Path, config: dict[str, Any], dtype: Any):
    from neva_core.llava import model_from_llava_state
    from neva_core.model.neva import Stage
    from neva_core.model.vision import read_state_dict
    from neva_core.train.setup import TrainingModule

    model = model_from_llava_state(read_state_dict(folder, "LLaVA"), config, template="plain").to(dtype)
    model.set_stage(Stage.PRETRAIN)

    def step(engine: Any, batch: dict[str, Any]) -> Any:
        loss_sum, tokens = engine(batch["input_ids"], batch["images"], batch["labels"], None)
        return loss_sum / tokens

    return TrainingModule(model), model.trainable_parameters(Stage.PRETRAIN), step


def _hf(folder: Path, config: dict[str, Any], dtype: Any):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_("multi_modal_projector" in name)

    def step(engine: Any, batch: dict[str, Any]) -> Any:
        return engine(input_ids=batch["input_ids"], pixel_values=batch["images"], labels=batch["labels"]).loss

    return model, [p for p in model.parameters() if p.requires_grad], step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_run(impl: str, steps: int, folder: Path, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--impl", impl, "--model", str(folder), "--size", args.size,
               "--device", args.device, "--dtype", args.dtype, "--zero", str(args.zero),
               "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--steps", str(steps)]
    env = os.environ | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{impl} run of {steps} steps failed:\n{done.stderr[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2], default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="the short run's optimizer steps (the long one: 2N)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run_child(args)))
        return
    if args.dtype == "bf16" and args.zero == 0:
        parser.error("--dtype bf16 needs --zero 1 or 2 (fp32 gradient accumulation)")
    samples_per_step = args.micro_batch * args.grad_accum
    with tempfile.TemporaryDirectory(prefix="neva-bench-train-") as workdir:
        folder = Path(workdir) / "llava"
        write_model(folder, args.size, args.dtype)
        results = {}
        for impl in ("ours", "hf"):
            short, long = (_timed_run(impl, steps, folder, args) for steps in (args.steps, 2 * args.steps))
            step_s = (long - short) / args.steps
            results[impl] = {"run_s": [round(short, 2), round(long, 2)], "step_s": round(step_s, 4),
                             "samples_per_s": round(samples_per_step / step_s, 3)}
    print(json.dumps({
        "bench": "train_step_pretrain", "size": args.size, "device": args.device, "dtype": args.dtype,
        "zero": args.zero, "optimizer": "AdamW (torch_adam on CPU), WarmupCosineLR, clip 1.0",
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "steps": [args.steps, 2 * args.steps],
        **results, "speedup": round(results["ours"]["samples_per_s"] / results["hf"]["samples_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
