"""Scores of captions held in memory, such as the demo's held-out answers (neva_core.eval.heldout)."""

from __future__ import annotations

from collections.abc import Sequence

from neva_core.errors import NevaError
from neva_core.eval.coco import clean_caption, score_captions


def caption_scores(answers: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """accuracy: the share (x100) of answers that contain their true caption; CIDEr, BLEU-1..4, ROUGE-L (x100):
    the answers, cleaned as Megatron's COCO evaluation does, against their one true caption each, by
    pycocoevalcap's PTB tokenizer and scorers (needs Java); samples: how many were scored."""
    if len(answers) != len(truths) or not answers:
        raise NevaError(f"{len(answers)} answers for {len(truths)} true captions: give one answer per caption, "
                        "and at least one")
    accuracy = 100 * sum(truth in answer for answer, truth in zip(answers, truths)) / len(answers)
    scores = score_captions({i: clean_caption(a) for i, a in enumerate(answers)},
                            {i: [truth] for i, truth in enumerate(truths)})
    return {"accuracy": accuracy, **scores, "samples": len(answers)}
