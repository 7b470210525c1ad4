"""`neva train --eval-every N --eval-task coco --eval-data DIR --eval-limit K`: zero-shot CIDEr in metrics.csv,
TensorBoard and final/'s provenance, equal to rescoring the predictions it wrote and to `neva eval generate` on
the final model; the same weights as a run without it; bad flags refused before any step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_support import base_config, final_tensors, make_train_inputs, metrics_rows, read_json, run_training

from neva_core.errors import NevaError
from neva_core.eval import score
from neva_core.eval.fixtures import make_coco_fixture
from neva_core.eval.generate import generate_predictions
from neva_core.train.config import make_train_config
from neva_core.train.preflight import check_inputs

STEPS, EVERY, LIMIT = 4, 2, 6  # micro batch 4: generation groups of 4 and 2
pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="COCO scoring needs Java")


@pytest.fixture(scope="module")
def inputs(neva_fixtures, neva_tokenizer, tmp_path_factory):
    return make_train_inputs(neva_fixtures, neva_tokenizer.out_dir, tmp_path_factory.mktemp("train-inputs"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-data") / "coco"
    make_coco_fixture(folder, samples=8)
    return folder


def run_config(inputs, out, **changes):
    return base_config(inputs, out, max_steps=STEPS, save_every=0, val_every=EVERY, **changes)


@pytest.fixture(scope="module")
def runs(inputs, coco, tmp_path_factory):
    """(with zero-shot eval, without), both finished."""
    root = tmp_path_factory.mktemp("zero-shot")
    with_eval = run_config(inputs, root / "with-eval", eval_every=EVERY, eval_task="coco", eval_data=coco,
                           eval_limit=LIMIT, eval_max_new_tokens=8)
    without = run_config(inputs, root / "without")
    for config in (with_eval, without):
        done = run_training(config)
        assert done.returncode == 0, done.stdout[-4000:]
    return with_eval, without, done.stdout


def test_cider_is_logged_at_the_eval_steps_and_equals_rescoring_its_predictions(runs, coco) -> None:
    config, _, _ = runs
    rows = {int(row["step"]): row for row in metrics_rows(config.out)}
    assert [step for step, row in rows.items() if row["coco_cider"]] == [2, 4]
    assert all(rows[step]["val_loss"] for step in (2, 4))
    for step in (2, 4):
        predictions = config.out / "eval" / f"step-{step}" / "predictions.jsonl"
        lines = [json.loads(line) for line in predictions.read_text().splitlines()]
        assert len(lines) == LIMIT and all(set(line) == {"sample_id", "caption"} for line in lines)
        rescored = score("coco", predictions, gt=coco / "coco_karpathy_test_gt.json")["CIDEr"]
        assert float(rows[step]["coco_cider"]) == pytest.approx(rescored, rel=1e-5, abs=1e-9)
        assert read_json(predictions.parent / "scores.json")["score"] == rescored
    provenance = read_json(config.out / "final" / "model.json")["provenance"]["zero_shot"]
    assert provenance["step"] == STEPS and provenance["task"] == "coco" and provenance["metric"] == "CIDEr"
    assert provenance["score"] == pytest.approx(float(rows[STEPS]["coco_cider"]), rel=1e-5, abs=1e-9)


def test_tensorboard_and_log_line_carry_the_score(runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, _, _ = runs
    events = EventAccumulator(str(config.out / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("zero_shot/coco_cider")] == [2, 4]


def test_final_step_predictions_are_neva_eval_generate_on_the_final_model(runs, coco, tmp_path) -> None:
    config, _, _ = runs
    out = tmp_path / "coco.jsonl"
    generate_predictions(config.out / "final", "coco", coco, out, batch=config.micro_batch, limit=LIMIT,
                         max_new_tokens=8)
    assert out.read_bytes() == (config.out / "eval" / f"step-{STEPS}" / "predictions.jsonl").read_bytes()


def test_eval_leaves_the_trained_weights_bit_identical(runs) -> None:
    with_eval, without, _ = runs
    ours, theirs = final_tensors(with_eval.out), final_tensors(without.out)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert [row["loss"] for row in metrics_rows(with_eval.out)] == [row["loss"] for row in metrics_rows(without.out)]
    assert [row["val_loss"] for row in metrics_rows(with_eval.out)] == \
        [row["val_loss"] for row in metrics_rows(without.out)]


@pytest.mark.parametrize("case, message", [
    ("no task", r"--eval-every 2 needs --eval-task coco\|mmmu\|textvqa and --eval-data DIR"),
    ("no data", r"--eval-every 2 needs --eval-task"),
    ("limit", r"--eval-limit 0"),
    ("unknown task", r"--eval-task 'vqav2'"),
    ("missing folder", r"--eval-data .*nowhere \(--eval-task coco\) does not exist"),
    ("no ground truth", r"--eval-data .* \(--eval-task coco\): .* is not a coco benchmark folder: it has none of "
                        r"\['coco_karpathy_test_gt.json'\]"),
    ("no images", r"--eval-data .* \(--eval-task coco\): .* has none of \['val2014.zip', 'val2014'\]"),
    ("wrong task", r"--eval-data .* \(--eval-task textvqa\): .* has none of \['TextVQA_0.5.1_val.json'\]"),
])
def test_bad_eval_flags_are_refused_before_any_step(case, message, inputs, coco, tmp_path) -> None:
    values = run_config(inputs, tmp_path / "out").model_dump()
    evaluated = {"eval_every": EVERY, "eval_task": "coco", "eval_data": coco}
    no_images = tmp_path / "gt-only"
    no_images.mkdir()
    shutil.copy(coco / "coco_karpathy_test_gt.json", no_images)
    changes = {
        "no task": {"eval_every": EVERY, "eval_data": coco}, "no data": {"eval_every": EVERY, "eval_task": "coco"},
        "limit": evaluated | {"eval_limit": 0}, "unknown task": evaluated | {"eval_task": "vqav2"},
        "missing folder": evaluated | {"eval_data": tmp_path / "nowhere"},
        "no ground truth": evaluated | {"eval_data": tmp_path}, "no images": evaluated | {"eval_data": no_images},
        "wrong task": evaluated | {"eval_task": "textvqa"},
    }[case]
    with pytest.raises(NevaError, match=message):
        check_inputs(make_train_config(values | changes))
    assert not (tmp_path / "out").exists()
