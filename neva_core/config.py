"""The pipeline's parameters: one pydantic model, validated before any stage runs.

The Prefect flow takes it as its parameter (so the UI shows a form for it) and the CLI's `demo`
builds one; nothing here imports Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from neva_core.data.download import ALTERNATIVES as WEIGHTS_OR
from neva_core.data.download import parse_source
from neva_core.data.shards import DEFAULT_VAL_FRACTION
from neva_core.errors import NevaError
from neva_core.tokenizer import NEVA_SPECIAL_TOKENS

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

    _sources = field_validator("json_source", "images_source")(_check_source)


class ModelConfig(_Strict):
    """The language and vision checkpoints, and how the LLM is converted."""

    llm_source: str = "hf://meta-llama/Llama-2-7b-chat-hf"
    # "A|B": A's files when the repo has any, else B's; neither is an error (see download.select_paths).
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
