"""The task prompts of Megatron's evaluation, as data, and MMMU's question construction.

Source: NVIDIA/Megatron-LM, examples/multimodal/run_text_generation.py, `get_conversation` (a system turn and a
user turn; the model's own template wraps them). MMMU questions are built as Megatron's MMMUDataset does with
its default prompt_style "single_image" (examples/multimodal/evaluation/evaluation_datasets.py): MMMU's
`construct_prompt` with the LLaVA-1.5 config of the MMMU repository (mmmu/configs/llava1.5.yaml), then
Megatron's `process_image_tag`, which rewrites the "<image 1>" reference into words and deletes
"<image 2>".."<image 7>".

Several images: Megatron's single_image style gives the model image_1 only (MMMU's `process_single_sample`),
so `read_mmmu` yields that one image and records how many the question had.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from neva_core.errors import NevaError

IMAGE_PLACEHOLDER = "<image>"  # Megatron's IMAGE_TOKEN; our conversations use the same mark


@dataclass(frozen=True)
class TaskPrompt:
    system: str
    user: str  # str.format template with {question}


PROMPTS: dict[str, TaskPrompt] = {
    "coco": TaskPrompt("Answer the questions.",
                       f"{IMAGE_PLACEHOLDER}\nGive a brief description of this image in one sentence."),
    "textvqa": TaskPrompt("Follow the user's instruction and answer questions.",
                          f"{IMAGE_PLACEHOLDER}\n{{question}}\nAnswer the question using a single word, phrase, "
                          "or number."),
    "mmmu": TaskPrompt("Answer the questions.", f"{IMAGE_PLACEHOLDER}\n{{question}}"),
}

# mmmu/configs/llava1.5.yaml (its task_instructions is empty, so nothing is prepended)
MMMU_MULTI_CHOICE_FORMAT = "{}\n{}\nAnswer with the option's letter from the given choices directly."
MMMU_OPEN_FORMAT = "{}\nAnswer the question using a single word or phrase."
_EXTRA_IMAGE_TAGS = tuple(f"<image {i}>" for i in range(2, 8))


def user_prompt(task: str, question: str = "") -> str:
    """The user turn Megatron sends for `task`, with `<image>` where the image goes."""
    if task not in PROMPTS:
        raise NevaError(f"no prompt for task {task!r}; tasks are {sorted(PROMPTS)}")
    return PROMPTS[task].user.format(question=question)


def mmmu_options(row: dict[str, Any]) -> list[str]:
    """The option texts of an MMMU row (stored as the repr of a Python list)."""
    try:
        options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
    except (ValueError, SyntaxError) as exc:
        raise NevaError(f"MMMU sample {row.get('id')!r}: options {row['options']!r} is not a list ({exc})") from None
    return [str(option) for option in options]


def mmmu_question(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The question text and the scoring metadata (question_type, all_choices, index2ans) of an MMMU row."""
    question = row["question"].strip()
    metadata: dict[str, Any] = {"question_type": row["question_type"]}
    if row["question_type"] == "multiple-choice":
        letters = [chr(ord("A") + i) for i in range(len(mmmu_options(row)))]
        index2ans = dict(zip(letters, mmmu_options(row)))
        listing = "".join(f"({letter}) {text}\n" for letter, text in index2ans.items())
        prompt = MMMU_MULTI_CHOICE_FORMAT.format(question, listing)
        metadata |= {"all_choices": letters, "index2ans": index2ans}
    else:
        prompt = MMMU_OPEN_FORMAT.format(question)
    return process_image_tag(prompt), metadata


def process_image_tag(text: str) -> str:
    """Megatron's heuristic rewrite of "<image 1>" into words (first matching rule), other tags deleted."""
    text = text.strip()
    tag = "<image 1>"
    if text == tag:
        text = "Answer the question in the image."
    elif ":" + tag in text:
        text = text.replace(":" + tag, " in the image. ").strip()
    elif ": " + tag in text:
        text = text.replace(": " + tag, " in the image. ").strip()
    elif "." + tag in text or ". " + tag in text:
        text = " ".join(part.strip() for part in text.split(tag) if part.strip())
    elif text.startswith(tag + " "):
        text = text.replace(tag, "" if text[len(tag) + 1].isupper() else "The image").strip()
    elif text.startswith(tag):
        text = text.replace(tag, "")
    elif text.endswith(tag + "?"):
        text = text.replace(tag, "the image")
    elif text.endswith("?" + tag) or text.endswith("? " + tag) or text.endswith("\n" + tag):
        text = text.replace(tag, "").strip()
    elif " " + tag in text:  # covers Megatron's " <image 1> " and " <image 1>" rules, which do the same
        text = text.replace(tag, "the image")
    elif "()" + tag in text:
        text = text.replace("()" + tag, "")
    elif "(" + tag + ")" in text:
        text = text.replace("(" + tag + ")", "")
    elif tag + "." in text:
        text = text.replace(tag + ".", ". ")
    else:
        text = text.replace(tag, ". ").strip()
    for extra in _EXTRA_IMAGE_TAGS:
        text = text.replace(extra, "")
    return text
