"""`neva convert`: Hugging Face LLaMA-family checkpoint -> native checkpoint (streaming)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an HF LLaMA/Mistral/Qwen2 checkpoint into the native format",
        description=(
            "Convert a Hugging Face checkpoint folder (LlamaForCausalLM incl. LLaMA-2 and Yi, MistralForCausalLM, "
            "Qwen2ForCausalLM; safetensors or pytorch_model.bin, sharded or not) into a native checkpoint: one "
            "safetensors file per tensor-parallel rank in Megatron-core names, config.json and manifest.json. "
            "Streams tensor by tensor; memory stays at a few tensors. An identical finished output (same source "
            "files, by names, sizes and mtimes, and same settings) is reused; one of other settings is rebuilt "
            "beside it and replaced once complete."
        ),
    )
    p.add_argument("--hf", type=Path, required=True, metavar="DIR", help="the HF model folder (with config.json)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the native checkpoint folder to create")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size to write (default 1)")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="dtype of the written weights (default: the checkpoint's own dtype)",
    )
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="V",
        help="grow the vocabulary to V real tokens (new rows = mean of existing rows; never smaller)",
    )
    vocab.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="PATH",
        help="an extended tokenizer (its folder, tokenizer.model or tokenizer.json): grow the vocabulary to its "
             "size; a tokenizer whose ids all fit keeps the checkpoint's vocabulary",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neva_core.checkpoint.convert import convert_hf_checkpoint

    result = convert_hf_checkpoint(
        args.hf, args.out, tp=args.tp, dtype=args.dtype, vocab_size=args.vocab_size, tokenizer=args.tokenizer
    )
    print(json.dumps(result.to_dict()))
    return 0
