"""`neva train --eval-every N --eval-task coco --eval-data DIR --eval-limit K`: zero-shot CIDEr in metrics.csv,
TensorBoard and final/'s provenance, equal to rescoring the predictions it wrote and to `neva eval generate` on
the final model; the same weights as a run without it; bad flags refused before any step."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from train_support import base_config, final_tensors, make_train_inputs, metrics_rows, read_json, run_training

from neva_core.errors import NevaError
from neva_core.eval import score
from neva_core.eval.fixtures import make_coco_fixture
from neva_core.eval.generate import generate_predictions
from neva_core.train.config import make_train_config
from neva_core.train.preflight import check_inputs

STEPS, EVERY, LIMIT, MAX_NEW = 4, 2, 6, 8  # micro batch 4: generation groups of 4 and 2
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


def with_generated_references(coco: Path, predictions: Path, out: Path) -> Path:
    """`coco` with each even-numbered image's predicted caption added to its references: the fixture's model
    cannot caption yet, so its CIDEr is 0 on the fixture itself; against these references it is not."""
    out.mkdir()
    shutil.copy(coco / "val2014.zip", out)
    truth = read_json(coco / "coco_karpathy_test_gt.json")
    captions = [json.loads(line) for line in predictions.read_text().splitlines()]
    for index, line in enumerate(captions[::2]):
        truth["annotations"].append({"image_id": line["sample_id"], "id": 10_000 + index, "caption": line["caption"]})
    (out / "coco_karpathy_test_gt.json").write_text(json.dumps(truth))
    return out


@pytest.fixture(scope="module")
def runs(inputs, coco, tmp_path_factory):
    """A run without zero-shot eval; `neva eval generate` on its final model; and the same run with eval on
    the fixture whose references hold those generations for half of the images."""
    root = tmp_path_factory.mktemp("zero-shot")
    without = run_config(inputs, root / "without")
    done = run_training(without)
    assert done.returncode == 0, done.stdout[-4000:]
    generated = root / "generated.jsonl"
    generate_predictions(without.out / "final", "coco", coco, generated, batch=without.micro_batch, limit=LIMIT,
                         max_new_tokens=MAX_NEW)
    data = with_generated_references(coco, generated, root / "coco-with-generated")
    with_eval = run_config(inputs, root / "with-eval", eval_every=EVERY, eval_task="coco", eval_data=data,
                           eval_limit=LIMIT, eval_max_new_tokens=MAX_NEW)
    done = run_training(with_eval)
    assert done.returncode == 0, done.stdout[-4000:]
    return with_eval, without, generated, done.stdout


def test_cider_is_logged_at_the_eval_steps_and_equals_rescoring_its_predictions(runs) -> None:
    config, _, _, output = runs
    rows = {int(row["step"]): row for row in metrics_rows(config.out)}
    assert [step for step, row in rows.items() if row["coco_cider"]] == [2, 4]
    assert all(rows[step]["val_loss"] for step in (2, 4))
    for step in (2, 4):
        predictions = config.out / "eval" / f"step-{step}" / "predictions.jsonl"
        lines = [json.loads(line) for line in predictions.read_text().splitlines()]
        assert len(lines) == LIMIT and all(set(line) == {"sample_id", "caption"} for line in lines)
        rescored = score("coco", predictions, gt=config.eval_data / "coco_karpathy_test_gt.json")
        assert float(rows[step]["coco_cider"]) == pytest.approx(rescored["CIDEr"], rel=1e-5, abs=1e-9)
        assert read_json(predictions.parent / "scores.json")["scores"] == rescored
        assert re.search(rf"step {step} zero-shot coco CIDEr [0-9.e+-]+ on {LIMIT} samples", output)
        assert re.search(rf"step {step} loss .* coco_cider {rows[step]['coco_cider']}", output)
    assert float(rows[STEPS]["coco_cider"]) > 10  # half of the images have their caption among the references
    provenance = read_json(config.out / "final" / "model.json")["provenance"]["zero_shot"]
    assert provenance["step"] == STEPS and provenance["task"] == "coco" and provenance["metric"] == "CIDEr"
    assert provenance["score"] == pytest.approx(float(rows[STEPS]["coco_cider"]), rel=1e-5, abs=1e-9)


def test_tensorboard_has_the_score_at_the_eval_steps(runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = runs[0]
    events = EventAccumulator(str(config.out / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("zero_shot/coco_cider")] == [2, 4]


def test_last_step_generations_are_neva_eval_generate_on_the_final_model(runs) -> None:
    config, _, generated, _ = runs
    assert (config.out / "eval" / f"step-{STEPS}" / "predictions.jsonl").read_bytes() == generated.read_bytes()


def test_eval_leaves_the_trained_weights_bit_identical(runs) -> None:
    with_eval, without, _, _ = runs
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


def test_generation_puts_back_rng_states_and_module_modes() -> None:
    import random

    import numpy as np

    from neva_core.train.zero_shot import _untouched

    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model[1].eval()  # a frozen part kept in eval mode stays so
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with _untouched(model):
        assert not any(module.training for module in model.modules())
        random.random(), np.random.rand(), torch.rand(3)
    assert [module.training for module in model.modules()] == [True, True, False, False]
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_a_resume_redoes_later_evaluations_and_may_change_the_eval_flags(inputs, coco, tmp_path) -> None:
    from types import SimpleNamespace

    from neva_core.train.parallel import make_layout
    from neva_core.train.zero_shot import ZeroShotEval

    config = run_config(inputs, tmp_path / "out", eval_every=EVERY, eval_task="coco", eval_data=coco)
    for step in (2, 4):  # evaluations of a killed run, which had reached step 4
        folder = config.out / "eval" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "scores.json").write_text(json.dumps({"step": step, "task": "coco", "data": str(coco), "samples": 6,
                                                        "metric": "CIDEr", "score": float(step)}))
    (config.out / "eval" / ".step-6.tmp-host-1-abcd").mkdir()
    rank0 = SimpleNamespace(layout=make_layout(1, 1, 0))
    zero_shot = ZeroShotEval(config, None, None, rank0, resumed_step=3)  # resumed from the step-3 checkpoint
    assert sorted(p.name for p in (config.out / "eval").iterdir()) == ["step-2"]
    assert zero_shot.latest() == {"step": 2, "task": "coco", "data": str(coco), "samples": 6, "metric": "CIDEr",
                                  "score": 2.0, "predictions": "eval/step-2/predictions.jsonl"}
    config.check_resume(run_config(inputs, tmp_path / "out").model_dump(mode="json"))  # eval flags are neutral
