"""Prefect tasks for the checkpoint stages: thin wrappers over neva_core (tokenizer, convert, repartition)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import task

from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.checkpoint.layout import verify_native
from neva_core.checkpoint.repartition import repartition
from neva_core.io import read_manifest, verify_files
from neva_core.tokenizer import extend_tokenizer
from tasks.caching import StageCache, check_same_manifest
from tasks.results import to_json


def _tokenizer_folder_complete(result: dict[str, Any]) -> None:
    folder = Path(result["out_dir"])
    verify_files(folder, read_manifest(folder)["files"], check_hash=False)


@task(
    name="extend-tokenizer",
    cache_policy=StageCache(stage="extend-tokenizer", output_params=("out_dir",),
                            outputs_ok=_tokenizer_folder_complete),
    persist_result=True,
)
def extend_tokenizer_task(
    model_path: Path,
    out_dir: Path,
    tokens: tuple[str, ...],
    piece_type: Literal["user_defined", "control"] = "user_defined",
) -> dict[str, Any]:
    """Append NeVA's special tokens to a tokenizer.model, a tokenizer.json or a model folder's tokenizer."""
    extension = extend_tokenizer(model_path, out_dir, tokens, piece_type)
    return {**to_json(extension), "tokenizer_file": str(extension.tokenizer_file)}


def _native_checkpoint_complete(result: dict[str, Any]) -> None:
    verify_native(result["path"], deep=False)
    check_same_manifest(result["path"], result["manifest_sha256"], "checkpoint")


@task(
    name="convert",
    cache_policy=StageCache(stage="convert", output_params=("out_dir",), outputs_ok=_native_checkpoint_complete),
    persist_result=True,
)
def convert_task(
    hf_dir: Path, out_dir: Path, tokenizer: Path | None = None, dtype: str | None = None, tp: int = 1
) -> dict[str, Any]:
    """Stream an HF LLaMA/Mistral/Qwen2 checkpoint into the native format, grown to the tokenizer's vocab."""
    return convert_hf_checkpoint(hf_dir, out_dir, tp=tp, dtype=dtype, tokenizer=tokenizer).to_dict()


@task(
    name="repartition",
    cache_policy=StageCache(stage="repartition", output_params=("out_dir",),
                            outputs_ok=_native_checkpoint_complete),
    persist_result=True,
)
def repartition_task(in_dir: Path, out_dir: Path, tp: int) -> dict[str, Any]:
    """Rewrite a native checkpoint for another tensor-parallel size, in one streaming pass."""
    return repartition(in_dir, out_dir, tp).to_dict()
