"""`neva generate`: a trained NeVA model's greedy answer to a question about one image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer a question about an image with a trained model (greedy)",
        description=(
            "Load a trained-model folder (or a run's OUT, meaning OUT/final), build the prompt with the model's "
            "training template, and decode greedily with a KV cache until EOS or --max-new-tokens. "
            "The answer is printed on the last line."
        ),
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="trained-model folder or a run's OUT")
    p.add_argument("--image", type=Path, required=True, metavar="FILE", help="the image (any format PIL reads)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question (without an <image> tag)")
    p.add_argument("--template", default=None, metavar="T",
                   help="prompt template (plain, vicuna_v1, llama_2, mistral; default: the model's own)")
    p.add_argument("--image-aspect", choices=("square", "pad"), default=None,
                   help="image preprocessing (default: square for the plain template, else pad, as LLaVA-1.5)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default 128)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neva_core.data.preprocess import ImageProcessor
    from neva_core.data.text_tokenizer import load_text_tokenizer
    from neva_core.generate import generate_answers
    from neva_core.model.trained import TOKENIZER_DIR, VISION_DIR, load_trained_model, read_trained_config

    folder, settings, _ = read_trained_config(args.model)
    template = args.template or settings.template
    aspect = args.image_aspect or ("square" if template == "plain" else "pad")
    image = ImageProcessor.from_folder(folder / VISION_DIR, aspect=aspect)(open_image(args.image))
    model = load_trained_model(folder).eval()
    tokenizer = load_text_tokenizer(folder / TOKENIZER_DIR)
    print(generate_answers(model, tokenizer, template, [args.prompt], image.unsqueeze(0), args.max_new_tokens)[0])
    return 0


def open_image(path: Path) -> Image:
    """The image at `path` in RGB; a missing or unreadable file is a NevaError naming it."""
    import PIL.Image

    from neva_core.errors import NevaError

    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise NevaError(f"image {path} does not exist") from None
    except (PIL.UnidentifiedImageError, OSError) as exc:
        raise NevaError(f"cannot read the image {path}: {exc}") from exc
