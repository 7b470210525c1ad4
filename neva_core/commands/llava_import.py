"""`neva import`: LLaVA weights (an llava-hf folder, or LLaVA's mm_projector.bin) -> trained-model folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="import LLaVA weights as a trained NeVA model folder (a starting point for finetuning)",
        description=(
            "Write a trained-model folder from LLaVA weights. Either --llava-hf DIR: a Hugging Face "
            "LlavaForConditionalGeneration folder (llava-hf/*: config, weights, tokenizer and image processor), "
            "or --mm-projector FILE: LLaVA's pretrained projector (mm_projector.bin, read with "
            "weights_only=True) with the native LLM (--llm), CLIP tower (--vision) and tokenizer "
            "(--tokenizer) it belongs to."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--llava-hf", type=Path, metavar="DIR", help="an HF LLaVA model folder")
    source.add_argument("--mm-projector", type=Path, metavar="FILE", help="LLaVA's mm_projector.bin")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the trained-model folder to create")
    p.add_argument("--template", required=True, help="the prompt template of the weights (LLaVA-1.5: vicuna_v1)")
    p.add_argument("--llm", type=Path, metavar="DIR", help="native LLM checkpoint (with --mm-projector)")
    p.add_argument("--vision", type=Path, metavar="DIR", help="CLIP vision tower folder (with --mm-projector)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (with --mm-projector)")
    p.add_argument("--image-token-id", type=int, metavar="ID",
                   help="id of the image token (default: the tokenizer's image_patch role token)")
    p.set_defaults(handler=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from neva_core.llava import image_patch_token_id, import_llava_hf, import_mm_projector

    if args.llava_hf is not None:
        print(import_llava_hf(args.llava_hf, args.out, template=args.template))
        return 0
    missing = [flag for flag, value in (("--llm", args.llm), ("--vision", args.vision),
                                        ("--tokenizer", args.tokenizer)) if value is None]
    if missing:
        args.parser.error(f"--mm-projector needs {', '.join(missing)}")
    image_token_id = args.image_token_id if args.image_token_id is not None else image_patch_token_id(args.tokenizer)
    print(import_mm_projector(args.mm_projector, args.out, llm_dir=args.llm, vision_dir=args.vision,
                              tokenizer_dir=args.tokenizer, template=args.template, image_token_id=image_token_id))
    return 0
