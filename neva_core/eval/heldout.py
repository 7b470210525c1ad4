"""Held-out caption accuracy of an HF LLaVA export, run by transformers itself.

Each held-out record's own question goes through the export's chat template (AutoProcessor), the export's
LlavaForConditionalGeneration answers greedily, and an answer is right when it contains the record's
caption. This is the demo's end-to-end check: it reads nothing of neva's model code, so it also checks
the export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neva_core.errors import NevaError
from neva_core.eval.benchmarks import ImageFiles

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class HeldoutResult:
    accuracy: float  # share of records whose answer contains the true caption, 0..1
    answers: list[str]
    truths: list[str]
    images: list[str]
    questions: list[str]


def read_heldout(heldout_json: Path) -> tuple[list[str], list[str], list[str]]:
    """(image paths, questions without the image placeholder, true captions) of a LLaVA-style record list."""
    try:
        records = json.loads(Path(heldout_json).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NevaError(f"cannot read the held-out records {heldout_json}: {exc}") from None
    images, questions, truths = [], [], []
    for index, record in enumerate(records):
        try:
            human, answer = record["conversations"][0], record["conversations"][1]
            images.append(str(record["image"]))
            questions.append(str(human["value"]).replace(IMAGE_PLACEHOLDER, "").strip())
            truths.append(str(answer["value"]).strip())
        except (KeyError, IndexError, TypeError):
            raise NevaError(f"{heldout_json} record {index}: needs an image and a human then a gpt turn") from None
    if not records:
        raise NevaError(f"{heldout_json} holds no records")
    return images, questions, truths


def heldout_captions(export_dir: Path, heldout_json: Path, images: Path, *, batch: int = 32,
                     max_new_tokens: int = 16) -> HeldoutResult:
    """Greedy answers of the HF LLaVA export at `export_dir` to each held-out record's question about its
    image (from `images`: the zip or folder the records' paths are relative to), and their accuracy."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if batch < 1:
        raise NevaError(f"batch must be at least 1, got {batch}")
    paths, questions, truths = read_heldout(heldout_json)
    model = LlavaForConditionalGeneration.from_pretrained(export_dir).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    if processor.chat_template is None:
        raise NevaError(f"{export_dir} has no chat template (a plain-template pretraining export); evaluate a "
                        "finetuned model's export")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True) for question in questions]
    answers: list[str] = []
    read_image = ImageFiles(images).open
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            stop = start + batch
            inputs = processor(images=[read_image(name) for name in paths[start:stop]], text=prompts[start:stop],
                               return_tensors="pt", padding=True)
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            new_tokens = tokens[:, inputs["input_ids"].shape[1]:]
            answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    right = sum(truth in answer for truth, answer in zip(truths, answers))
    return HeldoutResult(accuracy=right / len(paths), answers=answers, truths=truths, images=paths,
                         questions=questions)
