"""`neva eval score`: score Megatron-format prediction files as the official scorers do (see neva_core.eval)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score benchmark predictions (COCO captioning, MMMU, TextVQA)",
        description="Benchmark evaluation. `neva eval generate` writes a trained model's answers over a benchmark; "
                    "`neva eval score` prints the official scores of a prediction file as "
                    "JSON; `neva eval fixtures` writes small offline benchmarks in the public layouts.",
    )
    actions = p.add_subparsers(dest="eval_command", required=True, metavar="ACTION")
    _register_generate(actions)
    _register_score(actions)
    _register_fixtures(actions)


def _register_generate(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "generate",
        help="greedy answers of a trained model over a benchmark, in Megatron's JSONL formats",
        description=(
            "Batched greedy generation (KV cache) over a benchmark folder in its public layout (as `neva eval "
            "fixtures` writes it), with Megatron's task prompts built by the model's own template. Writes "
            "coco: sample_id, caption; mmmu: sample_id, prediction, question_type, all_choices, index2ans; "
            "textvqa: sample_id, answer, gt_answer. Resumable: rerun the same command after a kill and it "
            "continues from the predictions already in PRED.jsonl (PRED.jsonl.run.json records the model and "
            "task; a different one is refused)."
        ),
    )
    p.add_argument("--model", type=Path, required=True, metavar="TRAINED_DIR",
                   help="trained-model folder or a run's OUT")
    p.add_argument("--task", required=True, choices=("coco", "mmmu", "textvqa"))
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="the benchmark folder")
    p.add_argument("--out", type=Path, required=True, metavar="PRED.jsonl", help="the prediction file (appended)")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="samples per forward pass (default 8)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the benchmark's first N samples")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="most tokens per answer (default: coco 40, textvqa 16, mmmu 24)")
    p.set_defaults(handler=_run_generate)


def _register_score(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "score",
        help="score a prediction file; prints JSON",
        description=(
            "Score predictions in Megatron's JSONL formats (coco: sample_id, caption; mmmu: sample_id, prediction, "
            "question_type, all_choices, index2ans; textvqa: sample_id, answer, gt_answer), the first line per "
            "sample_id. coco: CIDEr, BLEU-1..4 and ROUGE-L x100 as pycocoevalcap's COCOEvalCap computes them "
            "(needs Java). mmmu: accuracy x100 overall, per subject and per domain by MMMU's official rules; the "
            "seeded random fallbacks are listed. textvqa: accuracy x100 by the official EvalAI rules."
        ),
    )
    p.add_argument("--task", required=True, choices=("coco", "mmmu", "textvqa"))
    p.add_argument("--pred", type=Path, required=True, metavar="PRED.jsonl", help="the prediction file")
    p.add_argument("--gt", type=Path, metavar="COCO_GT.json", help="coco: the COCO-format ground truth")
    p.add_argument("--answers", type=Path, metavar="answer_dict.json", help="mmmu: MMMU's answer dict")
    p.add_argument(
        "--mode", choices=("official", "megatron"), default="official",
        help="mmmu: the official MMMU rules (default), or Megatron's evaluate_mmmu.py variant",
    )
    p.set_defaults(handler=_run_score)


def _register_fixtures(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "fixtures",
        help="write small offline COCO / MMMU / TextVQA benchmarks made of shape images",
        description=(
            "Write OUT_DIR/coco (coco_karpathy_test_gt.json + val2014.zip), OUT_DIR/mmmu (HF parquet files per "
            "subject + answer_dict_val.json) and OUT_DIR/textvqa (TextVQA_0.5.1_val.json + train_images/), from a "
            "seed. Their images are the fixtures' coloured shapes, so a model trained on the fixtures can answer."
        ),
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=24, metavar="N", help="samples per benchmark (default: 24)")
    p.set_defaults(handler=_run_fixtures)


def _run_generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from neva_core.eval.generate import generate_predictions

    summary = generate_predictions(args.model, args.task, args.data, args.out, batch=args.batch, limit=args.limit,
                                   max_new_tokens=args.max_new_tokens)
    print(json.dumps(asdict(summary) | {"path": str(summary.path)}, indent=2))
    return 0


def _run_score(args: argparse.Namespace) -> int:
    from neva_core.eval import score

    print(json.dumps(score(args.task, args.pred, gt=args.gt, answers=args.answers, mode=args.mode), indent=2))
    return 0


def _run_fixtures(args: argparse.Namespace) -> int:
    from neva_core.eval.fixtures import make_eval_fixtures

    print(json.dumps({k: str(v) for k, v in make_eval_fixtures(args.out_dir, seed=args.seed,
                                                               samples=args.samples).items()}, indent=2))
    return 0
