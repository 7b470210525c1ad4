"""Benchmark the checkpoint stages at real scale; prints ONE JSON line.

* LLaMA-2-7B shapes (bf16, ~13.5 GB, two shards + index like the real repo, synthetic values written
  tensor by tensor): our `convert` to TP=1, our `repartition` TP1 -> TP4, and a durable plain copy of the
  same files (`dd bs=4M conv=fsync` per file: the disk's limit).
* TinyLlama-1.1B shapes: the method the converter replaces (NeMo's convert_hf_llama_to_nemo.py approach:
  load the whole model with transformers in fp32, build the fused state dict, save it) vs our convert.

Each measured step runs in a fresh subprocess; its peak RSS is the child's ru_maxrss from wait4 (which
counts anonymous memory and every file page mapped into the process). Before each step the files it
reads are dropped from the page cache (posix_fadvise DONTNEED), so every step starts equally cold.

    python bench/convert.py [--workdir DIR] [--keep] [--quick]

Needs ~45 GB free disk under --workdir (default ./bench-out); removes its files unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA2_7B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000)
TINYLLAMA_1B = dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                    intermediate_size=5632, vocab_size=32000)
REAL_REPO_SHARD_BYTES = 10 * 10**9  # meta-llama/Llama-2-7b-hf: 9.98 GB + 3.5 GB safetensors shards
TARGETS = {"peak_rss_7b_mb": 1536, "time_vs_copy": 1.5, "rss_vs_replaced_1b": 0.1}


def hf_config(shapes: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False, **shapes,
    }


def write_synthetic_checkpoint(folder: Path, shapes: dict[str, int]) -> int:
    """An HF LLaMA folder of `shapes` with bf16 values tiled from one random block; returns its bytes."""
    import torch

    from neva_core.checkpoint.hf import hf_tensor_shapes, llm_config_from_hf
    from neva_core.checkpoint.safetensors_stream import TensorSpec
    from neva_core.export import write_hf_weights

    config = hf_config(shapes)
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in hf_tensor_shapes(llm_config_from_hf(config)).items()]
    block = (torch.randn(16 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for spec in specs:
            count = math.prod(spec.shape)
            yield spec.name, block.repeat(math.ceil(count / block.numel()))[:count].reshape(spec.shape)

    folder.mkdir(parents=True)
    files = write_hf_weights(folder, specs, tensors(), REAL_REPO_SHARD_BYTES)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(entry["bytes"] for entry in files.values())


def drop_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(commands: list[list[str]]) -> dict[str, float]:
    """Run the commands one after another; wall seconds in total and the largest peak RSS (MB)."""
    seconds, peak_kb = 0.0, 0
    for command in commands:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        seconds += time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"benchmark step failed: {' '.join(command)}")
        peak_kb = max(peak_kb, usage.ru_maxrss)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1)}


def child(step: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", step, *args]


def run_child(step: str, args: list[str]) -> None:
    """The body of one measured subprocess."""
    if step == "synthetic":
        shapes = LLAMA2_7B if args[1] == "7b" else TINYLLAMA_1B
        write_synthetic_checkpoint(Path(args[0]), dict(shapes, num_hidden_layers=int(args[2])))
    elif step == "convert":
        from neva_core.checkpoint.convert import convert_hf_checkpoint

        convert_hf_checkpoint(Path(args[0]), Path(args[1]), tp=int(args[2]))
    elif step == "repartition":
        from neva_core.checkpoint.repartition import repartition

        repartition(Path(args[0]), Path(args[1]), int(args[2]))
    elif step == "replaced":
        full_load_convert(Path(args[0]), Path(args[1]))


def full_load_convert(hf_dir: Path, out_dir: Path) -> None:
    """NeMo's approach: the whole model in fp32 via transformers, then a second, fused state dict, saved."""
    import torch
    from transformers import AutoModelForCausalLM

    from neva_core.checkpoint.hf import llm_config_from_hf, tensor_recipe, to_native
    from neva_core.checkpoint.partition import tensor_names

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = model.state_dict()
    config = llm_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    fused = {}
    for name in tensor_names(config):
        parts = [state[hf_name] for hf_name in tensor_recipe(name, config.family).hf_names]
        fused[name] = to_native(name, parts, config).to(torch.bfloat16)
    out_dir.mkdir(parents=True)
    torch.save(fused, out_dir / "model_weights.ckpt")


def make_source(folder: Path, model: str, layers: int) -> float:
    """Write the synthetic checkpoint in a child process (the parent never imports torch: a forked child's
    ru_maxrss starts at its parent's RSS). Returns its size in GB."""
    measure([child("synthetic", str(folder), model, str(layers))])
    drop_page_cache(folder)
    return round(sum(p.stat().st_size for p in folder.iterdir()) / 1e9, 2)


def bench_7b(work: Path, layers: int, keep: bool) -> dict[str, Any]:
    source = work / "7b-hf"
    size_gb = make_source(source, "7b", layers)
    (work / "7b-copy").mkdir()
    copy = measure([["dd", f"if={f}", f"of={work / '7b-copy' / f.name}", "bs=4M", "conv=fsync", "status=none"]
                    for f in sorted(source.iterdir())])
    shutil.rmtree(work / "7b-copy")
    drop_page_cache(source)
    convert = measure([child("convert", str(source), str(work / "7b-tp1"), "1")])
    drop_page_cache(work / "7b-tp1")
    repartition = measure([child("repartition", str(work / "7b-tp1"), str(work / "7b-tp4"), "4")])
    if not keep:
        for name in ("7b-hf", "7b-tp1", "7b-tp4"):
            shutil.rmtree(work / name)
    return {
        "checkpoint_gb": size_gb,
        "copy_dd_fsync": copy,
        "convert_tp1": convert,
        "repartition_tp1_to_tp4": repartition,
        "convert_vs_copy": round(convert["seconds"] / copy["seconds"], 2),
        "repartition_vs_copy": round(repartition["seconds"] / copy["seconds"], 2),
    }


def bench_1b(work: Path, keep: bool) -> dict[str, Any]:
    source = work / "1b-hf"
    make_source(source, "1b", TINYLLAMA_1B["num_hidden_layers"])
    replaced = measure([child("replaced", str(source), str(work / "1b-replaced"))])
    drop_page_cache(source)
    ours = measure([child("convert", str(source), str(work / "1b-tp1"), "1")])
    if not keep:
        for name in ("1b-hf", "1b-replaced", "1b-tp1"):
            shutil.rmtree(work / name)
    return {
        "replaced_full_fp32_load": replaced,
        "convert_tp1": ours,
        "rss_ratio": round(ours["peak_rss_mb"] / replaced["peak_rss_mb"], 3),
        "time_ratio": round(ours["seconds"] / replaced["seconds"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-out", help="scratch folder (~45 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--quick", action="store_true", help="4 layers of 7B shapes instead of 32 (a smoke run)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1:])
        return
    work = args.workdir / f"convert-{os.getpid()}"
    work.mkdir(parents=True)
    layers = 4 if args.quick else LLAMA2_7B["num_hidden_layers"]
    try:
        result_7b = bench_7b(work, layers, args.keep)
        result_1b = bench_1b(work, args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    met = {
        "peak_rss_7b": max(result_7b["convert_tp1"]["peak_rss_mb"],
                           result_7b["repartition_tp1_to_tp4"]["peak_rss_mb"]) <= TARGETS["peak_rss_7b_mb"],
        "time_vs_copy": max(result_7b["convert_vs_copy"], result_7b["repartition_vs_copy"]) <= TARGETS["time_vs_copy"],
        "rss_vs_replaced_1b": result_1b["rss_ratio"] <= TARGETS["rss_vs_replaced_1b"],
    }
    print(json.dumps({"bench": "convert", "llama2_7b_layers": layers, "7b": result_7b, "1.1b": result_1b,
                      "targets": TARGETS, "met": met}))


if __name__ == "__main__":
    main()
