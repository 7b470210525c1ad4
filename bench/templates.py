"""Benchmark the per-sample data path on one core; prints ONE JSON line.

* Prompt templates: `encode_conversation` (ids built turn by turn and checked against the whole prompt)
  on LLaVA-665K-shaped records (one image of 576 tokens and three rounds, or five text-only rounds),
  with Mistral-7B's real sentencepiece model (from mistral-common) extended with NeVA's tokens; against
  the floor of one sentencepiece call over the whole prompt text (what any template must pay).
* Image preprocessing at 336 px: our `ImageProcessor` (`square` and `pad`) against transformers'
  `CLIPImageProcessorPil` on the same decoded 640x480 images.

    python bench/templates.py [--samples N] [--images N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neva_core.data.preprocess import ImageProcessor
from neva_core.data.templates import encode_conversation
from neva_core.data.text_tokenizer import load_text_tokenizer
from neva_core.tokenizer import extend_tokenizer

IMAGE_TOKENS = 576
WORDS = ("the red circle sits left of a blue square while two small triangles point up near the edge of "
         "a grey table in the photo").split()


def sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=words)).capitalize() + "."


def records(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        rounds = 5 if index % 8 == 7 else 3  # every 8th text-only, as in LLaVA's mixes
        turns = []
        for position in range(rounds):
            question = sentence(rng, 12) + " Why?"
            if position == 0 and index % 8 != 7:
                question = "<image>\n" + question
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": sentence(rng, 40)}]
        out.append(turns)
    return out


def per_second(work: Callable[[Any], Any], items: list[Any]) -> float:
    start = time.perf_counter()
    for item in items:
        work(item)
    return len(items) / (time.perf_counter() - start)


def bench_templates(samples: int) -> dict[str, Any]:
    import mistral_common

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_text_tokenizer(extend_tokenizer(model, Path(tmp) / "tok").out_dir)
    data = records(samples)
    result: dict[str, Any] = {"samples": samples, "image_tokens": IMAGE_TOKENS}
    for template in ("vicuna_v1", "llama_2", "mistral"):
        rate = per_second(lambda turns: encode_conversation(template, turns, tokenizer, IMAGE_TOKENS), data)
        result[f"{template}_samples_per_s"] = round(rate)
    texts = [" ".join(turn["value"] for turn in turns) for turns in data]
    result["whole_prompt_encode_floor_per_s"] = round(per_second(tokenizer.encode, texts))
    return result


def bench_images(count: int) -> dict[str, Any]:
    from transformers import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)) for _ in range(count)]
    config = {"size": 336, "crop_size": 336, "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}
    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_mean=config["image_mean"], image_std=config["image_std"])
    return {
        "images": count,
        "square_336_per_s": round(per_second(ImageProcessor.from_config(config, "square"), images), 1),
        "pad_336_per_s": round(per_second(ImageProcessor.from_config(config, "pad"), images), 1),
        "transformers_clip_336_per_s": round(
            per_second(lambda image: reference(images=image, return_tensors="pt"), images), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(json.dumps({"templates": bench_templates(args.samples), "images": bench_images(args.images)}))


if __name__ == "__main__":
    main()
