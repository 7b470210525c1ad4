"""The `neva` flow on Prefect's embedded server: real stages on the fixtures, caching, cache-hit checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Failed

from flows.neva import neva, source_name
from neva_core.checkpoint.layout import load_native_rank, read_native_config
from neva_core.config import DatasetConfig, ModelConfig, PipelineConfig
from neva_core.data.shards import read_shard_manifest
from neva_core.errors import NevaError, TransientError
from neva_core.fixtures import Fixtures
from tasks.caching import retry_transient
from tasks.data import hub_token, shard_task

pytestmark = pytest.mark.slow


def pipeline_config(fixtures: Fixtures, workdir: Path) -> PipelineConfig:
    return PipelineConfig(
        workdir=workdir,
        dataset=DatasetConfig(name="fixture", json_source=str(fixtures.pretrain_json),
                              images_source=str(fixtures.pretrain_zip), maxcount=16, val_fraction=0.1, workers=2),
        model=ModelConfig(llm_source=str(fixtures.llm_dir), vision_source=str(fixtures.vision_dir), tp=2,
                          dtype="fp32"),
    )


def task_states(flow_run_id: object) -> dict[str, str]:
    """Each task's final state name in one flow run, by task name (e.g. {"shard": "Cached"})."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, str] = {}
    for run in runs:
        # download runs several times (json, zip, LLM, vision): record every state it ended in.
        name = run.name.rsplit("-", 1)[0]
        states[name] = ",".join(sorted(set(filter(None, [states.get(name), run.state.name]))))
    return states


def run_flow(config: PipelineConfig) -> tuple[dict, dict[str, str]]:
    state = neva(config, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def first_run(neva_fixtures: Fixtures, tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, dict]:
    config = pipeline_config(neva_fixtures, tmp_path_factory.mktemp("flow") / "work")
    result, states = run_flow(config)
    assert states == {name: "Completed" for name in ("download", "shard", "extend-tokenizer", "convert",
                                                     "repartition")}
    return config, result


def test_flow_produces_every_stage_output(first_run: tuple[PipelineConfig, dict]) -> None:
    config, result = first_run
    manifest = read_shard_manifest(result["shards"]["out_dir"], deep=True)
    assert manifest["written"] + manifest["skipped"] == manifest["records"] == 64
    assert result["tokenizer"]["vocab_size"] == 392
    native = Path(result["llm"]["path"])
    assert native == config.workdir / "checkpoints" / "tiny-llama" / "native-fp32-tp2"
    llm_config, meta = read_native_config(native)
    assert (meta["tp"], llm_config.vocab_size, llm_config.padded_vocab_size) == (2, 392, 512)
    rank1 = load_native_rank(native, 1)
    assert rank1["embedding.word_embeddings.weight"].shape == (256, llm_config.hidden_size)
    assert Path(result["vision"]["dest"], "model.safetensors").is_file()


def test_second_run_is_served_from_cache(first_run: tuple[PipelineConfig, dict]) -> None:
    config, result = first_run
    again, states = run_flow(config)
    assert set(states.values()) == {"Cached"}
    assert again == result


def test_deleted_output_is_rebuilt_not_trusted(first_run: tuple[PipelineConfig, dict]) -> None:
    config, result = first_run
    shutil.rmtree(result["llm"]["path"])
    (Path(result["shards"]["out_dir"]) / "manifest.json").unlink()
    again, states = run_flow(config)
    assert states["repartition"] == "Completed" and states["shard"] == "Completed"
    assert states["convert"] == "Cached"
    read_shard_manifest(again["shards"]["out_dir"])
    assert again["llm"]["manifest_sha256"] == result["llm"]["manifest_sha256"]


def test_changed_input_misses_the_cache_and_unzip_is_optional(
    first_run: tuple[PipelineConfig, dict], tmp_path: Path
) -> None:
    config, _ = first_run
    dataset = config.dataset.model_copy(update={"maxcount": 8, "unzip": True})
    changed = config.model_copy(update={"dataset": dataset, "workdir": tmp_path / "work"})
    _, states = run_flow(changed)
    assert states["shard"] == "Completed" and states["unzip"] == "Completed"
    assert len(list((tmp_path / "work" / "images" / "fixture").rglob("*.jpg"))) >= 64


def test_hf_token_comes_from_a_secret_block(first_run: tuple[PipelineConfig, dict]) -> None:
    from prefect.blocks.system import Secret

    Secret(value="hf_fake_token_for_tests").save("neva-test-hf-token", overwrite=True)
    assert hub_token("neva-test-hf-token") == "hf_fake_token_for_tests"
    assert hub_token(None) is None


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
    with pytest.raises(NevaError, match="hf://"):
        DatasetConfig(json_source="hf://")
    with pytest.raises(ValueError):
        ModelConfig(tp=0)
    with pytest.raises(ValueError):
        PipelineConfig(workdir=tmp_path, unknown_field=1)
