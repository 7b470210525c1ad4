"""The `neva` flow: the table of contents of the pipeline.

    dataset json ─┐
    images.zip ───┴─> [unzip] ─> shard ─────────────────────────────> shards (train/val, energon)
    LLM snapshot ───> extend tokenizer ─> convert (extended vocab) ─> repartition (TP) ─> native checkpoint
    vision snapshot ─────────────────────────────────────────────────> CLIP folder

Downloads run concurrently; every stage is a cached task whose result is a path plus its manifest.
Each output goes to a folder named after its inputs and parameters (`<label>-<digest>`), so a changed
parameter builds a new folder instead of rewriting one a finished run points at; after a successful
run only the newest `keep_outputs` folders of each label remain. Every run, cached or not, ends with a
summary of its stages (ran or cached, seconds, output): a markdown artifact, and the result's "stages".
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import flow

from neva_core.checkpoint.convert import check_tensor_parallel
from neva_core.config import AUTO_TOKENIZER, ModelConfig, PipelineConfig
from neva_core.data.download_sources import HubSource, parse_source
from neva_core.fingerprint import output_folder
from neva_core.io import prune_outputs
from tasks.artifacts import StageLog, run_summary_artifact
from tasks.checkpoint import convert_task, extend_tokenizer_task, repartition_task
from tasks.data import download_task, shard_task, unzip_task


def source_name(source: str) -> str:
    """A folder name for what a source holds: the repo name, or the last path component."""
    parsed = parse_source(source)
    if isinstance(parsed, HubSource):
        return parsed.repo_id.split("/")[-1]
    return PurePosixPath(parsed.display.rstrip("/")).name


@flow(name="neva", log_prints=True)
def neva(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Prepare the data and the checkpoints for NeVA training."""
    # Resolved here, in the process that runs the flow, not where the flow was imported.
    config = config.model_copy(update={"workdir": config.workdir.resolve()})
    stages = StageLog()
    try:
        result = run_stages(config, stages)
    finally:  # a failed run's summary shows how far it got
        run_summary_artifact(stages.outcomes)
    return {**result, "stages": [asdict(outcome) for outcome in stages.outcomes]}


def run_stages(config: PipelineConfig, stages: StageLog) -> dict[str, Any]:
    hub = {"token_secret": config.hf_token_secret, "endpoint": config.hf_endpoint}
    dataset, workdir = config.dataset, config.workdir
    downloads = workdir / "downloads" / dataset.name
    started = time.monotonic()
    json_file = download_task.submit(dataset.json_source, output_folder(downloads, "json", source=dataset.json_source),
                                     sha256=dataset.json_sha256, **hub)
    images_zip = download_task.submit(dataset.images_source,
                                      output_folder(downloads, "images", source=dataset.images_source),
                                      sha256=dataset.images_sha256, **hub)
    model_downloads = start_model_downloads(config.model, workdir, hub) if config.model else None

    json_download = wait_for(stages, "download-json", json_file, started)
    zip_download = wait_for(stages, "download-images", images_zip, started)
    json_path, zip_path = Path(json_download["paths"][0]), Path(zip_download["paths"][0])
    outputs = [Path(json_download["dest"]), Path(zip_download["dest"])]
    if dataset.unzip:
        unzipped = stages.call(unzip_task, zip_path, output_folder(workdir / "images", dataset.name, zip=zip_path),
                               output=lambda r: r["dest"])
        outputs.append(Path(unzipped["dest"]))
    shard_params = {"maxcount": dataset.maxcount, "val_fraction": dataset.val_fraction}
    shards = stages.call(shard_task, json_path, zip_path,
                         output_folder(workdir / "shards", dataset.name, json=json_path, images=zip_path,
                                       **shard_params),
                         workers=dataset.workers, output=lambda r: r["out_dir"], **shard_params)
    outputs.append(Path(shards["out_dir"]))
    result: dict[str, Any] = {"shards": shards}
    if config.model is not None and model_downloads is not None:
        checkpoints, used = prepare_checkpoints(config.model, stages, *model_downloads, started=started)
        result.update(checkpoints)
        outputs += used
    for output in outputs:
        prune_outputs(output, config.keep_outputs)
    return result


def wait_for(stages: StageLog, stage: str, download: Any, started: float) -> dict[str, Any]:
    """A submitted download's result, recorded with the seconds since the downloads started (they overlap)."""
    try:
        result = download.result()
    except BaseException:
        stages.add(stage, download.state.name, time.monotonic() - started)
        raise
    stages.add(stage, download.state.name, time.monotonic() - started, result["dest"])
    return result


def start_model_downloads(model: ModelConfig, workdir: Path, hub: dict[str, Any]) -> tuple[Any, Any]:
    llm_root = workdir / "checkpoints" / source_name(model.llm_source)
    llm = download_task.submit(model.llm_source,
                               output_folder(llm_root, "hf", source=model.llm_source, include=model.llm_include),
                               include=model.llm_include, **hub)
    vision_root = workdir / "checkpoints" / source_name(model.vision_source)
    vision = download_task.submit(model.vision_source, output_folder(vision_root, "hf", source=model.vision_source,
                                                                     include=model.vision_include),
                                  include=model.vision_include, **hub)
    return llm, vision


def prepare_checkpoints(
    model: ModelConfig, stages: StageLog, llm_download: Any, vision_download: Any, started: float
) -> tuple[dict[str, Any], list[Path]]:
    """Tokenizer → native checkpoint (vocab grown to the extended tokenizer) → the training TP size.

    Returns the results and every output folder they used (downloads and intermediates included)."""
    llm_dir = Path(wait_for(stages, "download-llm", llm_download, started)["dest"])
    vision = wait_for(stages, "download-vision", vision_download, started)
    check_tensor_parallel(llm_dir, model.tp)  # before any conversion: a bad TP size fails in seconds
    model_root = llm_dir.parent
    # "auto": the snapshot decides the kind (tokenizer.model: sentencepiece; else tokenizer.json).
    tokenizer_source = llm_dir if model.tokenizer_file == AUTO_TOKENIZER else llm_dir / model.tokenizer_file
    tokenizer = stages.call(
        extend_tokenizer_task, tokenizer_source,
        output_folder(model_root, "tokenizer", model=tokenizer_source, tokens=model.special_tokens),
        model.special_tokens, output=lambda r: r["out_dir"])
    tokenizer_dir = Path(tokenizer["out_dir"])
    # Labels name the stage, not its parameters (the digest does), so old outputs of a stage are pruned.
    native = stages.call(
        convert_task, llm_dir,
        output_folder(model_root, "native-tp1", hf=llm_dir, tokenizer=tokenizer_dir, dtype=model.dtype),
        tokenizer=tokenizer_dir, dtype=model.dtype, output=lambda r: r["path"])
    used = [llm_dir, Path(vision["dest"]), tokenizer_dir, Path(native["path"])]
    if model.tp > 1:
        tp1 = Path(native["path"])
        native = stages.call(repartition_task, tp1, output_folder(model_root, "native-tpn", native=tp1, tp=model.tp),
                             model.tp, output=lambda r: r["path"])
        used.append(Path(native["path"]))
    return {"tokenizer": tokenizer, "llm": native, "vision": vision}, used
