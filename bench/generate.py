"""Benchmark batched greedy generation on CPU; prints ONE JSON line.

A random LLaMA (GQA) is saved as a Hugging Face folder, converted with `neva convert` and loaded with
`NevaLLM.from_rank_file`. The same left-padded prompt batch is decoded three ways:

* `neva_core.generate.greedy_generate` (our KV cache),
* transformers' `generate(do_sample=False)` on the HF folder (its own KV cache),
* our model without a cache, recomputing the whole sequence for every new token (what the cache saves).

All three must produce the same tokens. Reported: new tokens per second of each (the best of --repeats
rounds in which ours and transformers take turns; the recompute runs once) and the ratios.

    python bench/generate.py [--layers 4] [--hidden 512] [--batch 4] [--prompt 64] [--new 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from neva_core.checkpoint.convert import convert_hf_checkpoint  # noqa: E402
from neva_core.fixtures import write_tiny_llama  # noqa: E402
from neva_core.generate import greedy_generate  # noqa: E402
from neva_core.model.llm import NevaLLM, gather_logits  # noqa: E402

VOCAB = 32000
T = TypeVar("T")


def prompts(batch: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts, lengths spread from half the longest to the longest."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.bool)
    for row in range(batch):
        length = longest // 2 + (longest // 2) * row // max(batch - 1, 1)
        ids[row, longest - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, longest - length :] = True
    return ids, mask


@torch.no_grad()
def generate_without_cache(llm: NevaLLM, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[list[int]]:
    for _ in range(new):
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = gather_logits(llm(ids, position_ids=positions, attention_mask=mask)[:, -1], llm.tp_group)
        token = logits[:, : llm.config.vocab_size].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token, dtype=torch.bool)], dim=1)
    return ids[:, -new:].tolist()


def best_times(methods: dict[str, Callable[[], T]], repeats: int) -> tuple[dict[str, T], dict[str, float]]:
    """Each method's result and its best wall time over `repeats` rounds. The methods take turns within a
    round, so a busy spell on a shared machine slows all of them, not one."""
    results: dict[str, T] = {}
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            results[name] = method()
            best[name] = min(best[name], time.perf_counter() - start)
    return results, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64, help="longest prompt in tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of ours and transformers in turn; the fastest of each counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_tiny_llama(
            Path(tmp) / "hf", VOCAB, seed=0, num_hidden_layers=args.layers, hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4, num_attention_heads=8, num_key_value_heads=2,
            initializer_range=0.1,
        )
        convert_hf_checkpoint(hf_dir, Path(tmp) / "native")
        ours = NevaLLM.from_rank_file(Path(tmp) / "native").eval()
        theirs = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    theirs.generation_config.eos_token_id = None  # every row decodes --new tokens, as ours does without eos_id
    ids, mask = prompts(args.batch, args.prompt)
    with torch.no_grad():
        results, seconds = best_times({
            "neva_kv_cache": lambda: greedy_generate(ours, ids, attention_mask=mask, max_new_tokens=args.new),
            "transformers": lambda: theirs.generate(ids, attention_mask=mask.long(), max_new_tokens=args.new,
                                                    do_sample=False, pad_token_id=0)[:, ids.shape[1] :].tolist(),
        }, args.repeats)
        uncached, no_cache_s = best_times({"neva_no_cache": lambda: generate_without_cache(ours, ids, mask, args.new)}, 1)
    results.update(uncached)
    seconds.update(no_cache_s)
    new_tokens = args.batch * args.new
    print(json.dumps({
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": 8, "kv_heads": 2, "vocab": VOCAB},
        "batch": args.batch, "longest_prompt": args.prompt, "new_tokens_per_row": args.new, "threads": args.threads,
        "repeats": args.repeats,
        "tokens_per_s": {name: round(new_tokens / value, 1) for name, value in seconds.items()},
        "speed_vs_transformers": round(seconds["transformers"] / seconds["neva_kv_cache"], 2),
        "speed_vs_no_cache": round(seconds["neva_no_cache"] / seconds["neva_kv_cache"], 2),
        "same_tokens_as_transformers": results["neva_kv_cache"] == results["transformers"],
        "same_tokens_as_no_cache": results["neva_kv_cache"] == results["neva_no_cache"],
    }))


if __name__ == "__main__":
    main()
