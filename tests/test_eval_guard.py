"""The nightly regression guard: history, tolerance, promotion; end to end with a deliberately worse model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neva_core.errors import NevaError
from neva_core.eval.fixtures import make_textvqa_fixture
from neva_core.eval.generate import generate_predictions, model_digest
from neva_core.eval.guard import (
    HISTORY,
    evaluate_and_guard,
    headline_scores,
    judge,
    read_history,
    read_promoted,
    record_run,
)
from neva_core.eval.predictions import read_predictions

pytest_plugins = ("eval_support",)  # fixtures eval_model, other_model (the worse one here)


def test_judge_rules() -> None:
    baseline = {"coco/CIDEr": 90.0, "mmmu/accuracy": 38.0}
    assert judge(baseline, None) == ("promoted", {})
    assert judge(dict(baseline), baseline) == ("promoted", {})  # equal is promoted
    assert judge({"coco/CIDEr": 91.0, "mmmu/accuracy": 38.5}, baseline) == ("promoted", {})
    assert judge({"coco/CIDEr": 89.5, "mmmu/accuracy": 39.0}, baseline, {"CIDEr": 1.0}) == ("kept", {})
    decision, regressions = judge({"coco/CIDEr": 88.5, "mmmu/accuracy": 39.0}, baseline, {"coco/CIDEr": 1.0})
    assert decision == "regression" and list(regressions) == ["coco/CIDEr"]
    assert regressions["coco/CIDEr"] == {"baseline": 90.0, "score": 88.5, "drop": 1.5, "tolerance": 1.0}
    assert judge({"coco/CIDEr": 89.99, "mmmu/accuracy": 38.0}, baseline)[0] == "regression"  # default: 0 points
    with pytest.raises(NevaError, match="no score for \\['mmmu/accuracy'\\]"):
        judge({"coco/CIDEr": 95.0}, baseline)
    with pytest.raises(NevaError, match="at least 0"):
        judge(baseline, baseline, -1.0)
    assert headline_scores("textvqa", {"accuracy": 12.5, "samples": 3}) == {"textvqa/accuracy": 12.5}
    with pytest.raises(NevaError, match="lack \\['CIDEr'"):
        headline_scores("coco", {"accuracy": 1.0})


def test_fed_scores_history_and_promotion(eval_model, other_model, tmp_path) -> None:
    work = tmp_path / "work"
    first = record_run(work, "night-1", eval_model, {"coco/CIDEr": 90.0}, tolerance=1.0)
    assert first.decision == "promoted" and first.baseline_run_id is None
    assert read_promoted(work)["run_id"] == "night-1"
    worse = record_run(work, "night-2", other_model, {"coco/CIDEr": 85.0}, tolerance=1.0)
    assert worse.is_regression and worse.baseline_run_id == "night-1"
    promoted = read_promoted(work)
    assert promoted["run_id"] == "night-1" and promoted["source"] == str(eval_model.resolve())
    assert promoted["model_digest"] == model_digest(eval_model) and promoted["scores"] == {"coco/CIDEr": 90.0}
    slight = record_run(work, "night-3", other_model, {"coco/CIDEr": 89.5}, tolerance=1.0)
    assert slight.decision == "kept" and read_promoted(work)["run_id"] == "night-1"
    better = record_run(work, "night-4", other_model, {"coco/CIDEr": 90.0}, tolerance=1.0)
    assert better.decision == "promoted" and read_promoted(work)["source"] == str(other_model.resolve())
    kept = Path(read_promoted(work)["model"])  # the promoted model's own copy, safe from pruning of old runs
    assert kept.parent == work / "promoted" and model_digest(kept) == model_digest(other_model)
    assert (kept / "manifest.json").stat().st_ino == (other_model / "manifest.json").stat().st_ino  # hard links
    assert sorted(p.name for p in kept.parent.iterdir() if p.is_dir()) == [kept.name]  # the previous copy is gone
    history = read_history(work)
    assert [(r["run_id"], r["decision"]) for r in history] == [
        ("night-1", "promoted"), ("night-2", "regression"), ("night-3", "kept"), ("night-4", "promoted")]
    # a rerun of a recorded night changes nothing; the same id with other scores is refused
    assert record_run(work, "night-2", other_model, {"coco/CIDEr": 85.0}, tolerance=1.0) == worse
    assert len(read_history(work)) == 4
    with pytest.raises(NevaError, match="already in"):
        record_run(work, "night-2", other_model, {"coco/CIDEr": 95.0})
    # a crash between the history line and the pointer: the rerun completes the promotion
    (work / "promoted" / "model.json").unlink()
    record_run(work, "night-4", other_model, {"coco/CIDEr": 90.0}, tolerance=1.0)
    assert read_promoted(work)["run_id"] == "night-4"
    assert not [p for p in (work / HISTORY).parent.iterdir() if ".tmp-" in p.name]


def test_end_to_end_worse_model_is_not_promoted(eval_model, other_model, tmp_path) -> None:
    """A TextVQA benchmark whose answers are the first model's: the second model's differing answers score lower."""
    bench = tmp_path / "textvqa"
    make_textvqa_fixture(bench, samples=6)
    probe = tmp_path / "probe.jsonl"
    generate_predictions(eval_model, "textvqa", bench, probe, batch=3, max_new_tokens=4)
    answers = {r["sample_id"]: r["answer"] for r in read_predictions(probe, "textvqa").records}
    truth_path = bench / "TextVQA_0.5.1_val.json"
    truth = json.loads(truth_path.read_text())
    for record in truth["data"]:
        record["answers"] = [answers[record["question_id"]]] * 10
    truth_path.write_text(json.dumps(truth))

    work = tmp_path / "work"
    good = evaluate_and_guard(work, "night-1", eval_model, {"textvqa": bench}, batch=3, max_new_tokens=4,
                              tolerance=1.0)
    assert good.decision == "promoted" and good.scores == {"textvqa/accuracy": 100.0}
    bad = evaluate_and_guard(work, "night-2", other_model, {"textvqa": bench}, batch=3, max_new_tokens=4,
                             tolerance=1.0)
    bad_answers = [r["answer"] for r in read_predictions(work / "eval" / "night-2" / "textvqa.jsonl",
                                                         "textvqa").records]
    assert bad_answers != list(answers.values())  # the two models' generations differ
    assert bad.is_regression and bad.scores["textvqa/accuracy"] < 99.0
    assert read_promoted(work)["source"] == str(eval_model.resolve())
    assert json.loads((work / "eval" / "night-2" / "textvqa.scores.json").read_text())["samples"] == 6
