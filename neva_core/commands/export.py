"""`neva export`: native checkpoint -> Hugging Face model folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a native checkpoint as a Hugging Face model folder",
        description=(
            "Export a native checkpoint (any tensor-parallel size) as a Hugging Face folder that "
            "transformers loads with from_pretrained: config.json for the original architecture "
            "(LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM) and safetensors weights, sharded "
            "with model.safetensors.index.json when larger than --max-shard-mb. Vocabulary padding is removed."
        ),
    )
    p.add_argument("--in", dest="in_dir", type=Path, required=True, metavar="DIR", help="the native checkpoint to read")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the HF model folder to create")
    p.add_argument(
        "--max-shard-mb",
        type=int,
        default=5000,
        metavar="MB",
        help="largest safetensors file in megabytes (10^6 bytes) before the weights are sharded (default 5000)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neva_core.export import export_hf

    print(export_hf(args.in_dir, args.out, max_shard_bytes=args.max_shard_mb * 10**6))
    return 0
