"""Scores of captions held in memory, such as the demo's held-out answers (neva_core.eval.heldout)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

from neva_core.errors import NevaError
from neva_core.eval.coco import PTB_TOKENIZER, clean_caption, score_captions


def caption_scores(answers: Sequence[str], truths: Sequence[str]) -> dict[str, Any]:
    """accuracy: the share (x100) of answers that contain their true caption (the rule of
    neva_core.eval.heldout); CIDEr, BLEU-1..4, ROUGE-L (x100): the answers, cleaned as Megatron's COCO
    evaluation does, against their one true caption each, by pycocoevalcap's scorers; samples: how many;
    tokenizer: which one was used.

    Captions are tokenised by pycocoevalcap's PTB tokenizer when Java is installed; without Java (so that
    `neva demo` runs on a machine with Python only) by `plain_tokens`, which equals it on the demo's
    captions (words and end punctuation) and is named in the result."""
    if len(answers) != len(truths) or not answers:
        raise NevaError(f"{len(answers)} answers for {len(truths)} true captions: give one answer per caption, "
                        "and at least one")
    accuracy = 100 * sum(truth in answer for answer, truth in zip(answers, truths)) / len(answers)
    tokenizer = "ptb" if shutil.which("java") else "plain"
    scores = score_captions({i: clean_caption(a) for i, a in enumerate(answers)},
                            {i: [truth] for i, truth in enumerate(truths)}, tokenizer=tokenizer)
    name = PTB_TOKENIZER if tokenizer == "ptb" else "plain: lower-cased words, end punctuation dropped (no Java)"
    return {"accuracy": accuracy, **scores, "samples": len(answers), "tokenizer": name}
