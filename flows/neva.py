"""The `neva` flow: the table of contents of the pipeline.

    dataset json ─┐
    images.zip ───┴─> [unzip] ─> shard ─────────────────────────────> shards (train/val, energon)
    LLM snapshot ───> extend tokenizer ─> convert (extended vocab) ─> repartition (TP) ─> native checkpoint
    vision snapshot ─────────────────────────────────────────────────> CLIP folder

Downloads run concurrently; every stage is a cached task whose result is a path plus its manifest.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from prefect import flow

from neva_core.config import AUTO_TOKENIZER, ModelConfig, PipelineConfig
from neva_core.data.download import HubSource, parse_source
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
    hub = {"token_secret": config.hf_token_secret, "endpoint": config.hf_endpoint}
    dataset = config.dataset
    downloads = config.workdir / "downloads" / dataset.name
    json_file = download_task.submit(dataset.json_source, downloads, sha256=dataset.json_sha256, **hub)
    images_zip = download_task.submit(dataset.images_source, downloads, sha256=dataset.images_sha256, **hub)
    model_downloads = start_model_downloads(config.model, config.workdir, hub) if config.model else None

    zip_path = Path(images_zip.result()["paths"][0])
    if dataset.unzip:
        unzip_task(zip_path, config.workdir / "images" / dataset.name)
    shards = shard_task(
        Path(json_file.result()["paths"][0]), zip_path, config.workdir / "shards" / dataset.name,
        maxcount=dataset.maxcount, workers=dataset.workers, val_fraction=dataset.val_fraction,
    )
    result: dict[str, Any] = {"shards": shards}
    if config.model is not None and model_downloads is not None:
        result.update(prepare_checkpoints(config.model, *model_downloads))
    return result


def start_model_downloads(model: ModelConfig, workdir: Path, hub: dict[str, Any]) -> tuple[Any, Any]:
    llm = download_task.submit(model.llm_source, workdir / "checkpoints" / source_name(model.llm_source) / "hf",
                               include=model.llm_include, **hub)
    vision = download_task.submit(model.vision_source, workdir / "checkpoints" / source_name(model.vision_source),
                                  include=model.vision_include, **hub)
    return llm, vision


def prepare_checkpoints(model: ModelConfig, llm_download: Any, vision_download: Any) -> dict[str, Any]:
    """Tokenizer → native checkpoint (vocab grown to the extended tokenizer) → the training TP size."""
    llm_dir = Path(llm_download.result()["dest"])
    model_root = llm_dir.parent
    # "auto": the snapshot decides the kind (tokenizer.model: sentencepiece; else tokenizer.json).
    tokenizer_source = llm_dir if model.tokenizer_file == AUTO_TOKENIZER else llm_dir / model.tokenizer_file
    tokenizer = extend_tokenizer_task(tokenizer_source, model_root / "tokenizer", model.special_tokens)
    dtype = model.dtype or "source-dtype"
    native = convert_task(llm_dir, model_root / f"native-{dtype}-tp1", tokenizer=Path(tokenizer["out_dir"]),
                          dtype=model.dtype)
    if model.tp > 1:
        native = repartition_task(Path(native["path"]), model_root / f"native-{dtype}-tp{model.tp}", model.tp)
    return {"tokenizer": tokenizer, "llm": native, "vision": vision_download.result()}
