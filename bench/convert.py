"""Benchmark the checkpoint stages at real scale; prints ONE JSON line.

* `neva convert` (HF -> native, TP=1) against a durable plain copy of the same files (`dd bs=4M conv=fsync`
  per file: the disk's limit), both with the input WARM in the page cache and COLD (dropped with
  posix_fadvise DONTNEED). The machine is shared, so the two are measured in the same run, interleaved
  (the order alternating), `--repeats` times; the figures are medians and their ratio.
* The default model is TinyLlama-1.1B's shapes (bf16, 2.2 GB), which `make bench` runs in a few minutes;
  it also runs the method the converter replaces (NeMo's convert_hf_llama_to_nemo.py approach: load the
  whole model with transformers in fp32, build the fused state dict, save it) once, for memory.
* `--model 7b`: LLaMA-2-7B shapes (13.5 GB, two shards + index like the real repo; ~45 GB free disk),
  plus our `repartition` TP1 -> TP4 (cold) against the copy.
* The hash rate of sha256 and blake3 on this machine (the manifests' hash, see neva_core.io.OUTPUT_HASH).

Each measured step runs in a fresh subprocess (python and torch start-up included, as a user pays them);
its peak RSS is the child's ru_maxrss from wait4 (which counts anonymous memory and every file page mapped
into the process). Synthetic values are written tensor by tensor.

    python bench/convert.py [--model 1b|7b] [--repeats N] [--workdir DIR] [--keep] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
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

    from neva_core.checkpoint.export import write_hf_weights
    from neva_core.checkpoint.hf import hf_tensor_shapes, llm_config_from_hf
    from neva_core.checkpoint.safetensors_stream import TensorSpec

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
    from neva_core.model.partition import tensor_names

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


def warm_page_cache(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(8 << 20):
                    pass


def prepare(folder: Path, cache: str) -> None:
    warm_page_cache(folder) if cache == "warm" else drop_page_cache(folder)


def durable_copy(source: Path, dest: Path) -> dict[str, float]:
    dest.mkdir()
    result = measure([["dd", f"if={f}", f"of={dest / f.name}", "bs=4M", "conv=fsync", "status=none"]
                      for f in sorted(source.iterdir())])
    shutil.rmtree(dest)
    return result


def timed_convert(source: Path, dest: Path) -> dict[str, float]:
    result = measure([child("convert", str(source), str(dest), "1")])
    shutil.rmtree(dest)
    return result


def convert_against_copy(source: Path, work: Path, cache: str, repeats: int) -> dict[str, Any]:
    """Interleaved runs of the durable copy and our convert, each from the same page-cache state."""
    copies, converts = [], []
    for repeat in range(repeats):
        steps = [(copies, durable_copy, work / "copy"), (converts, timed_convert, work / "native")]
        for results, step, dest in steps if repeat % 2 == 0 else steps[::-1]:
            prepare(source, cache)
            results.append(step(source, dest))
    copy_s = statistics.median(r["seconds"] for r in copies)
    convert_s = statistics.median(r["seconds"] for r in converts)
    return {
        "copy_dd_fsync_s": [r["seconds"] for r in copies],
        "convert_s": [r["seconds"] for r in converts],
        "median_copy_s": copy_s,
        "median_convert_s": convert_s,
        "convert_vs_copy": round(convert_s / copy_s, 2),
        "convert_vs_copy_per_pair": [round(c["seconds"] / d["seconds"], 2) for c, d in zip(converts, copies)],
        "convert_peak_rss_mb": max(r["peak_rss_mb"] for r in converts),
    }


def hash_rates(megabytes: int = 256) -> dict[str, float]:
    """GB/s of each manifest hash over one buffer (best of 3), on this machine as it is loaded now."""
    import hashlib

    import blake3

    data = os.urandom(megabytes << 20)
    hashers = {"sha256": hashlib.sha256, "blake3": lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)}
    rates = {}
    for name, new in hashers.items():
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            new().update(data)
            best = min(best, time.perf_counter() - start)
        rates[name] = round(len(data) / best / 1e9, 2)
    return rates


def bench_1b(work: Path, repeats: int) -> dict[str, Any]:
    source = work / "1b-hf"
    size_gb = make_source(source, "1b", TINYLLAMA_1B["num_hidden_layers"])
    result: dict[str, Any] = {"checkpoint_gb": size_gb}
    for cache in ("warm", "cold"):
        result[cache] = convert_against_copy(source, work, cache, repeats)
    drop_page_cache(source)
    replaced = measure([child("replaced", str(source), str(work / "1b-replaced"))])
    shutil.rmtree(work / "1b-replaced")
    result["replaced_full_fp32_load"] = replaced
    result["rss_vs_replaced"] = round(result["cold"]["convert_peak_rss_mb"] / replaced["peak_rss_mb"], 3)
    return result


def bench_7b(work: Path, layers: int, repeats: int) -> dict[str, Any]:
    source = work / "7b-hf"
    size_gb = make_source(source, "7b", layers)
    result: dict[str, Any] = {"checkpoint_gb": size_gb, "layers": layers}
    for cache in ("warm", "cold"):
        result[cache] = convert_against_copy(source, work, cache, repeats)
    drop_page_cache(source)
    measure([child("convert", str(source), str(work / "7b-tp1"), "1")])
    drop_page_cache(work / "7b-tp1")
    repartition = measure([child("repartition", str(work / "7b-tp1"), str(work / "7b-tp4"), "4")])
    result["repartition_tp1_to_tp4"] = repartition
    result["repartition_vs_copy"] = round(repartition["seconds"] / result["cold"]["median_copy_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("1b", "7b"), default="1b", help="checkpoint shapes (default 1b)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per cache state (median)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-out", help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--quick", action="store_true", help="with --model 7b: 4 layers instead of 32")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1:])
        return
    work = args.workdir / f"convert-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        if args.model == "1b":
            result = bench_1b(work, args.repeats)
        else:
            result = bench_7b(work, 4 if args.quick else LLAMA2_7B["num_hidden_layers"], args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    met = {
        "warm_vs_copy": result["warm"]["convert_vs_copy"] <= TARGETS["time_vs_copy"],
        "cold_vs_copy": result["cold"]["convert_vs_copy"] <= TARGETS["time_vs_copy"],
    }
    if args.model == "1b":
        met["rss_vs_replaced_1b"] = result["rss_vs_replaced"] <= TARGETS["rss_vs_replaced_1b"]
    else:
        met["peak_rss_7b"] = max(result["cold"]["convert_peak_rss_mb"],
                                 result["repartition_tp1_to_tp4"]["peak_rss_mb"]) <= TARGETS["peak_rss_7b_mb"]
        met["repartition_vs_copy"] = result["repartition_vs_copy"] <= TARGETS["time_vs_copy"]
    print(json.dumps({"bench": "convert", "model": args.model, "repeats": args.repeats, "result": result,
                      "hash_gb_per_s": hash_rates(), "targets": TARGETS, "met": met}))


if __name__ == "__main__":
    main()
