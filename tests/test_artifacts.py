"""Artifacts written through Prefect's embedded server and read back through its client."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image
from prefect import flow, task
from prefect.cache_policies import INPUTS
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from neva_core.errors import NevaError
from neva_core.summary import StageOutcome, png_data_uri, summary_markdown, summary_text
from tasks.artifacts import (
    StageLog,
    TrainingProgress,
    artifact_key,
    loss_curve_artifact,
    metrics_table_artifact,
    output_link_artifacts,
    run_summary_artifact,
)

pytestmark = pytest.mark.slow


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@task(name="train", cache_policy=INPUTS)
def fake_training(token: str, out: Path) -> str:
    progress = TrainingProgress(4, key="train-progress", description="pretrain")
    for step in (1, 2, 4):
        progress.update(step)
    loss_curve_artifact(tiny_png(), key="loss-curve")
    metrics_table_artifact({"best val loss": 1.25, "step": 4, "samples/s": 12.5}, key="train-metrics")
    output_link_artifacts({"checkpoint": out, "export": "https://example.org/model"}, key_prefix="train")
    return str(out)


@flow(name="artifacts-probe")
def probe(token: str, out: Path) -> list[StageOutcome]:
    stages = StageLog()
    stages.call(fake_training, token, out)
    run_summary_artifact(stages.outcomes)
    return stages.outcomes


def artifacts_of(flow_run_id: uuid.UUID) -> dict[str, list]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_type: dict[str, list] = {}
    for artifact in found:
        by_type.setdefault(artifact.type, []).append(artifact)
    return by_type


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list:
    token, out = uuid.uuid4().hex, tmp_path_factory.mktemp("artifacts") / "checkpoint"
    return [probe(token, out, return_state=True) for _ in range(2)]


def test_training_artifacts_read_back(two_runs: list) -> None:
    first = artifacts_of(two_runs[0].state_details.flow_run_id)
    (progress,) = first["progress"]
    assert (progress.key, progress.data, progress.description) == ("train-progress", 100.0, "step 4 of 4")
    (image,) = first["image"]
    assert image.key == "loss-curve"
    assert base64.b64decode(image.data.removeprefix("data:image/png;base64,")) == tiny_png()
    (table,) = first["table"]
    assert json.loads(table.data) == [{"metric": "best val loss", "value": 1.25}, {"metric": "step", "value": 4},
                                      {"metric": "samples/s", "value": 12.5}]
    # Prefect stores a link artifact as markdown.
    links = {artifact.key: artifact.data for artifact in first["markdown"] if artifact.key.startswith("train-")}
    assert links["train-checkpoint"].startswith("[checkpoint: ") and "(file:///" in links["train-checkpoint"]
    assert links["train-export"].endswith("(https://example.org/model)")


def test_every_run_has_a_summary_and_a_cached_rerun_says_cached(two_runs: list) -> None:
    first, second = (artifacts_of(state.state_details.flow_run_id) for state in two_runs)
    outcomes = [state.result() for state in two_runs]
    assert [[(o.stage, o.status) for o in run] for run in outcomes] == [[("train", "ran")], [("train", "cached")]]
    assert outcomes[0][0].output.endswith("checkpoint") and outcomes[0][0].seconds > 0
    for artifacts, run in zip((first, second), outcomes):
        (summary,) = [artifact for artifact in artifacts["markdown"] if artifact.key == "neva-run-summary"]
        assert summary.data == summary_markdown(run)
    # A cached task does not recreate its artifacts; only the flow's own summary is new.
    assert [artifact.key for artifacts in second.values() for artifact in artifacts] == ["neva-run-summary"]


def test_summary_renderings() -> None:
    outcomes = [StageOutcome("shard-0", "ran", 3.25, "/w/shards/a"), StageOutcome("convert-0", "cached", 0.04)]
    assert summary_text(outcomes).splitlines() == [
        "stage      status  seconds  output",
        "shard-0    ran     3.2      /w/shards/a",
        "convert-0  cached  0.0",
        "2 stages: 1 ran, 1 cached, 3.3 s in stages",
    ]
    markdown = summary_markdown(outcomes)
    assert "| shard-0 | ran | 3.2 | `/w/shards/a` |" in markdown and "| convert-0 | cached | 0.0 | |" in markdown


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(NevaError, match="not a PNG"):
        png_data_uri(b"GIF89a")
    assert artifact_key("Pretrain llama_2 7B", "TP4") == "pretrain-llama-2-7b-tp4"
