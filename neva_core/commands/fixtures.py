"""`neva fixtures OUT_DIR`: make the synthetic datasets, tiny checkpoints and tokenizer (see neva_core.fixtures)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fixtures",
        help="make tiny synthetic datasets, checkpoints and a tokenizer, offline",
        description=(
            "Write tiny but real assets into OUT_DIR, made offline from a seed: a LLaVA-Pretrain-shaped dataset "
            "(images.zip with NNNNN/ folders, blip_laion_cc_sbu_558k.json, heldout.json), a LLaVA-Instruct-shaped "
            "one (flat images.zip, llava_instruct.json with some text-only records), a LLaMA-style sentencepiece "
            "tokenizer, a tiny LLaMA (GQA) and a tiny CLIP vision checkpoint in Hugging Face format. Each image "
            "shows one coloured shape and its caption names them ('a red circle'). The same seed gives "
            "byte-identical files; fixtures.json, written last, indexes them. Running again into a complete "
            "OUT_DIR with the same parameters does nothing; an OUT_DIR made with other parameters is an error."
        ),
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write into (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice and weight (default: 0)")
    p.add_argument(
        "--images", type=int, default=64, metavar="N",
        help="number of pretraining records and of instruct records; the held-out split gets max(12, N/4) "
             "(default: 64)",
    )
    p.add_argument(
        "--image-size", type=int, default=64, metavar="PX",
        help="side of the square images and the CLIP input size, a multiple of 16 (default: 64)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neva_core.fixtures import make_fixtures

    fixtures = make_fixtures(args.out_dir, seed=args.seed, images=args.images, image_size=args.image_size)
    print(f"fixtures ready in {fixtures.root} (index: {fixtures.index})")
    return 0
