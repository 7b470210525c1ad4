"""Benchmark evaluation: the official scorers (COCO captioning, MMMU, TextVQA) and the benchmarks' input layouts.

    coco.py         CIDEr / BLEU / ROUGE-L equal to pycocoevalcap's COCOEvalCap
    mmmu.py         MMMU's official answer parsing and judging (and Megatron's variant)
    textvqa.py      EvalAI's answer normalisation and the leave-one-out soft accuracy
    predictions.py  Megatron's JSONL prediction formats
    prompts.py      Megatron's task prompts
    benchmarks.py   readers for the public layouts (COCO Karpathy test, MMMU on disk, TextVQA val)
    fixtures.py     small offline benchmarks in those layouts, made of the fixtures' shape images
    generate.py     a trained model's batched greedy answers over a benchmark, resumable (`neva eval generate`)
    guard.py        the nightly regression guard: score history and the promoted model
    settings.py     EvaluationConfig: the flow's evaluation stage (benchmarks, limit, decoding, tolerance, guard)
    report.py       the evaluation's artifacts: scores table, samples beside their references, promoted model
    captions.py     scores of captions in memory (the demo's held-out answers): accuracy, CIDEr, BLEU, ROUGE-L
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neva_core.errors import NevaError

TASKS = ("coco", "mmmu", "textvqa")


def score(task: str, pred: Path, *, gt: Path | None = None, answers: Path | None = None,
          mode: str = "official") -> dict[str, Any]:
    """The scores of a prediction file, as the JSON `neva eval score` prints."""
    if task == "coco":
        if gt is None:
            raise NevaError("--task coco needs --gt COCO_GT.json (the COCO-format ground truth)")
        from neva_core.eval.coco import score_coco

        return score_coco(pred, gt)
    if task == "mmmu":
        if answers is None:
            raise NevaError("--task mmmu needs --answers answer_dict.json (MMMU's answer dict)")
        from neva_core.eval.mmmu import score_mmmu

        return score_mmmu(pred, answers, mode)
    if task == "textvqa":
        from neva_core.eval.textvqa import score_textvqa

        return score_textvqa(pred)
    raise NevaError(f"unknown task {task!r}; choose one of {TASKS}")
