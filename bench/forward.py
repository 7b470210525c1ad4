"""Benchmark one pretrain-stage training step (forward + backward, projector trainable) of our NevaModel
against transformers' LlavaForConditionalGeneration with the same weights and batch; prints ONE JSON line.

The parent writes one random LLaVA model (safetensors) and each implementation runs in a fresh
subprocess that loads it (ours through `model_from_llava_state`), so neither sees the other's memory.
Memory: on CPU, the process's peak RSS is reset (/proc/self/clear_refs) after the model is built, and the
step's peak is VmHWM minus the RSS at that point; on CUDA, torch's peak allocated bytes over the step.

    python bench/forward.py [--size small|7b] [--device cpu|cuda] [--dtype fp32|bf16] [--batch N] [--repeats N]

`small` (default, CPU-sized): CLIP-like 224 px / patch 14 (256 image tokens), 4 layers of 256, and a
LLaMA-style LLM of 4 layers of 512 with a 32000 vocabulary. `7b`: CLIP ViT-L/14-336 + LLaMA-2-7B shapes
(576 image tokens), for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "vision": dict(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4),
        "text": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048),
        "text_tokens": 128,
    },
    "7b": {
        "vision": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, hidden_act="quick_gelu"),
        "text": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        "text_tokens": 256,
    },
}
IMAGE_TOKEN = 31999


def write_model(folder: Path, size: str, dtype: str, llm_layers: int | None = None) -> None:
    """A random LLaVA model of `size` (llm_layers: fewer decoder layers, where a device's memory needs it)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    shapes = SIZES[size]
    vision = CLIPVisionConfig(**shapes["vision"])
    tokens = (vision.image_size // vision.patch_size) ** 2
    text = dict(shapes["text"], **({} if llm_layers is None else {"num_hidden_layers": llm_layers}))
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_id=IMAGE_TOKEN,
                         image_seq_length=tokens, vision_feature_layer=-2, projector_hidden_act="gelu")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.save_pretrained(folder, safe_serialization=True)


def make_batch(config: dict[str, Any], size: str, batch: int, device: str) -> dict[str, Any]:
    import torch

    vision = config["vision_config"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    generator = torch.Generator().manual_seed(1)
    length = 1 + tokens + SIZES[size]["text_tokens"]
    input_ids = torch.randint(3, IMAGE_TOKEN, (batch, length), generator=generator)
    input_ids[:, 1:1 + tokens] = IMAGE_TOKEN
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN, -100)
    labels[:, 0] = -100
    images = torch.randn(batch, 3, vision["image_size"], vision["image_size"], generator=generator)
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "images": images.to(device),
            "attention_mask": torch.ones_like(input_ids, dtype=torch.bool)}  # no padding; kept on the host


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = Path(args.model)
    config = json.loads((folder / "config.json").read_text())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    step = _ours_step(folder, config, args, dtype) if args.impl == "ours" else _hf_step(folder, args, dtype)
    batch = make_batch(config, args.size, args.batch, args.device)
    step(batch)  # warm-up (allocator, kernels)
    _sync(args.device)
    baseline = _reset_peak(args.device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        step(batch)
    _sync(args.device)
    seconds = (time.perf_counter() - start) / args.repeats
    peak = _peak(args.device)
    return {"step_s": round(seconds, 4), "step_peak_mb": round((peak - baseline) / 2**20, 1),
            "peak_mb": round(peak / 2**20, 1)}


def _ours_step(folder: Path, config: dict[str, Any], args: argparse.Namespace, dtype: Any):
    from neva_core.llava import model_from_llava_state
    from neva_core.model.neva import Stage
    from neva_core.model.vision import read_state_dict

    model = model_from_llava_state(read_state_dict(folder, "LLaVA"), config, template="plain")
    model = model.to(device=args.device, dtype=dtype)
    model.set_stage(Stage.PRETRAIN)
    model.llm.activation_checkpointing = args.checkpointing

    def step(batch: dict[str, Any]) -> None:
        loss_sum, tokens = model.loss_terms(batch["input_ids"], batch["images"].to(dtype), batch["labels"])
        (loss_sum / tokens).backward()
        model.zero_grad(set_to_none=True)

    return step


def _hf_step(folder: Path, args: argparse.Namespace, dtype: Any):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(args.device)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_("multi_modal_projector" in name)
    if args.checkpointing:
        model.gradient_checkpointing_enable()

    def step(batch: dict[str, Any]) -> None:
        out = model(input_ids=batch["input_ids"], pixel_values=batch["images"].to(dtype), labels=batch["labels"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status_kb("VmRSS") * 1024


def _peak(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run_child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="neva-bench-forward-") as workdir:
        folder = Path(workdir) / "llava"
        write_model(folder, args.size, args.dtype)
        results = {impl: _spawn(impl, folder, args) for impl in ("ours", "hf")}
    print(json.dumps({
        "bench": "forward_backward_pretrain", "size": args.size, "device": args.device, "dtype": args.dtype,
        "batch": args.batch, "checkpointing": args.checkpointing, **results,
        "time_ratio": round(results["ours"]["step_s"] / results["hf"]["step_s"], 3),
        "step_memory_ratio": round(results["ours"]["step_peak_mb"] / max(results["hf"]["step_peak_mb"], 1e-9), 3),
    }))


def _spawn(impl: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--impl", impl, "--model", str(folder), "--size", args.size,
               "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.checkpointing:
        command.append("--checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{impl} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
