"""The `neva` flow: the table of contents of the pipeline.

    dataset json ─┐
    images.zip ───┴─> [unzip] ─> shard ─────────────────────────────> shards (train/val, energon) ─┐
    LLM snapshot ───> extend tokenizer ─> convert (extended vocab) ─> repartition (TP) ──────────────┼─> pretrain ─┐
    vision snapshot ─────────────────────────────────────────────────> CLIP folder ─────────────────┘             │
    finetune json + images (stage finetune) ─> shard ─> finetune (init: the pretrain output) <──────────────────┘
                                                          └─> export (HF LLaVA) of the last training stage

`demo=true` makes its own fixtures under the workdir and runs the same stages on them with the tiny
presets. `config.train: null` stops after the checkpoints (no training, no export).

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
from prefect.runtime import flow_run

from neva_core.checkpoint.convert import check_tensor_parallel
from neva_core.config import AUTO_TOKENIZER, DatasetConfig, ModelConfig, PipelineConfig, train_config
from neva_core.data.download_sources import HubSource, parse_source
from neva_core.fingerprint import output_folder
from neva_core.errors import NevaError
from neva_core.io import prune_outputs
from neva_core.model.neva import Stage
from tasks.artifacts import StageLog, run_summary_artifact
from tasks.checkpoint import convert_task, extend_tokenizer_task, repartition_task
from tasks.data import download_task, shard_task, unzip_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.train import train_task


def source_name(source: str) -> str:
    """A folder name for what a source holds: the repo name, or the last path component."""
    parsed = parse_source(source)
    if isinstance(parsed, HubSource):
        return parsed.repo_id.split("/")[-1]
    return PurePosixPath(parsed.display.rstrip("/")).name


def model_label(config: PipelineConfig) -> str:
    """The LLM's name for run names: `Llama-2-7b-chat-hf` -> `llama-2-7b-chat`."""
    if config.model is None:
        return "data"
    name = source_name(config.model.llm_source).lower()
    return f"{name.removesuffix('-hf')}-tp{config.model.tp}"


def run_name(demo: bool, stage: Stage | str, config: PipelineConfig) -> str:
    """What a run does, e.g. `pretrain-llama-2-7b-chat-tp4`, `demo-finetune-tiny-llama-tp2`, `data-...`."""
    what = Stage(stage).value if config.train is not None else "data"
    return f"{'demo-' if demo else ''}{what}-{model_label(config)}"


def flow_run_name() -> str:
    """The flow run's name, from its parameters (a dict from the API, or the models of a direct call)."""
    parameters = flow_run.parameters
    config = parameters.get("config", PipelineConfig())
    if not isinstance(config, PipelineConfig):
        config = PipelineConfig.model_validate(config)
    demo = bool(parameters.get("demo", False))
    if demo:
        from neva_core.demo import demo_config

        config = demo_config(config.workdir, make=False)
    return run_name(demo, parameters.get("stage", Stage.PRETRAIN), config)


@flow(name="neva", log_prints=True, flow_run_name=flow_run_name)
def neva(demo: bool = False, stage: Stage = Stage.PRETRAIN, config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Data, checkpoints, training (pretrain; finetune also runs or reuses pretrain) and export of NeVA.

    demo: run on synthetic fixtures made under config.workdir (offline; the tiny presets).
    stage: the last training stage to run.
    config: the pipeline; its `train: null` runs only the data and checkpoint stages."""
    # Resolved here, in the process that runs the flow, not where the flow was imported.
    config = config.model_copy(update={"workdir": config.workdir.resolve()})
    if demo:
        from neva_core.demo import demo_config

        config = demo_config(config.workdir)
    stages = StageLog()
    try:
        result = run_stages(config, Stage(stage), stages)
    finally:  # a failed run's summary shows how far it got
        run_summary_artifact(stages.outcomes)
    return {**result, "stages": [asdict(outcome) for outcome in stages.outcomes]}


def run_stages(config: PipelineConfig, stage: Stage, stages: StageLog) -> dict[str, Any]:
    hub = {"token_secret": config.hf_token_secret, "endpoint": config.hf_endpoint}
    workdir = config.workdir
    started = time.monotonic()
    pretrain_data = start_dataset_downloads(config.dataset, workdir, hub)
    model_downloads = start_model_downloads(config.model, workdir, hub) if config.model else None
    finetuning = config.train is not None and stage is Stage.FINETUNE
    finetune_data = start_dataset_downloads(config.finetune_dataset, workdir, hub) if finetuning else None

    shards, outputs = prepare_dataset(config.dataset, workdir, stages, pretrain_data, started)
    result: dict[str, Any] = {"shards": shards}
    if config.model is not None and model_downloads is not None:
        checkpoints, used = prepare_checkpoints(config.model, stages, *model_downloads, started=started)
        result.update(checkpoints)
        outputs += used
    if finetune_data is not None:
        result["finetune_shards"], used = prepare_dataset(config.finetune_dataset, workdir, stages, finetune_data,
                                                          started, prefix="finetune-")
        outputs += used
    if config.train is not None:
        trained, used = train_and_export(config, stage, result, stages)
        result.update(trained)
        outputs += used
        if config.evaluation is not None:
            result["evaluation"] = evaluate(config, stage, Path(trained[stage.value]["final"]), stages)
    for output in outputs:
        prune_outputs(output, config.keep_outputs)
    return result


def start_dataset_downloads(dataset: DatasetConfig, workdir: Path, hub: dict[str, Any]) -> tuple[Any, Any]:
    downloads = workdir / "downloads" / dataset.name
    json_file = download_task.submit(dataset.json_source, output_folder(downloads, "json", source=dataset.json_source),
                                     sha256=dataset.json_sha256, **hub)
    images_zip = download_task.submit(dataset.images_source,
                                      output_folder(downloads, "images", source=dataset.images_source),
                                      sha256=dataset.images_sha256, **hub)
    return json_file, images_zip


def prepare_dataset(dataset: DatasetConfig, workdir: Path, stages: StageLog, downloads: tuple[Any, Any],
                    started: float, prefix: str = "") -> tuple[dict[str, Any], list[Path]]:
    """The dataset's downloads waited for, then (unzip and) shards; returns the shard result and every output used."""
    json_download = wait_for(stages, f"{prefix}download-json", downloads[0], started)
    zip_download = wait_for(stages, f"{prefix}download-images", downloads[1], started)
    json_path, zip_path = Path(json_download["paths"][0]), Path(zip_download["paths"][0])
    outputs = [Path(json_download["dest"]), Path(zip_download["dest"])]
    if dataset.unzip:
        unzipped = stages.call(unzip_task, zip_path, output_folder(workdir / "images", dataset.name, zip=zip_path),
                               stage=f"{prefix}unzip", output=lambda r: r["dest"])
        outputs.append(Path(unzipped["dest"]))
    shard_params = {"maxcount": dataset.maxcount, "val_fraction": dataset.val_fraction,
                    "image_prefix": dataset.image_prefix}
    shards = stages.call(shard_task, json_path, zip_path,
                         output_folder(workdir / "shards", dataset.name, json=json_path, images=zip_path,
                                       **shard_params),
                         stage=f"{prefix}shard", workers=dataset.workers, output=lambda r: r["out_dir"],
                         **shard_params)
    outputs.append(Path(shards["out_dir"]))
    return shards, outputs


def train_and_export(config: PipelineConfig, stage: Stage, prepared: dict[str, Any],
                     stages: StageLog) -> tuple[dict[str, Any], list[Path]]:
    """Pretrain (and, for stage finetune, finetune from the pretrain output), then export the last one.

    Each run's OUT is named after its inputs and parameters, so a retry or a rerun of the same
    configuration finds (and resumes or reuses) its own run, and another configuration never touches it."""
    if config.model is None or config.train is None:
        raise NevaError("training needs config.model and config.train")  # PipelineConfig refuses this already
    runs_root = config.workdir / "runs" / model_label(config)
    inputs = {"llm": Path(prepared["llm"]["path"]), "vision": Path(prepared["vision"]["dest"]),
              "tokenizer": Path(prepared["tokenizer"]["out_dir"])}
    results: dict[str, Any] = {}
    used: list[Path] = []
    init: Path | None = None
    out = runs_root
    for current in (Stage.PRETRAIN, Stage.FINETUNE)[: 2 if stage is Stage.FINETUNE else 1]:
        shards = Path(prepared["shards" if current is Stage.PRETRAIN else "finetune_shards"]["out_dir"])
        params = getattr(config.train, current.value)
        out = output_folder(runs_root, current.value, shards=shards, init=init, params=params.model_dump(),
                            tp=config.model.tp, dtype=config.model.dtype, **inputs)
        train = train_config(config, current.value, shards, out=out, init=init, **inputs)
        results[current.value] = stages.call(train_task, train, config.train.kubernetes, stage=current.value,
                                             output=lambda r: r["final"])
        used.append(out)
        init = out
    exported = stages.call(export_task, out / "final",
                           output_folder(config.workdir / "exports" / model_label(config), f"{stage.value}-hf",
                                         trained=out / "final"),
                           output=lambda r: r["path"])
    used.append(Path(exported["path"]))
    return {**results, "export": exported}, used


def evaluate(config: PipelineConfig, stage: Stage, model: Path, stages: StageLog) -> dict[str, Any]:
    """Score the trained model on the configured benchmarks; with the guard on, a regression against the
    promoted model fails this task (and the run). Each stage has its own history and promoted model under
    WORKDIR/evaluation/<stage>/, so a pretrained model is never judged against a finetuned one."""
    run_id = flow_run.id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # a retry keeps the run's id
    return stages.call(evaluate_task, model, config.evaluation, config.workdir / "evaluation" / stage.value, run_id,
                       output=lambda r: f"{r['decision'] or 'scored'}: "
                                        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["scores"].items())))


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
