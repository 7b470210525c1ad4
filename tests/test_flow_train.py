"""The `neva` flow with training: `neva demo` on small fixtures (data, checkpoints, pretrain, finetune from the
pretrain output, export, held-out accuracy by transformers), its artifacts, run names and a fully cached rerun;
the training task's retries (a killed trainer resumes, refused input is not retried); the parameters as a
deployment run merges and validates them."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from pydantic import ValidationError
from train_support import EXTENSIONS, REPO

from flows.neva import neva, run_name
from neva_core.cli import main
from neva_core.config import PipelineConfig, TrainParams, preset_params
from neva_core.demo import demo_config, demo_fixtures
from neva_core.eval.heldout import heldout_captions, read_heldout
from neva_core.model.neva import Stage
from neva_core.model.trained import read_trained_config
from neva_core.train.config import TrainConfig
from tasks.train import train_task

pytestmark = pytest.mark.slow

IMAGES = 64
STEPS = {"--pretrain-steps": "12", "--finetune-steps": "24"}


@pytest.fixture(scope="module", autouse=True)
def trainer_environment():
    """DeepSpeed's CPU communication extension is built once and kept (as the other training tests do), and
    the trainer's INFO lines reach the task runs' logs on the server (the suite logs at WARNING)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))
    task_logger = logging.getLogger("prefect.task_runs")
    level = task_logger.level
    task_logger.setLevel(logging.INFO)
    yield
    task_logger.setLevel(level)


def demo_argv(workdir: Path) -> list[str]:
    return ["demo", "--workdir", str(workdir), "--images", str(IMAGES),
            *[part for item in STEPS.items() for part in item]]


def flow_runs() -> list:
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)


def task_runs(flow_run_id: object) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def final_task_runs(flow_run_id: object, timeout: float = 30.0) -> list:
    """The flow run's task runs once the server has every one's final state (it learns them asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = task_runs(flow_run_id)
        if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def artifacts_of(flow_run_id: object) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def log_messages(flow_run_id: object) -> list[str]:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def run_demo(workdir: Path) -> tuple[dict, str, object]:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main([*demo_argv(workdir), "--json"]) == 0
    result = json.loads(printed.getvalue())
    (latest, *_) = flow_runs()
    return result, printed.getvalue(), latest


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, object]:
    workdir = tmp_path_factory.mktemp("demo-train") / "demo"
    result, _, latest = run_demo(workdir)
    return workdir, result, latest


def test_demo_chains_every_stage_and_trains_finetune_from_pretrain(demo_run) -> None:
    workdir, result, latest = demo_run
    stages = {stage["stage"]: stage for stage in result["stages"]}
    assert list(stages)[-4:] == ["pretrain", "finetune", "export", "evaluate"]
    assert {stage["status"] for stage in result["stages"]} == {"ran"}
    assert latest.name == "demo-finetune-tiny-llama-tp1"
    pretrain, finetune = result["pretrain"], result["finetune"]
    assert (pretrain["step"], finetune["step"]) == (12, 24)
    _, settings, document = read_trained_config(finetune["final"])
    config = document["provenance"]["config"]
    assert (config["stage"], config["init"], settings.template) == ("finetune", pretrain["out"], "mistral")
    assert config["shards"] == result["finetune_shards"]["out_dir"] != result["shards"]["out_dir"]
    assert Path(result["export"]["path"], "config.json").is_file()
    assert stages["export"]["output"] == result["export"]["path"]
    assert stages["finetune"]["output"] == finetune["final"]
    assert 0.0 <= result["heldout_accuracy"] <= 1.0
    assert result["heldout_scores"]["accuracy"] == pytest.approx(100 * result["heldout_accuracy"])
    # The first evaluation of the finetuned model on the benchmark fixtures is promoted (nothing was before).
    evaluation = result["evaluation"]
    assert (evaluation["decision"], evaluation["model"]) == ("promoted", finetune["final"])
    assert set(evaluation["scores"]) >= {"coco/CIDEr", "mmmu/accuracy", "textvqa/accuracy"}
    assert Path(workdir, "evaluation", "finetune", "promoted", "model.json").is_file()
    assert all(name in (task.name.rsplit("-", 1)[0] for task in task_runs(latest.id))
               for name in ("train", "export"))


def test_training_leaves_progress_image_table_and_links(demo_run) -> None:
    _, result, latest = demo_run
    found = {artifact.key: artifact for artifact in artifacts_of(latest.id)}
    for stage in ("pretrain", "finetune"):
        assert found[f"neva-{stage}-progress"].type == "progress"
        assert found[f"neva-{stage}-progress"].data == 100.0
        assert found[f"neva-{stage}-loss"].type == "image"
        assert found[f"neva-{stage}-loss"].data.startswith("data:image/png;base64,")
        rows = {row["metric"]: row["value"] for row in json.loads(found[f"neva-{stage}-metrics"].data)}
        assert rows["steps"] == result[stage]["step"]
        assert rows["best val loss"] == round(result[stage]["best_val_loss"], 5)
        # Prefect stores a link artifact as markdown: [text](url).
        assert Path(result[stage]["final"]).as_uri() in found[f"neva-{stage}-output-model"].data.rsplit("(", 1)[1]
    assert found["evaluation-scores"].type == "table" and found["evaluation-samples"].type == "markdown"
    summary = found["neva-run-summary"].data
    assert "| finetune | ran |" in summary and "| export | ran |" in summary
    # The trainer's rank-0 lines are the train task runs' logs, under Prefect's task-run names.
    messages = log_messages(latest.id)
    assert any("finished at step 24" in message for message in messages)


def test_a_rerun_is_all_cached_and_prints_the_accuracy(demo_run, capsys: pytest.CaptureFixture[str]) -> None:
    workdir, result, _ = demo_run
    assert main(demo_argv(workdir)) == 0
    printed = capsys.readouterr().out
    (latest, *_) = flow_runs()
    assert {run.state_name for run in final_task_runs(latest.id)} == {"Cached"}
    lines = printed.strip().splitlines()
    assert lines[-4].startswith(f"{len(result['stages'])} stages: 0 ran, {len(result['stages'])} cached")
    assert lines[-3].startswith(f"accuracy: {result['heldout_accuracy']:.0%} ")
    assert lines[-2].startswith(f"held-out captions: CIDEr {result['heldout_scores']['CIDEr']:.1f}, ")
    assert lines[-1].startswith("benchmark fixtures: coco/BLEU-4 ") and lines[-1].endswith("(promoted)")


def test_heldout_captions_match_our_own_generation(demo_run) -> None:
    """transformers on the export (the independent reference) against neva's own generation on the trained
    folder: the same greedy answers to the same questions."""
    import torch

    from neva_core.data.preprocess import ImageProcessor
    from neva_core.data.text_tokenizer import load_text_tokenizer
    from neva_core.eval.benchmarks import ImageFiles
    from neva_core.generate import generate_answers
    from neva_core.model.trained import load_trained_model

    workdir, result, _ = demo_run
    fixtures = demo_fixtures(workdir, images=IMAGES, make=False)
    theirs = heldout_captions(Path(result["export"]["path"]), fixtures.heldout_json, fixtures.pretrain_zip, batch=5,
                              max_new_tokens=12)
    folder, settings, document = read_trained_config(result["finetune"]["final"])
    model = load_trained_model(folder).eval()
    processor = ImageProcessor.from_folder(folder / "vision", aspect=document["provenance"]["config"]["image_aspect"])
    paths, questions, truths = read_heldout(fixtures.heldout_json)
    files = ImageFiles(fixtures.pretrain_zip)
    images = torch.stack([processor(files.open(name)) for name in paths])
    with torch.no_grad():
        ours = generate_answers(model, load_text_tokenizer(folder / "tokenizer"), settings.template,
                                [f"<image>\n{q}" for q in questions], images, max_new_tokens=12)
    assert [answer.strip() for answer in ours] == theirs.answers
    assert theirs.truths == truths and theirs.accuracy == sum(t in a for t, a in zip(truths, ours)) / len(truths)
    assert len(theirs.answers) == 16


def probe_config(result: dict, out: Path, **changes) -> TrainConfig:
    values = dict(shards=Path(result["shards"]["out_dir"]), llm=Path(result["llm"]["path"]),
                  vision=Path(result["vision"]["dest"]), tokenizer=Path(result["tokenizer"]["out_dir"]), out=out,
                  stage="pretrain", template="plain", projector="mlp2x_gelu", max_length=64, max_steps=40,
                  micro_batch=4, global_batch=4, lr=1e-2, min_lr=1e-4, warmup_steps=2, dtype="fp32", zero=0,
                  save_every=4, val_every=0, log_every=1, seed=0)
    return TrainConfig(**(values | changes))


@flow(name="train-probe")
def train_probe(config: TrainConfig) -> dict:
    return train_task.with_options(retry_delay_seconds=0)(config)


def kill_trainer_after_checkpoint(out: Path, killed: list[int]) -> None:
    """SIGKILL the training worker of `out` once its first checkpoint is committed (mid-run)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "checkpoints" / "step-4").is_dir():
        time.sleep(0.01)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"neva_core.train.loop" in cmdline and any(str(out).encode() in part for part in cmdline):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))


def test_a_killed_trainer_is_retried_and_resumes(demo_run, tmp_path: Path) -> None:
    _, result, _ = demo_run
    out = tmp_path / "killed"
    killed: list[int] = []
    killer = threading.Thread(target=kill_trainer_after_checkpoint, args=(out, killed))
    killer.start()
    state = train_probe(probe_config(result, out), return_state=True)
    killer.join()
    assert killed, "the trainer finished before it could be killed"
    assert state.is_completed(), state.message
    assert state.result()["step"] == 40
    flow_run_id = state.state_details.flow_run_id
    (train_run,) = final_task_runs(flow_run_id)
    assert train_run.run_count == 2
    resumed = [message for message in log_messages(flow_run_id) if "resuming from step" in message]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 4


def test_refused_input_fails_at_once_without_a_retry(demo_run, tmp_path: Path) -> None:
    _, result, _ = demo_run
    # A tokenizer of another vocabulary than the checkpoint's: `neva train` exits 2 before starting a rank.
    config = probe_config(result, tmp_path / "refused", tokenizer=demo_fixtures(
        Path(result["shards"]["out_dir"]).parents[1], images=IMAGES, make=False).tokenizer_model.parent)
    state = train_probe(config, return_state=True)
    assert state.is_failed() and "refused" in state.message
    (train_run,) = final_task_runs(state.state_details.flow_run_id)
    assert train_run.run_count == 1
    assert not (tmp_path / "refused").exists()


def test_run_names_say_what_runs(tmp_path: Path) -> None:
    assert run_name(False, Stage.PRETRAIN, PipelineConfig()) == "pretrain-llama-2-7b-chat-tp1"
    tp4 = PipelineConfig.model_validate({"model": {"tp": 4}, "train": {
        "pretrain": preset_params("neva-llama2-7b-chat-tp4").model_dump(),
        "finetune": preset_params("llava-1.5-finetune", template="llama_2", global_batch=32,
                                  micro_batch=16).model_dump()}})
    assert run_name(False, "finetune", tp4) == "finetune-llama-2-7b-chat-tp4"
    assert run_name(False, "finetune", PipelineConfig(train=None)) == "data-llama-2-7b-chat-tp1"
    assert run_name(True, "pretrain", demo_config(tmp_path, make=False)) == "demo-pretrain-tiny-llama-tp1"


def test_a_run_override_of_one_nested_value_keeps_the_other_defaults() -> None:
    """As the server does for `prefect deployment run neva/pretrain --param config='{"model": {"tp": 4}}'`:
    run parameters replace the deployment's one level deep, then the flow's signature validates them."""
    import yaml

    deployment = next(d for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
                      if d["name"] == "pretrain")
    merged = {**deployment["parameters"], "config": {"model": {"tp": 4}, "train": None}}
    parameters = neva.validate_parameters(merged)
    config = parameters["config"]
    assert (parameters["stage"], parameters["demo"]) == (Stage.PRETRAIN, False)
    assert config.model.tp == 4 and config.model.llm_source == PipelineConfig().model.llm_source
    assert config.dataset == PipelineConfig().dataset and config.train is None
    # A nested model given whole replaces that model only: finetune's values, pretrain's preset.
    finetune = {"template": "llama_2", "max_steps": 100, "micro_batch": 16, "global_batch": 128, "lr": 2e-5,
                "nproc": 8}
    config = neva.validate_parameters({**merged, "config": {"train": {"finetune": finetune}}})["config"]
    assert config.train.finetune.max_steps == 100 and config.train.finetune.zero == TrainConfig.model_fields[
        "zero"].default
    assert config.train.pretrain == PipelineConfig().train.pretrain


def test_bad_training_parameters_fail_before_any_stage(tmp_path: Path) -> None:
    pretrain = PipelineConfig().train.pretrain.model_dump() | {"global_batch": 100}
    with pytest.raises(ValidationError, match=r"train\.pretrain .*--global-batch 100 is not micro-batch 32"):
        PipelineConfig(train={"pretrain": pretrain})
    with pytest.raises(ValidationError, match=r"model\.dtype 'fp16' cannot train"):
        PipelineConfig(model={"dtype": "fp16"})
    assert PipelineConfig(model={"dtype": "fp16"}, train=None).model.dtype == "fp16"
    with pytest.raises(ValidationError, match="unknown|Extra inputs"):
        TrainParams(**PipelineConfig().train.pretrain.model_dump(), out="x")
    state = neva(config={"workdir": str(tmp_path / "work"), "train": {"pretrain": pretrain}}, return_state=True)
    assert state.is_failed() and "global-batch 100" in state.message
    assert task_runs(state.state_details.flow_run_id) == [] and not (tmp_path / "work").exists()


def test_console_lines_name_the_task_run_they_come_from() -> None:
    """`neva run` and `neva demo` log through neva's root handler, which Prefect keeps: each task run's lines
    (the trainer's among them) still carry Prefect's task-run name, as Prefect's own console format does."""
    from prefect import task

    from neva_core.cli import RunLogFormatter
    from tasks.process import run_logger

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    @task(name="probe-lines")
    def probe_lines() -> None:
        run_logger().warning("INFO neva_core.train: step 3 loss 1.5")

    @flow(name="probe-lines-flow", flow_run_name="probe-run")
    def probe_flow() -> None:
        probe_lines()

    keep = Keep()
    logging.getLogger("prefect.task_runs").addHandler(keep)
    try:
        probe_flow()
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(keep)
    lines = [RunLogFormatter().format(record) for record in records]
    assert any(line.startswith("WARNING prefect.task_runs: task run 'probe-lines-")
               and line.endswith("': INFO neva_core.train: step 3 loss 1.5") for line in lines), lines
    assert RunLogFormatter().format(logging.makeLogRecord({"msg": "plain", "levelname": "INFO", "name": "neva"})) \
        == "INFO neva: plain"
