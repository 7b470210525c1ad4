"""The `neva` flow on Prefect's embedded server: real stages on the fixtures, caching, cache-hit checks."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.states import Failed
from pydantic import ValidationError

import neva_core.io
from flows.neva import neva, source_name
from neva_core.checkpoint.layout import load_native_rank, read_native_config, verify_native
from neva_core.cli import main
from neva_core.config import DatasetConfig, ModelConfig, PipelineConfig
from neva_core.demo import demo_config
from neva_core.data.shard_manifest import read_shard_manifest
from neva_core.errors import NevaError, TransientError
from download_support import FakeHub, FakeServer, isolate_hub_client
from neva_core.fixtures import Fixtures, load_fixtures
from neva_core.summary import StageOutcome, summary_markdown
from tasks.caching import retry_transient
from tasks.data import shard_task

pytestmark = pytest.mark.slow


def pipeline_config(fixtures: Fixtures, workdir: Path) -> PipelineConfig:
    return PipelineConfig(
        workdir=workdir,
        dataset=DatasetConfig(name="fixture", json_source=str(fixtures.pretrain_json),
                              images_source=str(fixtures.pretrain_zip), maxcount=16, val_fraction=0.1, workers=2),
        model=ModelConfig(llm_source=str(fixtures.llm_dir), vision_source=str(fixtures.vision_dir), tp=2,
                          dtype="fp32"),
        train=None,  # the data and checkpoint stages only
    )


def task_states(flow_run_id: object, expected: int = 0) -> dict[str, str]:
    """Each task's final state name in one flow run, by task name (e.g. {"shard": "Cached"})."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # The server learns task runs and their states asynchronously: wait until it has the `expected` task runs
    # (one per stage of the flow's own summary), each in a final state.
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            settled = len(runs) >= expected and all(run.state is not None and run.state.is_final() for run in runs)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    states: dict[str, str] = {}
    for run in runs:
        # download runs several times (json, zip, LLM, vision): record every state it ended in.
        name = run.name.rsplit("-", 1)[0]
        states[name] = ",".join(sorted(set(filter(None, [states.get(name), run.state.name]))))
    return states


def run_flow(config: PipelineConfig) -> tuple[dict, dict[str, str]]:
    state = neva(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    return result, task_states(state.state_details.flow_run_id, expected=len(result["stages"]))


def latest_flow_run_id() -> object:
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return latest.id


def latest_flow_run_states() -> dict[str, str]:
    return task_states(latest_flow_run_id())


def run_summary_of(flow_run_id: object) -> str:
    """The markdown of a flow run's run-summary artifact, read back from the server."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    (summary,) = [artifact.data for artifact in found if artifact.key == "neva-run-summary"]
    return summary


def without_stages(result: dict) -> dict:
    """A flow result less its stage summary (whose seconds and statuses differ from run to run)."""
    return {name: value for name, value in result.items() if name != "stages"}


def printed_stages(printed: str) -> list[list[str]]:
    """The stage lines of a printed summary, split into stage, status, seconds, output."""
    lines = printed.strip().splitlines()
    assert lines[0].split() == ["stage", "status", "seconds", "output"] and " stages: " in lines[-1]
    return [line.split(maxsplit=3) for line in lines[1:-1]]


def write_yaml(config: PipelineConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


@pytest.fixture(scope="module")
def first_run(neva_fixtures: Fixtures, tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, dict]:
    """The flow as a user starts it: `neva run CONFIG.yaml`."""
    root = tmp_path_factory.mktemp("flow")
    config = pipeline_config(neva_fixtures, root / "work")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["run", str(write_yaml(config, root / "pipeline.yaml")), "--json"]) == 0
    result = json.loads(printed.getvalue())
    assert latest_flow_run_states() == {name: "Completed" for name in ("download", "shard", "extend-tokenizer",
                                                                       "convert", "repartition")}
    stages = [StageOutcome(**stage) for stage in result["stages"]]
    assert {stage.status for stage in stages} == {"ran"}
    assert run_summary_of(latest_flow_run_id()) == summary_markdown(stages)
    return config, result


def test_flow_produces_every_stage_output(first_run: tuple[PipelineConfig, dict]) -> None:
    config, result = first_run
    manifest = read_shard_manifest(result["shards"]["out_dir"], deep=True)
    assert manifest["written"] + manifest["skipped"] == manifest["records"] == 64
    assert result["tokenizer"]["vocab_size"] == 392
    native = Path(result["llm"]["path"])
    assert native.parent == config.workdir / "checkpoints" / "tiny-llama"
    assert native.name.startswith("native-tpn-")
    llm_config, meta = read_native_config(native)
    assert (meta["tp"], llm_config.vocab_size, llm_config.padded_vocab_size) == (2, 392, 512)
    rank1 = load_native_rank(native, 1)
    assert rank1["embedding.word_embeddings.weight"].shape == (256, llm_config.hidden_size)
    assert Path(result["vision"]["dest"], "model.safetensors").is_file()


def test_second_run_is_served_from_cache(first_run: tuple[PipelineConfig, dict]) -> None:
    config, result = first_run
    again, states = run_flow(config)
    assert set(states.values()) == {"Cached"}
    assert without_stages(again) == without_stages(result)
    assert [(stage["stage"], stage["status"]) for stage in again["stages"]] == [
        (stage["stage"], "cached") for stage in result["stages"]]


def test_run_command_prints_the_stage_summary_and_a_cached_run_has_one_too(
    first_run: tuple[PipelineConfig, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, result = first_run
    assert main(["run", str(write_yaml(config, tmp_path / "pipeline.yaml"))]) == 0
    rows = printed_stages(capsys.readouterr().out)
    assert [(stage, status, output) for stage, status, _, output in rows] == [
        (stage["stage"], "cached", stage["output"]) for stage in result["stages"]]
    summary = run_summary_of(latest_flow_run_id())
    for stage, status, seconds, output in rows:
        assert f"| {stage} | {status} | {seconds} | `{output}` |" in summary


def test_deleted_output_is_rebuilt_not_trusted(first_run: tuple[PipelineConfig, dict]) -> None:
    config, result = first_run
    shutil.rmtree(result["llm"]["path"])
    (Path(result["shards"]["out_dir"]) / "manifest.json").unlink()
    again, states = run_flow(config)
    assert states["repartition"] == "Completed" and states["shard"] == "Completed"
    assert states["convert"] == "Cached"
    read_shard_manifest(again["shards"]["out_dir"])
    assert again["llm"]["manifest_sha256"] == result["llm"]["manifest_sha256"]


def test_changed_parameters_in_the_same_workdir_recompute_and_keep_the_old_outputs(
    first_run: tuple[PipelineConfig, dict]
) -> None:
    config, before = first_run
    before_shards = read_shard_manifest(before["shards"]["out_dir"], deep=True)
    dataset = config.dataset.model_copy(update={"maxcount": 8, "unzip": True})
    model = config.model.model_copy(update={"special_tokens": (*config.model.special_tokens, "<extra_id_8>"),
                                            "dtype": "bf16"})
    changed = config.model_copy(update={"dataset": dataset, "model": model})
    after, states = run_flow(changed)
    stages = ("shard", "unzip", "extend-tokenizer", "convert", "repartition")
    assert {name: states[name] for name in stages} == {name: "Completed" for name in stages}
    assert read_shard_manifest(after["shards"]["out_dir"])["params"]["maxcount"] == 8
    assert after["tokenizer"]["vocab_size"] == 393
    llm_config, meta = read_native_config(after["llm"]["path"])
    assert (llm_config.vocab_size, meta["dtype"]) == (393, "bf16")
    assert len(list((config.workdir / "images").glob("fixture-*/**/*.jpg"))) >= 64
    # The first run's outputs are untouched: what its result points at is still whole and the same.
    assert read_shard_manifest(before["shards"]["out_dir"], deep=True) == before_shards
    verify_native(before["llm"]["path"])
    assert read_native_config(before["llm"]["path"])[0].vocab_size == 392
    # Back to the first parameters: served from the cache, since those outputs were kept; keeping one
    # output per stage then removes the other run's.
    _, states = run_flow(config.model_copy(update={"keep_outputs": 1}))
    assert states["shard"] == states["convert"] == "Cached"
    assert [p.name for p in (config.workdir / "shards").iterdir() if not p.name.startswith(".")] == [
        Path(before["shards"]["out_dir"]).name]
    assert not Path(after["llm"]["path"]).exists() and not Path(after["tokenizer"]["out_dir"]).exists()


def test_concurrent_runs_of_one_config_build_each_output_once_under_the_runs_cwd(
    neva_fixtures: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = pipeline_config(neva_fixtures, Path("work")).model_copy(update={"model": None})
    config = config.model_copy(update={"dataset": config.dataset.model_copy(update={"unzip": True})})
    assert config.workdir == Path("work")  # a relative workdir stays relative until a run resolves it
    monkeypatch.chdir(tmp_path)
    published: Counter[str] = Counter()
    publish = neva_core.io._publish

    def counting_publish(tmp: Path, dest: Path) -> None:
        published[str(dest)] += 1
        publish(tmp, dest)

    monkeypatch.setattr(neva_core.io, "_publish", counting_publish)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(neva(config=config))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0]["shards"]["out_dir"] == results[1]["shards"]["out_dir"]
    shards = Path(results[0]["shards"]["out_dir"])
    assert shards.parent == tmp_path / "work" / "shards"
    (unzipped,) = [p for p in (tmp_path / "work" / "images").iterdir() if not p.name.startswith(".")]
    # Each stage built once: the other run waited on the output's lock and reused it, or hit the cache.
    assert published == {str(shards): 1, str(unzipped): 1}


def test_offline_rerun_and_a_new_llm_revision(
    neva_fixtures: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_hub_client(monkeypatch)
    files = {p.relative_to(neva_fixtures.llm_dir).as_posix(): p.read_bytes()
             for p in neva_fixtures.llm_dir.rglob("*") if p.is_file()}
    with FakeServer() as server:
        hub = FakeHub(server)
        repo = hub.add_repo("org/tiny-llama", files, lfs={"model.safetensors", "tokenizer.model"})
        first_commit = repo.branches["main"]
        weights = bytearray(files["model.safetensors"])
        weights[-1] ^= 0x01  # other weights, same layout: a new revision of the model
        second_commit = hub.commit(repo, {**files, "model.safetensors": bytes(weights)})
        config = pipeline_config(neva_fixtures, tmp_path / "work")
        model = config.model.model_copy(update={"llm_source": f"hf://org/tiny-llama@{first_commit}"})
        config = config.model_copy(update={"model": model, "hf_endpoint": hub.endpoint})
        online, _ = run_flow(config)
        assert read_native_config(online["llm"]["path"])[1]["source"]["commit"] == first_commit

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        requests = len(server.requests)
        offline, states = run_flow(config)
        assert set(states.values()) == {"Cached"} and without_stages(offline) == without_stages(online)
        assert len(server.requests) == requests  # the cache keys came from the recorded commit
        monkeypatch.delenv("HF_HUB_OFFLINE")

        model = model.model_copy(update={"llm_source": f"hf://org/tiny-llama@{second_commit}"})
        newer, states = run_flow(config.model_copy(update={"model": model}))
    assert states["convert"] == states["repartition"] == "Completed"
    assert read_native_config(newer["llm"]["path"])[1]["source"]["commit"] == second_commit
    assert newer["llm"]["manifest_sha256"] != online["llm"]["manifest_sha256"]
    verify_native(online["llm"]["path"])  # the first revision's checkpoint is still whole


def test_demo_with_other_images_against_an_existing_demo_folder(
    neva_fixtures: Fixtures, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = tmp_path / "demo" / "fixtures" / "seed0-images64"  # what `neva demo --images 64` left there
    shutil.copytree(neva_fixtures.root, earlier)
    # The demo's configuration without its training (tests/test_flow_train.py runs `neva demo` itself).
    config = demo_config(tmp_path / "demo", images=16, tp=1).model_copy(update={"train": None, "evaluation": None})
    result, _ = run_flow(config)
    rows = {stage["stage"]: (stage["status"], stage["output"]) for stage in result["stages"]}
    assert list(rows) == ["download-json", "download-images", "shard", "download-llm", "download-vision",
                          "extend-tokenizer", "convert"]  # tp 1: nothing to repartition
    assert {status for status, _ in rows.values()} == {"ran"}
    assert read_shard_manifest(rows["shard"][1])["records"] == 16
    assert load_fixtures(earlier).pretrain_json.is_file()


def test_run_command_names_the_bad_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  maxcount: 0\n  colour: red\nmodel:\n  vision_source: 'hf://'\n")
    assert main(["run", str(bad)]) == 2
    message = capsys.readouterr().err
    for key in ("dataset.maxcount", "dataset.colour", "model.vision_source"):
        assert key in message
    bad.write_text("- just\n- a list\n")
    assert main(["run", str(bad)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_a_tp_size_the_model_cannot_take_fails_before_conversion(
    neva_fixtures: Fixtures, tmp_path: Path
) -> None:
    config = pipeline_config(neva_fixtures, tmp_path / "work")
    config = config.model_copy(update={"model": config.model.model_copy(update={"tp": 3})})
    state = neva(config=config, return_state=True)
    assert state.is_failed() and "model.tp=3 does not fit" in state.message
    assert not list((tmp_path / "work" / "checkpoints" / "tiny-llama").glob("native-*"))
    assert not list((tmp_path / "work" / "checkpoints" / "tiny-llama").glob("tokenizer-*"))


def test_only_transient_failures_are_retried() -> None:
    assert retry_transient(None, None, Failed(data=TransientError("connection dropped")))
    assert not retry_transient(None, None, Failed(data=NevaError("bad record")))


def test_tasks_run_without_prefect(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    result = shard_task.fn(neva_fixtures.pretrain_json, neva_fixtures.pretrain_zip, tmp_path / "shards", maxcount=32)
    assert result["written"] == 64


def test_source_names() -> None:
    assert source_name("hf://meta-llama/Llama-2-7b-chat-hf@main") == "Llama-2-7b-chat-hf"
    assert source_name("/data/models/tiny-llama/") == "tiny-llama"


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="json_source\n.*hf://"):
        DatasetConfig(json_source="hf://")
    with pytest.raises(ValueError):
        ModelConfig(tp=0)
    with pytest.raises(ValueError):
        PipelineConfig(workdir=tmp_path, unknown_field=1)
