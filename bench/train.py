"""Benchmark a training step under deepspeed.initialize: our NevaModel (as `neva train` wraps and calls it)
against transformers' LlavaForConditionalGeneration, same weights, batch, ZeRO stage and optimizer; ONE JSON line.

Each side runs in fresh single-process DeepSpeed runs of two lengths (--steps N and 2N optimizer steps); the
per-step time is the difference of their wall times over N, so process start, imports, model load and
DeepSpeed's set-up cancel out. The runs are interleaved (ours and the baseline alternate, short runs then long
ones, the order flipped every repeat) and repeated --repeats times, so a load change on a shared machine hits
both sides alike; the JSON gives the median and the range of each side's step time, the ratio of the medians,
the load average seen, and two cross-checks: the children's CPU seconds per step (from the same two run
lengths: less sensitive than wall time to other processes sharing the cores) and each child's own clock over
the steps the difference measures (the long run's last N).

Both sides get the DeepSpeed JSON `deepspeed_config` builds from one TrainConfig (AdamW, WarmupCosineLR,
clipping, ZeRO stage, gradient accumulation), the same pre-built tensors (input ids, labels, an all-true
attention mask, pixel values: no loader or JPEG decoding on either side), and train what the stage trains:
the projector (pretrain) or the projector and the LLM (finetune); the vision tower is frozen on both.
Ours gets the mask the training loop gives it (`loop.model_mask`), the baseline the batch's mask.

    python bench/train.py [--size small|7b] [--device cpu|cuda] [--dtype fp32|bf16] [--zero 0|1|2]
                          [--stage pretrain|finetune] [--llm-layers L] [--micro-batch B] [--grad-accum A]
                          [--steps N] [--repeats R] [--optimizer deepspeed|torch]

`--optimizer torch` (for a machine where DeepSpeed does not install) steps both sides with plain
torch.optim.AdamW and clip_grad_norm_ instead, on the parameters in their own dtype. MFU (with --device
cuda) uses the training loop's estimate, `neva_core.train.metrics.step_flops`, stated in the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import statistics
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

FLOP_COUNT = ("neva_core.train.metrics.step_flops: per sample, 2 FLOPs per LLM parameter (embedding and output "
              "layer included) and token forward, 2 more backward for the activation gradients, 2 more for weight "
              "gradients when the LLM trains; 2 per vision parameter and image token (forward only); 6 per "
              "projector parameter and image token; attention's sequence-quadratic term left out. The same count "
              "for both sides (the work the model defines, not the work each implementation does).")


def train_config(args: argparse.Namespace, steps: int) -> Any:
    from neva_core.train.config import TrainConfig

    return TrainConfig(shards="unused", llm="unused", vision="unused", tokenizer="unused", out="unused",
                       stage=args.stage, template="plain", max_steps=max(steps, 3), micro_batch=args.micro_batch,
                       global_batch=args.micro_batch * args.grad_accum, lr=1e-3, warmup_steps=2, seed=0,
                       dtype=args.dtype, zero=args.zero)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from neva_core.train.deepspeed_config import deepspeed_config

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    config = train_config(args, args.steps)
    plan = config.plan(1)
    folder = Path(args.model)
    model_config = json.loads((folder / "config.json").read_text())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    module, trainable, loss_of, settings = (_ours if args.impl == "ours" else _hf)(folder, model_config, dtype, args)
    module = module.to(args.device)
    # torch's AdamW inside DeepSpeed on every device: FusedAdam's JIT build may not work (or fit the time) there.
    ds_config = deepspeed_config(config, plan, torch_adam=True)
    if args.optimizer == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable, config=ds_config)
        settings["deepspeed_config_sha256"] = hashlib.sha256(json.dumps(ds_config, sort_keys=True).encode()).hexdigest()
        settings["deepspeed_zero_stage"] = engine.zero_optimization_stage()
    else:
        engine = _TorchOptimizerEngine(module, trainable, config)
    settings["optimizer"] = type(engine.optimizer).__name__
    batch = make_batch(model_config, args.size, args.micro_batch, args.device)
    batch["images"] = batch["images"].to(dtype)
    step_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(plan.grad_accum):
            engine.backward(loss_of(engine, batch))
            engine.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
    result = {"optimizer_steps": engine.global_steps, "step_times_s": [round(t, 4) for t in step_times],
              "settings": settings}
    if args.impl == "ours":
        result["flops_per_step"] = _step_flops(module.neva, args, batch)
    return result


class _TorchOptimizerEngine:
    """The calls the benchmark makes of a DeepSpeed engine, done with plain torch AdamW and gradient clipping."""

    def __init__(self, module: Any, trainable: list[Any], config: Any) -> None:
        import torch

        self.module, self.trainable, self.clip = module, trainable, config.clip_grad
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=tuple(config.betas), eps=1e-8,
                                           weight_decay=config.weight_decay)
        self.global_steps = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: Any) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1


def _ours(folder: Path, config: dict[str, Any], dtype: Any, args: argparse.Namespace):
    from neva_core.llava import model_from_llava_state
    from neva_core.model.neva import Stage
    from neva_core.model.vision import read_state_dict
    from neva_core.train.loop import model_mask
    from neva_core.train.setup import TrainingModule

    stage = Stage(args.stage)
    model = model_from_llava_state(read_state_dict(folder, "LLaVA"), config, template="plain").to(dtype)
    model.set_stage(stage)
    trainable = model.trainable_parameters(stage)

    def loss_of(engine: Any, batch: dict[str, Any]) -> Any:
        loss_sum, tokens = engine(batch["input_ids"], batch["images"], batch["labels"],
                                  model_mask(batch["attention_mask"], batch["input_ids"].device))
        return loss_sum / tokens

    settings = {"model": "neva_core NevaModel in train.setup.TrainingModule (as neva train runs it)",
                "attention": "F.scaled_dot_product_attention, is_causal (the loop's model_mask drops an "
                             "all-real or right-padded mask)",
                "loss": "output layer and fused cross entropy only at supervised positions (sum / count)",
                "activation_checkpointing": model.llm.activation_checkpointing,
                **_parameter_counts(model, trainable)}
    return TrainingModule(model), trainable, loss_of, settings


def _hf(folder: Path, config: dict[str, Any], dtype: Any, args: argparse.Namespace):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    model.train()
    for name, param in model.named_parameters():
        trained = "multi_modal_projector" in name or (args.stage == "finetune" and "vision_tower" not in name)
        param.requires_grad_(trained)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_of(engine: Any, batch: dict[str, Any]) -> Any:
        return engine(input_ids=batch["input_ids"], pixel_values=batch["images"], labels=batch["labels"],
                      attention_mask=batch["attention_mask"].to(batch["input_ids"].device)).loss

    settings = {"model": "transformers LlavaForConditionalGeneration",
                "attention": model.config._attn_implementation,
                "loss": "logits at every position, ForCausalLMLoss (mean over supervised tokens)",
                "activation_checkpointing": model.is_gradient_checkpointing,
                **_parameter_counts(model, trainable)}
    return model, trainable, loss_of, settings


def _parameter_counts(model: Any, trainable: list[Any]) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in trainable)
    return {"trainable_parameters": count, "frozen_parameters": total - count}


def _step_flops(neva: Any, args: argparse.Namespace, batch: dict[str, Any]) -> float:
    from neva_core.train.metrics import step_flops

    samples = args.micro_batch * args.grad_accum
    per_sample = step_flops(sum(p.numel() for p in neva.llm.parameters()), args.stage == "finetune",
                            sum(p.numel() for p in neva.vision.parameters()),
                            sum(p.numel() for p in neva.projector.parameters()),
                            tokens=batch["input_ids"].shape[1], images=1, image_tokens=neva.image_tokens)
    return per_sample * samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_run(impl: str, steps: int, folder: Path, args: argparse.Namespace) -> tuple[float, float, dict[str, Any]]:
    """(wall seconds, CPU seconds of the child, the child's JSON) of one run."""
    command = [sys.executable, __file__, "--impl", impl, "--model", str(folder), "--size", args.size,
               "--device", args.device, "--dtype", args.dtype, "--zero", str(args.zero), "--stage", args.stage,
               "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--steps", str(steps),
               "--threads", str(args.threads), "--optimizer", args.optimizer]
    env = os.environ | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{impl} run of {steps} steps failed:\n{done.stderr[-4000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "each": [round(v, 4) for v in values]}


def _summary(runs: list[dict[str, Any]], args: argparse.Namespace, samples_per_step: int) -> dict[str, Any]:
    """One side's step times over the repeats: wall and CPU time from the two run lengths, and the child's own
    clock over the same steps (the long run's last N), which no start-up noise reaches."""
    step_s = [(run["long"][0] - run["short"][0]) / args.steps for run in runs]
    cpu_step_s = [(run["long"][1] - run["short"][1]) / args.steps for run in runs]
    in_process = [statistics.fmean(run["long"][2]["step_times_s"][args.steps:]) for run in runs]
    median = statistics.median(step_s)
    return {"run_s": [[round(run["short"][0], 2), round(run["long"][0], 2)] for run in runs],
            "step_s": _spread(step_s), "samples_per_s": round(samples_per_step / median, 3),
            "cpu_s_per_step": _spread(cpu_step_s), "in_process_step_s": _spread(in_process),
            "settings": runs[0]["long"][2]["settings"]}


def measure(folder: Path, args: argparse.Namespace) -> tuple[dict[str, list], list[float]]:
    """Every repeat runs both sides' short runs, then both long ones, the side that goes first alternating."""
    runs: dict[str, list] = {"ours": [], "hf": []}
    load: list[float] = [os.getloadavg()[0]]
    for repeat in range(args.repeats):
        order = ("ours", "hf") if repeat % 2 == 0 else ("hf", "ours")
        timed: dict[str, dict[str, Any]] = {impl: {} for impl in order}
        for length, steps in (("short", args.steps), ("long", 2 * args.steps)):
            for impl in order:
                timed[impl][length] = _timed_run(impl, steps, folder, args)
                load.append(os.getloadavg()[0])
        for impl in order:
            runs[impl].append(timed[impl])
    return runs, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2], default=1)
    parser.add_argument("--stage", choices=["pretrain", "finetune"], default="pretrain")
    parser.add_argument("--llm-layers", type=int, help="fewer LLM decoder layers than --size has (memory, time)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="the short run's optimizer steps (the long one: 2N)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of both sides' run pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=["deepspeed", "torch"], default="deepspeed")
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run_child(args)))
        return
    if args.dtype == "bf16" and args.zero == 0 and args.optimizer == "deepspeed":
        parser.error("--dtype bf16 needs --zero 1 or 2 (fp32 gradient accumulation)")
    samples_per_step = args.micro_batch * args.grad_accum
    with tempfile.TemporaryDirectory(prefix="neva-bench-train-") as workdir:
        folder = Path(workdir) / "llava"
        write_model(folder, args.size, args.dtype, args.llm_layers)
        config = json.loads((folder / "config.json").read_text())
        runs, load = measure(folder, args)
    ours, hf = (_summary(runs[impl], args, samples_per_step) for impl in ("ours", "hf"))
    paired = [h / o for h, o in zip(hf["step_s"]["each"], ours["step_s"]["each"])]
    result = {
        "bench": f"train_step_{args.stage}", "size": args.size, "device": args.device, "dtype": args.dtype,
        "zero": args.zero, "llm_layers": config["text_config"]["num_hidden_layers"],
        "sequence_length": 1 + (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
        + SIZES[args.size]["text_tokens"],
        "optimizer": "DeepSpeed AdamW (torch_adam), WarmupCosineLR, clip 1.0" if args.optimizer == "deepspeed"
        else "plain torch AdamW + clip_grad_norm_ 1.0 (no DeepSpeed)",
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "steps": [args.steps, 2 * args.steps],
        "repeats": args.repeats, "threads": args.threads, "batch": "identical pre-built tensors on both sides",
        "same_deepspeed_config": None if args.optimizer == "torch"
        else ours["settings"]["deepspeed_config_sha256"] == hf["settings"]["deepspeed_config_sha256"],
        "ours": ours, "hf": hf,
        "speedup": round(hf["step_s"]["median"] / ours["step_s"]["median"], 3),
        "speedup_paired": _spread(paired),
        "speedup_in_process": round(hf["in_process_step_s"]["median"] / ours["in_process_step_s"]["median"], 3),
        "speedup_cpu_time": round(hf["cpu_s_per_step"]["median"] / ours["cpu_s_per_step"]["median"], 3),
        "load_average_1min": _spread(load), "cpus": os.cpu_count(),
    }
    if args.device == "cuda":
        result.update(_gpu_figures(runs["ours"][0]["long"][2]["flops_per_step"], ours, hf))
    print(json.dumps(result))


def _gpu_figures(flops_per_step: float, ours: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    import torch

    from neva_core.train.metrics import peak_flops

    peak = peak_flops()
    figures: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "gpus": 1, "flops_per_step": flops_per_step,
                               "flop_count": FLOP_COUNT, "peak_flops": peak}
    for name, side in (("ours", ours), ("hf", hf)):
        achieved = flops_per_step / side["step_s"]["median"]
        figures[f"{name}_samples_per_s_per_gpu"] = side["samples_per_s"]
        figures[f"{name}_mfu"] = None if peak is None else round(achieved / peak, 4)
    return figures


if __name__ == "__main__":
    main()
