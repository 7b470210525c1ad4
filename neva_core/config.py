"""The pipeline's parameters: one pydantic model, validated before any stage runs.

The Prefect flow takes it as its parameter (so the UI shows a form for it) and the CLI's `demo`
builds one; nothing here imports Prefect. The training hyper-parameters (`train.pretrain`,
`train.finetune`) are TrainConfig's fields less the ones the flow fills in: the input and output
paths it computes, the stage (the group's name) and tp/dtype (from `model`). Every cross-field check
of TrainConfig runs here too, at the world size the parameters give, so a bad batch size fails
before any stage.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from neva_core.data.download_plans import ALTERNATIVES as WEIGHTS_OR
from neva_core.data.download_sources import parse_source
from neva_core.data.shard_plan import DEFAULT_VAL_FRACTION
from neva_core.errors import NevaError
from neva_core.eval.settings import EvaluationConfig
from neva_core.tokenizer import NEVA_SPECIAL_TOKENS
from neva_core.train.config import TrainConfig, make_train_config, read_config_file
from neva_core.train.k8s import PyTorchJobSettings

AUTO_TOKENIZER = "auto"


def _check_source(value: str) -> str:
    try:
        parse_source(value)
    except NevaError as exc:
        raise ValueError(str(exc)) from None  # pydantic then names the key that holds it
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    """Where a LLaVA-style dataset comes from and how it is sharded."""

    name: str = Field("llava-pretrain", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="folder name under the workdir")
    json_source: str = "hf://datasets/liuhaotian/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    images_source: str = "hf://datasets/liuhaotian/LLaVA-Pretrain/images.zip"
    json_sha256: str | None = None
    images_sha256: str | None = None
    unzip: bool = Field(False, description="also extract images.zip to a folder (sharding reads the zip directly)")
    maxcount: int = Field(10000, ge=1, description="samples per webdataset shard")
    workers: int | None = Field(None, ge=1, description="sharding processes (default: up to 4)")
    val_fraction: float = Field(
        DEFAULT_VAL_FRACTION, ge=0.0, lt=1.0,
        description="share of records in the val split (default 0: every record trains, as in the LLaVA recipes; "
                    "set it for validation loss)",
    )
    image_prefix: str = Field(
        "", pattern=r"^([A-Za-z0-9._-]+/)*$",
        description="folder put before every record's image path inside the images archive or folder "
                    "('train2017/' for COCO's train2017.zip under LLaVA-Instruct-150K)")

    _sources = field_validator("json_source", "images_source")(_check_source)


def _instruct_dataset() -> DatasetConfig:
    return DatasetConfig(
        name="llava-instruct-150k",
        json_source="hf://datasets/liuhaotian/LLaVA-Instruct-150K/llava_instruct_150k.json",
        images_source="http://images.cocodataset.org/zips/train2017.zip",
        image_prefix="train2017/",  # the zip's folder; the records name bare COCO file names
    )


class ModelConfig(_Strict):
    """The language and vision checkpoints, and how the LLM is converted."""

    llm_source: str = "hf://meta-llama/Llama-2-7b-chat-hf"
    # "A|B": A's files when the repo has any, else B's; neither is an error (see download_plans.select_paths).
    llm_include: tuple[str, ...] = ("*.json", f"*.safetensors{WEIGHTS_OR}pytorch_model*.bin", "tokenizer.model")
    vision_source: str = "hf://openai/clip-vit-large-patch14-336"
    vision_include: tuple[str, ...] = ("*.json", f"*.safetensors{WEIGHTS_OR}pytorch_model*.bin")
    tokenizer_file: str = Field(
        AUTO_TOKENIZER,
        description="tokenizer inside the LLM snapshot: 'auto' (tokenizer.model when present, else tokenizer.json) "
                    "or a file name",
    )
    special_tokens: tuple[str, ...] = NEVA_SPECIAL_TOKENS
    tp: int = Field(1, ge=1, description="tensor-parallel size of the training checkpoint")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field("bf16", description="None keeps the checkpoint's dtype")

    _sources = field_validator("llm_source", "vision_source")(_check_source)


class PipelineConfig(_Strict):
    """Everything one run of the `neva` flow needs."""

    workdir: Path = Path("neva-work")
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig | None = ModelConfig()
    hf_token_secret: str | None = Field(None, description="name of a Prefect Secret block holding the HF token")
    hf_endpoint: str | None = Field(None, description="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    # A relative workdir is resolved by the flow run, against its own working directory.
    keep_outputs: int = Field(2, ge=1, description="outputs kept per stage in the workdir (the newest ones)")
    finetune_dataset: DatasetConfig = Field(default_factory=_instruct_dataset,
                                            description="the conversations finetuning trains on (stage finetune)")
    train: TrainGroup | None = Field(default_factory=lambda: TrainGroup(),
                                     description="training hyper-parameters; null: only the data and checkpoint stages")
    evaluation: EvaluationConfig | None = Field(
        None, description="benchmarks the trained model is evaluated on after the export, and the nightly "
                          "regression guard (null: no evaluation)")

    @model_validator(mode="after")
    def _check_training(self) -> PipelineConfig:
        if self.evaluation is not None and self.train is None:
            raise ValueError("evaluation needs train: it evaluates the model this run trains; set train, or set "
                             "evaluation to null")
        if self.train is not None:
            for stage in ("pretrain", "finetune"):
                train_config(self, stage, Path("shards"), Path("llm"), Path("vision"), Path("tokenizer"), Path("out"))
        return self


def train_config(config: PipelineConfig, stage: str, shards: Path, llm: Path, vision: Path, tokenizer: Path,
                 out: Path, init: Path | None = None) -> TrainConfig:
    """The TrainConfig of one stage of `config` on the given paths; a ValueError names the parameter at fault."""
    if config.train is None:
        raise ValueError("train is null: this configuration runs only the data and checkpoint stages")
    if config.model is None:
        raise ValueError("train needs model: set model (the LLM and vision sources), or set train to null")
    if config.model.dtype not in ("bf16", "fp32"):
        raise ValueError(f"model.dtype {config.model.dtype!r} cannot train: training runs in bf16 (fp32 masters) or "
                         "fp32; fp16 has no loss scaling here and null keeps an unknown dtype. Set model.dtype to "
                         "bf16 or fp32")
    params = getattr(config.train, stage)
    try:
        return make_train_config({**params.model_dump(), "stage": stage, "tp": config.model.tp,
                                  "dtype": config.model.dtype, "shards": shards, "llm": llm, "vision": vision,
                                  "tokenizer": tokenizer, "out": out, "init": init})
    except NevaError as exc:  # flag names (--global-batch) are the keys here (train.<stage>.global_batch)
        raise ValueError(f"train.{stage} (with model.tp {config.model.tp}, model.dtype {config.model.dtype}): "
                         f"{exc}") from None


# TrainConfig fields the flow fills in: where things are (it computes every path), the stage (the group's
# name) and the parallel size and dtype of the checkpoint it converted (`model.tp`, `model.dtype`).
FLOW_FILLED = ("shards", "llm", "vision", "tokenizer", "out", "init", "stage", "tp", "dtype")
PRESETS_PACKAGE = "configs"  # the repository's configs/ folder, installed as package data

TrainParams = create_model(
    "TrainParams",
    __base__=_Strict,
    __doc__="One training stage's hyper-parameters: the options of `neva train` the flow does not fill in.",
    **{name: (info.annotation, info) for name, info in TrainConfig.model_fields.items() if name not in FLOW_FILLED},
)


def preset_params(name: str, **changes: Any) -> Any:
    """The TrainParams of the preset configs/<name>.yaml (read from the installed package), with `changes`."""
    values = read_config_file(Path(str(importlib.resources.files(PRESETS_PACKAGE) / f"{name}.yaml")))
    return TrainParams(**{key: value for key, value in values.items() if key not in FLOW_FILLED} | changes)


def _llava_pretrain() -> Any:
    return preset_params("llava-1.5-pretrain")


def _llava_finetune() -> Any:
    # The default LLM is LLaMA-2-chat, whose own prompt format is llama_2 (LLaVA-1.5's vicuna_v1 is Vicuna's).
    return preset_params("llava-1.5-finetune", template="llama_2")


class TrainGroup(_Strict):
    """The hyper-parameters of each training stage (stage=finetune runs both: finetune starts from pretrain)."""

    pretrain: TrainParams = Field(default_factory=_llava_pretrain)  # type: ignore[valid-type]
    finetune: TrainParams = Field(default_factory=_llava_finetune)  # type: ignore[valid-type]
    kubernetes: PyTorchJobSettings | None = Field(
        None, description="run each training stage as a Kubeflow PyTorchJob on the cluster (image, nodes, GPUs, "
                          "claim); null: local processes. The workdir must be on the claim, under its mount_path")
