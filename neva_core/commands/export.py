"""`neva export`: native LLM checkpoint -> Hugging Face model folder; trained NeVA model -> HF LLaVA folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a native LLM checkpoint or a trained NeVA model as a Hugging Face model folder",
        description=(
            "Export as a Hugging Face folder that transformers loads with from_pretrained. A native LLM "
            "checkpoint (any tensor-parallel size) becomes LlamaForCausalLM, MistralForCausalLM or "
            "Qwen2ForCausalLM. A trained NeVA model folder (or a run's output folder, meaning its final/) "
            "becomes LlavaForConditionalGeneration with its processor files (AutoProcessor: image processor, "
            "tokenizer with the image token, chat template of the training prompt). Weights are safetensors, "
            "sharded with model.safetensors.index.json when larger than --max-shard-mb; vocabulary padding "
            "is removed."
        ),
    )
    p.add_argument("--in", dest="in_dir", type=Path, required=True, metavar="DIR",
                   help="the native checkpoint or trained model to read")
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
    from neva_core.llava import export_llava
    from neva_core.model.trained import is_trained_folder

    export = export_llava if is_trained_folder(args.in_dir) else export_hf
    print(export(args.in_dir, args.out, max_shard_bytes=args.max_shard_mb * 10**6))
    return 0
