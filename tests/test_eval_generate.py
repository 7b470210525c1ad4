"""`neva eval generate` on the eval fixtures with trained-model folders built without training (random
projectors): valid Megatron files that `neva eval score` reads, exact resume after a kill, --limit, refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from neva_core.cli import main
from neva_core.errors import NevaError
from neva_core.eval import score
from neva_core.eval.benchmarks import read_benchmark, scoring_references
from neva_core.eval.fixtures import make_eval_fixtures
from neva_core.eval.generate import Answerer, generate_predictions, run_path
from neva_core.eval.predictions import read_predictions
from neva_core.io import file_lock, lock_path

pytest_plugins = ("eval_support",)  # fixtures eval_model, other_model
SAMPLES = 8
MAX_NEW = 6


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-fixtures")
    make_eval_fixtures(out, samples=SAMPLES, image_size=64)
    return out


@pytest.fixture(scope="module")
def answerer(eval_model) -> Answerer:
    return Answerer(eval_model)


@pytest.fixture(scope="module")
def reference_files(answerer, eval_model, eval_data, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per task (batch 3: the last batch is short)."""
    out = tmp_path_factory.mktemp("eval-pred")
    files = {}
    for task in ("coco", "mmmu", "textvqa"):
        files[task] = out / f"{task}.jsonl"
        summary = generate_predictions(eval_model, task, eval_data / task, files[task], batch=3,
                                       max_new_tokens=MAX_NEW, answerer=answerer)
        assert (summary.total, summary.generated, summary.already_done) == (SAMPLES, SAMPLES, 0)
    return files


@pytest.mark.parametrize("task", ["coco", "mmmu", "textvqa"])
def test_file_is_megatron_format_and_scores(task, reference_files, eval_data) -> None:
    path = reference_files[task]
    predictions = read_predictions(path, task)
    samples = list(read_benchmark(task, eval_data / task))
    assert [r["sample_id"] for r in predictions.records] == [s.sample_id for s in samples]
    assert predictions.duplicates_ignored == 0
    for record, sample in zip(predictions.records, samples):
        if task == "textvqa":
            assert record["gt_answer"] == sample.references and len(record["gt_answer"]) == 10
        if task == "mmmu":
            assert record["question_type"] == sample.metadata["question_type"]
            if record["question_type"] == "multiple-choice":
                assert record["index2ans"] == sample.metadata["index2ans"]
    text_field = {"coco": "caption", "mmmu": "prediction", "textvqa": "answer"}[task]
    assert any(r[text_field] for r in predictions.records)  # the model said something
    refs = scoring_references(task, eval_data / task)
    if task == "mmmu":  # the fixture's answer dict, as `neva eval score` takes it
        refs = {"answers": eval_data / "mmmu" / "answer_dict_val.json"}
    if task == "coco":
        pytest.importorskip("pycocoevalcap")
    scores = score(task, path, **refs)
    key = {"coco": "CIDEr", "mmmu": "accuracy", "textvqa": "accuracy"}[task]
    assert 0.0 <= scores[key] <= (1000.0 if task == "coco" else 100.0)


def test_generation_equals_one_sample_at_a_time(answerer, reference_files, eval_data) -> None:
    """Batching (left padding, short last batch) changes nothing: each answer equals the lone sample's."""
    samples = list(read_benchmark("textvqa", eval_data / "textvqa"))[:4]
    alone = [answerer.answer("textvqa", [s], MAX_NEW)[0] for s in samples]
    written = [r["answer"] for r in read_predictions(reference_files["textvqa"], "textvqa").records[:4]]
    assert written == alone


def test_killed_run_resumes_to_the_same_file(answerer, eval_model, eval_data, reference_files, tmp_path) -> None:
    out = tmp_path / "coco.jsonl"

    def kill_after_first_batch(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_predictions(eval_model, "coco", eval_data / "coco", out, batch=3, max_new_tokens=MAX_NEW,
                             answerer=answerer, on_batch=kill_after_first_batch)
    assert len(out.read_text().splitlines()) == 3
    with open(out, "a") as f:  # a kill in the middle of the next batch's write
        f.write('{"sample_id": 12, "capt')
    summary = generate_predictions(eval_model, "coco", eval_data / "coco", out, batch=3, max_new_tokens=MAX_NEW,
                                   answerer=answerer)
    assert (summary.already_done, summary.generated) == (3, SAMPLES - 3)
    assert out.read_bytes() == reference_files["coco"].read_bytes()
    again = generate_predictions(eval_model, "coco", eval_data / "coco", out, batch=3, max_new_tokens=MAX_NEW,
                                 answerer=answerer)
    assert (again.already_done, again.generated) == (SAMPLES, 0)
    assert out.read_bytes() == reference_files["coco"].read_bytes()


def test_other_task_or_settings_refused(answerer, eval_model, eval_data, reference_files, tmp_path) -> None:
    out = tmp_path / "pred.jsonl"
    out.write_bytes(reference_files["coco"].read_bytes())
    run_path(out).write_bytes(run_path(reference_files["coco"]).read_bytes())
    with pytest.raises(NevaError, match="task: file has 'coco', this run 'textvqa'"):
        generate_predictions(eval_model, "textvqa", eval_data / "textvqa", out, batch=3, max_new_tokens=MAX_NEW,
                             answerer=answerer)
    with pytest.raises(NevaError, match="max_new_tokens"):
        generate_predictions(eval_model, "coco", eval_data / "coco", out, batch=3, max_new_tokens=MAX_NEW + 1,
                             answerer=answerer)
    with file_lock(lock_path(out), "test"), pytest.raises(NevaError, match="another `neva eval generate` is writing"):
        generate_predictions(eval_model, "coco", eval_data / "coco", out, batch=3, max_new_tokens=MAX_NEW,
                             answerer=answerer)
    run_path(out).unlink()
    with pytest.raises(NevaError, match="not written by `neva eval generate`"):
        generate_predictions(eval_model, "coco", eval_data / "coco", out, batch=3, max_new_tokens=MAX_NEW,
                             answerer=answerer)


def test_other_model_refused(other_model, eval_data, reference_files, tmp_path) -> None:
    out = tmp_path / "pred.jsonl"
    out.write_bytes(reference_files["coco"].read_bytes())
    run_path(out).write_bytes(run_path(reference_files["coco"]).read_bytes())
    with pytest.raises(NevaError, match="model_digest"):
        generate_predictions(other_model, "coco", eval_data / "coco", out, batch=3, max_new_tokens=MAX_NEW)


def test_cli_limit_and_score(eval_model, eval_data, reference_files, tmp_path, capsys) -> None:
    out = tmp_path / "textvqa.jsonl"
    argv = ["eval", "generate", "--model", str(eval_model), "--task", "textvqa", "--data", str(eval_data / "textvqa"),
            "--out", str(out), "--batch", "3", "--limit", "5", "--max-new-tokens", str(MAX_NEW)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["total"], summary["generated"]) == (5, 5)
    reference = reference_files["textvqa"].read_text().splitlines()
    assert out.read_text().splitlines() == reference[:5]  # batches are the same consecutive samples
    assert main(["eval", "score", "--task", "textvqa", "--pred", str(out)]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    assert main(argv[:-4] + ["--batch", "0"]) == 2


def test_text_only_question_in_a_mixed_batch(answerer, eval_data) -> None:
    """An MMMU question without an image gets no image tokens (a blank row image) and answers as it would alone."""
    with_image, other = list(read_benchmark("mmmu", eval_data / "mmmu"))[:2]
    text_only = replace(other, images=[])
    mixed = answerer.answer("mmmu", [with_image, text_only], MAX_NEW)
    assert mixed == [answerer.answer("mmmu", [s], MAX_NEW)[0] for s in (with_image, text_only)]
