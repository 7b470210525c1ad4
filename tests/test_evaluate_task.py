"""The `evaluate` task in a Prefect flow on the eval fixtures: its artifacts read back through the client, the
regression guard night after night with a deliberately worse model, a better and an equal one promoted, the
rerun of a promoted model Cached; plus the config, the cache's re-judging and the demo's caption scores."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from pydantic import ValidationError

from neva_core.errors import NevaError
from neva_core.eval.captions import caption_scores
from neva_core.eval.coco import plain_tokens
from neva_core.eval.fixtures import make_coco_fixture, make_mmmu_fixture, make_textvqa_fixture
from neva_core.eval.generate import generate_predictions, model_digest
from neva_core.eval.guard import HISTORY, check_recorded_decision, read_history, read_promoted, record_run
from neva_core.eval.predictions import read_predictions
from neva_core.eval.settings import EvaluationConfig
from tasks.evaluate import evaluate_task

pytest_plugins = ("eval_support",)  # eval_model (the good one here), other_model (the worse one)
pytestmark = pytest.mark.slow
MAX_NEW = 6


@flow(name="evaluate-probe")
def probe(model_dir: Path, evaluation: EvaluationConfig, workdir: Path, run_id: str) -> tuple[str, object]:
    state = evaluate_task(model_dir, evaluation, workdir, run_id, return_state=True)
    return state.name, state.result(raise_on_failure=False)


def run_night(model: Path, evaluation: EvaluationConfig, workdir: Path, run_id: str) -> dict:
    flow_state = probe(model, evaluation, workdir, run_id, return_state=True)
    name, result = flow_state.result()
    return {"state": name, "result": result, "flow_run_id": flow_state.state_details.flow_run_id}


def artifacts_of(flow_run_id: uuid.UUID) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found}


@pytest.fixture(scope="module")
def benchmarks(eval_model, tmp_path_factory) -> dict[str, Path]:
    """COCO and TextVQA fixtures whose references are eval_model's own answers: it scores best on both."""
    root = tmp_path_factory.mktemp("evaluate-bench")
    folders = {"coco": root / "coco", "textvqa": root / "textvqa"}
    make_coco_fixture(folders["coco"], samples=4)
    make_textvqa_fixture(folders["textvqa"], samples=4)
    answers = {}
    for task, field in (("coco", "caption"), ("textvqa", "answer")):
        probe_file = root / f"probe-{task}.jsonl"
        generate_predictions(eval_model, task, folders[task], probe_file, batch=4, max_new_tokens=MAX_NEW)
        answers[task] = {r["sample_id"]: r[field] for r in read_predictions(probe_file, task).records}
    gt_path = folders["coco"] / "coco_karpathy_test_gt.json"
    truth = json.loads(gt_path.read_text())
    for annotation in truth["annotations"]:
        annotation["caption"] = answers["coco"][annotation["image_id"]]
    gt_path.write_text(json.dumps(truth))
    vqa_path = folders["textvqa"] / "TextVQA_0.5.1_val.json"
    truth = json.loads(vqa_path.read_text())
    for record in truth["data"]:
        record["answers"] = [answers["textvqa"][record["question_id"]]] * 10
    vqa_path.write_text(json.dumps(truth))
    return folders


@pytest.fixture(scope="module")
def equal_model(eval_native_llm, neva_fixtures, neva_tokenizer, tmp_path_factory) -> Path:
    """eval_model's weights in another folder with another identity (a retrained copy)."""
    from eval_support import build_trained_model

    return build_trained_model(tmp_path_factory.mktemp("equal-model") / "model", eval_native_llm, neva_fixtures,
                               neva_tokenizer, projector_seed=7, stage="test, retrained copy")


@pytest.fixture(scope="module")
def nights(benchmarks, eval_model, other_model, equal_model, tmp_path_factory) -> dict:
    evaluation = EvaluationConfig(benchmarks=benchmarks, batch=4, max_new_tokens=MAX_NEW,
                                  tolerance={"textvqa/accuracy": 1.0})
    work = tmp_path_factory.mktemp("evaluate-work") / "work"
    plan = [("night-1", other_model), ("night-2", eval_model), ("night-3", eval_model), ("night-4", other_model),
            ("night-5", equal_model)]
    plan += [("night-6", eval_model), ("night-7", eval_model)]
    runs = {}
    for run_id, model in plan:
        if run_id == "night-7":  # new benchmark data (a newer file): a new evaluation
            vqa = benchmarks["textvqa"] / "TextVQA_0.5.1_val.json"
            os.utime(vqa, ns=(vqa.stat().st_atime_ns, vqa.stat().st_mtime_ns + 1_000_000_000))
        runs[run_id] = run_night(model, evaluation, work, run_id)
        runs[run_id]["promoted_after"] = read_promoted(work)
    return {"work": work, "runs": runs, "evaluation": evaluation}


def test_better_model_is_promoted_and_artifacts_show_it(nights, eval_model, other_model, benchmarks) -> None:
    first, second = nights["runs"]["night-1"], nights["runs"]["night-2"]
    assert (first["state"], first["result"]["decision"]) == ("Completed", "promoted")
    assert first["promoted_after"]["source"] == str(other_model.resolve())
    assert (second["state"], second["result"]["decision"]) == ("Completed", "promoted")
    assert second["result"]["baseline_run_id"] == "night-1"
    assert second["result"]["scores"]["textvqa/accuracy"] == 100.0
    assert second["result"]["scores"]["textvqa/accuracy"] > first["result"]["scores"]["textvqa/accuracy"]
    assert second["promoted_after"]["source"] == str(eval_model.resolve())
    assert second["promoted_after"]["model_digest"] == model_digest(eval_model)
    assert model_digest(Path(second["promoted_after"]["model"])) == model_digest(eval_model)  # its own copy

    artifacts = artifacts_of(second["flow_run_id"])
    assert set(artifacts) == {"evaluation-scores", "evaluation-samples", "promoted-model"}
    rows = {(r["task"], r["metric"]): r for r in json.loads(artifacts["evaluation-scores"].data)}
    expected = second["result"]["results"]
    assert rows["textvqa", "accuracy"]["score"] == 100.0 and rows["textvqa", "samples"]["score"] == 4
    assert rows["coco", "CIDEr"]["score"] == round(expected["coco"]["CIDEr"], 4)
    baseline = first["result"]["scores"]
    assert rows["textvqa", "accuracy"]["promoted"] == round(baseline["textvqa/accuracy"], 4)
    assert rows["coco", "CIDEr"]["change"] == round(expected["coco"]["CIDEr"] - baseline["coco/CIDEr"], 4)
    assert not any(r["regression"] for r in rows.values())

    samples = artifacts["evaluation-samples"].data
    uris = [part.split(")", 1)[0] for part in samples.split("](data:image/jpeg;base64,")[1:]]
    assert len(uris) == 6  # 3 per benchmark
    assert all(base64.b64decode(uri).startswith(b"\xff\xd8") and len(uri) < 20_000 for uri in uris)
    for task, field in (("coco", "caption"), ("textvqa", "answer")):
        records = read_predictions(Path(second["result"]["predictions"][task]), task).records
        for record in records[:3]:  # the generation, and beside it its reference (here: the same text)
            text = " ".join(record[field].split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            assert f"| {text or '(empty)'} | {text}" in samples
    assert "What colour is the shape?" in samples or "Which shape is drawn" in samples
    promoted = artifacts["promoted-model"].data
    assert "run night-2" in promoted and str(eval_model.resolve()) in promoted


def test_rerun_of_the_promoted_model_is_cached(nights) -> None:
    rerun = nights["runs"]["night-3"]
    assert rerun["state"] == "Cached"
    assert rerun["result"]["run_id"] == "night-2"  # the run whose history line holds these scores
    assert rerun["result"] == nights["runs"]["night-2"]["result"] | {"promoted": rerun["result"]["promoted"]}
    assert artifacts_of(rerun["flow_run_id"]) == {}  # a cached task writes nothing
    assert "night-3" not in [r["run_id"] for r in read_history(nights["work"])]
    assert not (nights["work"] / "eval" / "night-3").exists()


def test_worse_model_fails_the_task_and_the_previous_model_stays(nights, eval_model, other_model) -> None:
    worse = nights["runs"]["night-4"]
    assert worse["state"] == "Failed" and isinstance(worse["result"], NevaError)
    message = str(worse["result"])
    drop = 100.0 - nights["runs"]["night-1"]["result"]["scores"]["textvqa/accuracy"]
    assert "textvqa/accuracy" in message and "night-2" in message and f"a drop of {drop:.2f} points" in message
    assert f"(from {eval_model.resolve()}) stays the promoted model" in message
    assert worse["promoted_after"]["run_id"] == "night-2"
    assert worse["promoted_after"]["source"] == str(eval_model.resolve())
    recorded = read_history(nights["work"])[2]
    assert (recorded["run_id"], recorded["decision"], recorded["baseline_run_id"]) == ("night-4", "regression",
                                                                                      "night-2")
    assert recorded["model"] == str(other_model.resolve()) and "textvqa/accuracy" in recorded["regressions"]
    rows = {(r["task"], r["metric"]): r for r in json.loads(artifacts_of(worse["flow_run_id"])
                                                            ["evaluation-scores"].data)}
    assert rows["textvqa", "accuracy"]["regression"] is True


def test_equal_model_is_promoted(nights, equal_model, eval_model) -> None:
    equal = nights["runs"]["night-5"]
    assert model_digest(equal_model) != model_digest(eval_model)
    assert (equal["state"], equal["result"]["decision"]) == ("Completed", "promoted")
    assert equal["result"]["scores"] == nights["runs"]["night-2"]["result"]["scores"]
    assert equal["promoted_after"]["source"] == str(equal_model.resolve())
    assert [(r["run_id"], r["decision"]) for r in read_history(nights["work"])][:4] == [
        ("night-1", "promoted"), ("night-2", "promoted"), ("night-4", "regression"), ("night-5", "promoted")]


def test_cache_hit_is_dropped_when_the_decision_is_stale_or_the_data_changed(nights, eval_model) -> None:
    """night-6: night-2's cached "promoted" no longer holds (the equal copy was promoted since), so it runs
    and is promoted again; night-7: the same model after the benchmark data changed runs again."""
    stale, new_data = nights["runs"]["night-6"], nights["runs"]["night-7"]
    assert (stale["state"], stale["result"]["run_id"], stale["result"]["decision"]) == ("Completed", "night-6",
                                                                                         "promoted")
    assert stale["promoted_after"]["source"] == str(eval_model.resolve())
    assert (new_data["state"], new_data["result"]["run_id"]) == ("Completed", "night-7")
    assert [r["run_id"] for r in read_history(nights["work"])][4:] == ["night-6", "night-7"]


def test_guard_off_scores_without_history(eval_model, tmp_path) -> None:
    bench = tmp_path / "mmmu"
    make_mmmu_fixture(bench, samples=4)
    evaluation = EvaluationConfig(benchmarks={"mmmu": bench}, batch=4, max_new_tokens=MAX_NEW, guard=False)
    night = run_night(eval_model, evaluation, tmp_path / "work", "adhoc")
    assert night["state"] == "Completed" and night["result"]["decision"] is None
    assert night["result"]["scores"] == {"mmmu/accuracy": night["result"]["results"]["mmmu"]["accuracy"]}
    assert not (tmp_path / "work" / HISTORY).exists() and read_promoted(tmp_path / "work") is None
    artifacts = artifacts_of(night["flow_run_id"])
    assert set(artifacts) == {"evaluation-scores", "evaluation-samples"}
    assert {r["metric"] for r in json.loads(artifacts["evaluation-scores"].data)} >= {"accuracy", "samples"}
    assert "## mmmu" in artifacts["evaluation-samples"].data


def test_cached_decision_is_rejudged(eval_model, other_model, tmp_path) -> None:
    """What a cache hit must still satisfy: its history line, and its decision against today's promoted model."""
    work = tmp_path / "work"
    good, bad = model_digest(eval_model), model_digest(other_model)
    record_run(work, "n1", other_model, {"coco/CIDEr": 80.0}, tolerance=1.0)
    check_recorded_decision(work, "n1", bad, {"coco/CIDEr": 80.0}, "promoted", 1.0)
    with pytest.raises(NevaError, match="not in"):
        check_recorded_decision(work, "n0", bad, {"coco/CIDEr": 80.0}, "promoted", 1.0)
    record_run(work, "n2", eval_model, {"coco/CIDEr": 90.0}, tolerance=1.0)
    with pytest.raises(NevaError, match="no longer the promoted one"):
        check_recorded_decision(work, "n1", bad, {"coco/CIDEr": 80.0}, "promoted", 1.0)
    record_run(work, "n3", other_model, {"coco/CIDEr": 89.5}, tolerance=1.0)
    check_recorded_decision(work, "n3", bad, {"coco/CIDEr": 89.5}, "kept", 1.0)
    record_run(work, "n4", eval_model, {"coco/CIDEr": 95.0}, tolerance=1.0)  # the bar rises: kept is stale
    with pytest.raises(NevaError, match="today it would be 'regression'"):
        check_recorded_decision(work, "n3", bad, {"coco/CIDEr": 89.5}, "kept", 1.0)
    check_recorded_decision(work, "n4", good, {"coco/CIDEr": 95.0}, "promoted", 1.0)


def test_evaluation_config_is_strict(tmp_path) -> None:
    config = EvaluationConfig(benchmarks={"coco": tmp_path}, tolerance={"CIDEr": 2.0, "coco/BLEU-4": 1.0})
    assert (config.limit, config.batch, config.max_new_tokens, config.guard) == (None, 8, None, True)
    for bad in ({"benchmarks": {}}, {"benchmarks": {"vqav2": tmp_path}}, {"benchmarks": {"coco": tmp_path}, "lim": 1},
                {"benchmarks": {"coco": tmp_path}, "batch": 0}, {"benchmarks": {"coco": tmp_path}, "tolerance": -1},
                {"benchmarks": {"coco": tmp_path}, "tolerance": {"accuracy": 1.0}},
                {"benchmarks": {"coco": tmp_path}, "tolerance": {"CIDEr": -0.5}}):
        with pytest.raises(ValidationError):
            EvaluationConfig(**bad)
    with pytest.raises(ValidationError, match="no benchmark here is judged on"):
        EvaluationConfig(benchmarks={"mmmu": tmp_path}, tolerance={"textvqa/accuracy": 1.0})


def test_missing_benchmark_folder_and_bad_run_id_are_named(eval_model, tmp_path) -> None:
    evaluation = EvaluationConfig(benchmarks={"textvqa": tmp_path / "nowhere"})
    with pytest.raises(NevaError, match="evaluation.benchmarks.textvqa: .*nowhere is not a folder"):
        evaluate_task.fn(eval_model, evaluation, tmp_path / "work", "x")
    with pytest.raises(NevaError, match="run id '../x' must be letters"):
        evaluate_task.fn(eval_model, evaluation.model_copy(update={"benchmarks": {"textvqa": tmp_path}}),
                         tmp_path / "work", "../x")


def test_caption_scores_of_the_demo() -> None:
    pytest.importorskip("pycocoevalcap")
    answers = ["A red circle.", "a blue square on grey", "a green star"]
    truths = ["a red circle", "a blue square", "a red triangle"]
    scores = caption_scores(answers, truths)
    assert scores["accuracy"] == pytest.approx(100 * 1 / 3)  # "A red circle." does not contain "a red circle"
    assert scores["samples"] == 3 and 0 < scores["CIDEr"] and 0 < scores["ROUGE-L"] < 100
    perfect = caption_scores(truths, truths)
    assert perfect["accuracy"] == 100.0 and perfect["ROUGE-L"] == pytest.approx(100.0)
    assert perfect["CIDEr"] > scores["CIDEr"]
    with pytest.raises(NevaError, match="one answer per caption"):
        caption_scores(["a"], [])


def test_plain_tokens_equal_the_ptb_tokenizer_on_demo_captions(monkeypatch) -> None:
    """Without Java the demo's captions are tokenised by plain_tokens: same tokens, same scores as PTB's."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from neva_core.eval.fixtures import _CAPTION_FORMS
    from neva_core.fixtures.images import COLOURS, SHAPES, caption_for

    captions = [caption_for(c, s) for c in COLOURS for s in SHAPES]
    captions += [form.format(colour=c, shape=s).capitalize() + "." for form in _CAPTION_FORMS
                 for c in list(COLOURS)[:2] for s in SHAPES[:2]]
    captions += ["A RED circle...", "a red circle, on grey!", "the  blue square;  drawn: here?", "3.5 shapes", ""]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [plain_tokens(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]

    answers = ["a red circle", "A blue square.", "a green star on grey", "a blue circle"]
    truths = [caption_for(c, s) for c, s in zip(COLOURS, SHAPES)] + ["a red circle"]
    with_java = caption_scores(answers, truths)
    monkeypatch.setattr("shutil.which", lambda name: None)
    without = caption_scores(answers, truths)
    assert with_java["tokenizer"].startswith("pycocoevalcap") and without["tokenizer"].startswith("plain")
    assert {k: v for k, v in without.items() if k != "tokenizer"} == \
        pytest.approx({k: v for k, v in with_java.items() if k != "tokenizer"})
