"""Checks of a run's inputs that `neva train` makes before it starts any process (and every rank again).

Each failure is a NevaError naming the flag or file and what to do, so a bad input costs seconds and
leaves no checkpoint behind. The facts found on the way (image tokens, the image token's id, the LLM's
config) are what the ranks build the model and the loader from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from neva_core.checkpoint.layout import read_native_config
from neva_core.data.text_tokenizer import TextTokenizer, load_text_tokenizer
from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig
from neva_core.model.trained import read_trained_config
from neva_core.model.vision import read_vision_config
from neva_core.train.config import TrainConfig
from neva_core.train.zero_shot import check_eval_inputs

T = TypeVar("T")


@dataclass(frozen=True)
class RunInputs:
    """What the inputs of a run turned out to be, once checked."""

    llm_config: LLMConfig
    tokenizer: TextTokenizer
    image_size: int
    patch_size: int
    split_samples: dict[str, int]

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def check_inputs(config: TrainConfig) -> RunInputs:
    """Every input of `config` checked against the others; the first problem is a NevaError."""
    if config.zero == 3:
        raise NevaError(
            "--zero 3 is not supported yet: ZeRO-3 partitions the weights themselves, and the trained-model "
            "folder (OUT/final) is written from whole weights; use --zero 2 (optimizer states and gradients "
            "partitioned), which is what ZeRO-3 runs of this size need in memory on 8 GPUs up to 13B"
        )
    llm_config, meta = _read_llm(config.llm)
    if int(meta["tp"]) != config.tp:
        raise NevaError(
            f"--tp {config.tp} differs from --llm {config.llm}, which holds rank files for tp={meta['tp']}; "
            f"use --tp {meta['tp']}, or rewrite it with `neva repartition --in {config.llm} --out DIR --tp {config.tp}`"
        )
    tokenizer = _read_tokenizer(config.tokenizer)
    if tokenizer.vocab_size != llm_config.vocab_size:
        raise NevaError(
            f"--tokenizer {config.tokenizer} has {tokenizer.vocab_size} tokens but --llm {config.llm} has a "
            f"vocabulary of {llm_config.vocab_size}; convert the LLM with this tokenizer "
            f"(`neva convert --hf DIR --out DIR --tokenizer {config.tokenizer}`) or pass the tokenizer it was "
            "converted with"
        )
    vision = _read_vision(config.vision)
    image_size, patch_size = int(vision.image_size), int(vision.patch_size)
    inputs = RunInputs(llm_config, tokenizer, image_size, patch_size, _read_splits(config))
    try:
        config.check_max_length(inputs.image_tokens)
    except NevaError as exc:
        raise NevaError(f"{exc} (the vision tower {config.vision} is {image_size} px, patch {patch_size})") from None
    if config.init is not None:
        _check_init(config.init, config, inputs)
    check_eval_inputs(config)
    return inputs


def _read_llm(folder: Path) -> tuple[LLMConfig, dict[str, Any]]:
    return _read_input("--llm", folder, "the native checkpoint folder `neva convert` wrote", read_native_config)


def _read_tokenizer(folder: Path) -> TextTokenizer:
    return _read_input("--tokenizer", folder, "the folder `neva tokenizer extend` wrote", load_text_tokenizer)


def _read_vision(folder: Path) -> Any:
    return _read_input("--vision", folder, "a CLIP vision tower folder", read_vision_config)


def _read_input(flag: str, folder: Path, expected: str, read: Callable[[Path], T]) -> T:
    """`read(folder)`, with a missing folder or a reader's error named by the flag that gave it."""
    if not folder.is_dir():
        raise NevaError(f"{flag} {folder} does not exist; pass {expected}")
    try:
        return read(folder)
    except NevaError as exc:
        raise NevaError(f"{flag} {folder}: {exc}") from None


def _read_splits(config: TrainConfig) -> dict[str, int]:
    """Samples per split of the shard folder; refuses an empty train split, and a missing val split when
    validation is asked for."""
    from neva_core.data.shard_manifest import read_shard_manifest

    if not config.shards.is_dir():
        raise NevaError(f"--shards {config.shards} does not exist; write it with `neva shard`")
    try:
        manifest = read_shard_manifest(config.shards)
    except NevaError as exc:
        raise NevaError(f"--shards {config.shards}: {exc}") from None
    splits = {split: int(info["samples"]) for split, info in manifest["splits"].items()}
    if splits.get("train", 0) == 0:
        raise NevaError(f"--shards {config.shards} holds no training samples; shard a non-empty dataset")
    if config.val_every and splits.get("val", 0) == 0:
        raise NevaError(
            f"--val-every {config.val_every} needs a val split, but --shards {config.shards} has none; rewrite "
            "the shards with `neva shard --val-fraction 0.01` (or so), or pass --val-every 0"
        )
    return splits


def _check_init(init: Path, config: TrainConfig, inputs: RunInputs) -> None:
    try:
        folder, settings, document = read_trained_config(init)
    except NevaError as exc:
        raise NevaError(f"--init {init}: {exc}; pass a finished run's OUT (or its final/) or a folder "
                        "written by `neva import`") from None
    if settings.projector_type != config.projector:
        raise NevaError(f"--init {folder} has a {settings.projector_type} projector but --projector is "
                        f"{config.projector}; pass --projector {settings.projector_type}")
    if (settings.image_size, settings.patch_size) != (inputs.image_size, inputs.patch_size):
        raise NevaError(f"--init {folder} was trained on a {settings.image_size} px / patch {settings.patch_size} "
                        f"vision tower, --vision {config.vision} is {inputs.image_size} px / patch "
                        f"{inputs.patch_size}")
    llm = document.get("llm", {})
    expected = {"vocab_size": inputs.llm_config.vocab_size, "hidden_size": inputs.llm_config.hidden_size}
    if {key: llm.get(key) for key in expected} != expected:
        raise NevaError(f"--init {folder} holds an LLM with {llm}, --llm {config.llm} has {expected}; "
                        "start from a run on the same LLM")
