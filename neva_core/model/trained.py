"""Building a NevaModel from weights, and the self-contained trained-model folder.

    <folder>/model.json               NeVA model config: format, family, template, projector, image size,
                                      patch size, image tokens, image token id, vision layer, tp, dtype
    <folder>/llm/                     the LLM: a complete native checkpoint (config.json, rank files, manifest)
    <folder>/projector.safetensors    projector tensors (LLaVA's mm_projector names without the prefix)
    <folder>/vision/                  the CLIP vision tower folder (copied or hard-linked)
    <folder>/tokenizer/               the tokenizer folder (copied or hard-linked)
    <folder>/manifest.json            size and sha256 of every file above; written last

A folder is complete exactly when manifest.json exists. Writers build it under a temporary name and
rename it into place; readers verify it. See docs/checkpoint-format.md ("Trained-model folder").
A run's output folder `OUT` is accepted too: it means `OUT/final`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from neva_core.checkpoint.hf import DTYPES, dtype_name
from neva_core.checkpoint.layout import (
    NativeReader,
    Provenance,
    load_native_rank,
    read_native_config,
    save_native,
    verify_native,
)
from neva_core.checkpoint.safetensors_stream import (
    StreamingWriter,
    TensorSpec,
    load_safetensors,
)
from neva_core.data.templates import TEMPLATES
from neva_core.errors import NevaError
from neva_core.io import (
    MANIFEST_NAME,
    commit_output,
    file_entry,
    is_temp_name,
    read_manifest,
    refuse_existing,
    verify_files,
    write_json_atomic,
    write_manifest,
)
from neva_core.model.config import LLMConfig
from neva_core.model.llm import NevaLLM
from neva_core.model.neva import NevaModel
from neva_core.model.parallel import (
    TPGroup,
    tp_rank,
    tp_world_size,
)
from neva_core.model.partition import merge_tensor, split_tensor, tensor_names
from neva_core.model.projector import (
    PROJECTOR_TYPES,
    build_projector,
    projector_type_of,
)
from neva_core.model.vision import DEFAULT_SELECT_LAYER, VisionTower, read_vision_config

log = logging.getLogger(__name__)

FORMAT = "neva-trained-model"
FORMAT_VERSION = 1
MODEL_CONFIG = "model.json"
LLM_DIR, VISION_DIR, TOKENIZER_DIR = "llm", "vision", "tokenizer"
PROJECTOR_FILE = "projector.safetensors"
RUN_FINAL = "final"  # a training run's OUT/final is its trained model


@dataclass(frozen=True)
class TrainedModelConfig:
    """What model.json records beside the weights: how the parts fit together and how it was prompted."""

    family: str
    template: str
    projector_type: str
    image_size: int
    patch_size: int
    image_token_id: int
    vision_select_layer: int = DEFAULT_SELECT_LAYER

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise NevaError(f"prompt template {self.template!r} is not one of {', '.join(sorted(TEMPLATES))}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise NevaError(f"projector type {self.projector_type!r} is not one of {', '.join(PROJECTOR_TYPES)}")
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise NevaError(f"image_size={self.image_size} is not a positive multiple of patch_size={self.patch_size}")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "image_tokens": self.image_tokens}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path) -> TrainedModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"vision_select_layer"}
        if missing:
            raise NevaError(f"{source} lacks {sorted(missing)}; it was not written by `save_trained_model`")
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Building a model from weights


def rank_tensors_from_full(full: Iterable[tuple[str, torch.Tensor]], config: LLMConfig,
                           tp_group: TPGroup = None) -> dict[str, torch.Tensor]:
    """This rank's shards of canonical full tensors (vocab padded for the group's size)."""
    tp, rank = tp_world_size(tp_group), tp_rank(tp_group)
    return {name: split_tensor(name, tensor, config, tp)[rank] for name, tensor in full}


def assemble_model(llm: NevaLLM, vision: VisionTower, settings: TrainedModelConfig,
                   projector_state: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                   seed: int = 0) -> NevaModel:
    """NevaModel from its parts; without `projector_state` the projector is freshly drawn from `seed`
    (the same on every rank, so replicas agree)."""
    if vision.image_size != settings.image_size or vision.patch_size != settings.patch_size:
        raise NevaError(
            f"the vision tower is {vision.image_size} px / patch {vision.patch_size}, the model config says "
            f"{settings.image_size} px / patch {settings.patch_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = build_projector(settings.projector_type, vision.hidden_size, llm.config.hidden_size)
    if projector_state is not None:
        if projector_type_of(dict(projector_state), "the projector weights") != settings.projector_type:
            raise NevaError(f"the projector weights are not a {settings.projector_type} projector")
        projector.load_state_dict(dict(projector_state), strict=True)
    if dtype is not None:
        projector.to(dtype)
        vision.to(dtype)
        llm.to(dtype)
    return NevaModel(vision, projector, llm, image_token_id=settings.image_token_id,
                     projector_type=settings.projector_type)


# ---------------------------------------------------------------------------------------------
# The trained-model folder: writing


def save_trained_model(
    out_dir: Path | str,
    *,
    llm: Path | str | NevaLLM,
    projector: nn.Module | Mapping[str, torch.Tensor],
    vision_dir: Path | str,
    tokenizer_dir: Path | str,
    settings: TrainedModelConfig,
    dtype: str = "fp32",
    provenance: Mapping[str, Any] | None = None,
    reuse: Callable[[Path], Path | None] = refuse_existing,
) -> Path:
    """Write a complete trained-model folder at `out_dir` through `io.commit_output`; return it.

    `reuse` is commit_output's check of a folder already at `out_dir`: by default any is refused; a
    caller that can tell its own earlier output returns it (kept) or None (replaced once the new one is whole).

    `llm` is a native checkpoint folder (its files are hard-linked, or copied across filesystems) or a
    NevaLLM, whose tensors are written as a TP=1 native checkpoint in `dtype`. A tensor-parallel NevaLLM
    needs this call on every rank of its group: each tensor is gathered (one at a time) and TP rank 0
    writes the folder; the others return once it is complete. The vision tower and the tokenizer
    folders are hard-linked or copied in.
    """
    out_dir = Path(out_dir)
    vision_dir, tokenizer_dir = Path(vision_dir), Path(tokenizer_dir)
    vision_config = read_vision_config(vision_dir)
    if (vision_config.image_size, vision_config.patch_size) != (settings.image_size, settings.patch_size):
        raise NevaError(f"{vision_dir} is {vision_config.image_size} px / patch {vision_config.patch_size}; "
                        f"the model config says {settings.image_size} px / patch {settings.patch_size}")
    if not tokenizer_dir.is_dir():
        raise NevaError(f"tokenizer folder {tokenizer_dir} does not exist")
    state = projector.state_dict() if isinstance(projector, nn.Module) else dict(projector)
    if projector_type_of(state, "the projector") != settings.projector_type:
        raise NevaError(f"the projector given is not a {settings.projector_type} projector")
    llm_config = llm.config if isinstance(llm, NevaLLM) else read_native_config(Path(llm))[0]
    if llm_config.family != settings.family:
        raise NevaError(f"the LLM is a {llm_config.family} model; the model config says {settings.family}")
    if isinstance(llm, NevaLLM) and tp_rank(llm.tp_group) != 0:
        for _ in _full_llm_tensors(llm, dtype):  # take part in every gather; rank 0 writes
            pass
        dist.barrier(group=llm.tp_group)
        return out_dir

    def build(tmp: Path) -> None:
        _write_llm(tmp / LLM_DIR, llm, dtype, provenance)
        link_or_copy_tree(vision_dir, tmp / VISION_DIR)
        link_or_copy_tree(tokenizer_dir, tmp / TOKENIZER_DIR)
        finish_trained_folder(tmp, state, settings, llm_config, provenance)

    commit_output(out_dir, reuse=reuse, build=build)
    if isinstance(llm, NevaLLM) and tp_world_size(llm.tp_group) > 1:
        dist.barrier(group=llm.tp_group)
    return out_dir


def finish_trained_folder(tmp: Path, projector_state: Mapping[str, torch.Tensor], settings: TrainedModelConfig,
                          llm_config: LLMConfig, provenance: Mapping[str, Any] | None) -> None:
    """Write the projector, model.json and, last, the manifest into `tmp`, which already holds the LLM,
    vision and tokenizer folders."""
    _write_projector(tmp / PROJECTOR_FILE, projector_state)
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, **settings.to_dict(),
                "llm": {"vocab_size": llm_config.vocab_size, "hidden_size": llm_config.hidden_size},
                "provenance": dict(provenance or {})}
    write_json_atomic(tmp / MODEL_CONFIG, document)
    files = {str(path.relative_to(tmp)): file_entry(path) for path in sorted(tmp.rglob("*")) if path.is_file()}
    write_manifest(tmp, {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files})


def _write_llm(dest: Path, llm: Path | str | NevaLLM, dtype: str, provenance: Mapping[str, Any] | None) -> None:
    if isinstance(llm, NevaLLM):
        save_native(dest, llm.config, tp=1, dtype=dtype,
                    provenance=Provenance(source=dict(provenance or {}), original_vocab_size=llm.config.vocab_size),
                    tensors=_full_llm_tensors(llm, dtype), wanted={"tp": 1, "dtype": dtype})
        return
    source = Path(llm)
    verify_native(source, deep=False)
    link_or_copy_tree(source, dest)


def _full_llm_tensors(llm: NevaLLM, dtype: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical full tensors of a (possibly tensor-parallel) NevaLLM in `dtype`, gathered one at a time."""
    torch_dtype = DTYPES[dtype_name(dtype)]
    state = llm.state_dict()
    tp = tp_world_size(llm.tp_group)
    for name in tensor_names(llm.config):
        local = state[name].detach().to(torch_dtype).contiguous()
        shards = [local]
        if tp > 1:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local, group=llm.tp_group)
        yield name, merge_tensor(name, shards, llm.config)


def _write_projector(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    tensors = {name: tensor.detach().contiguous() for name, tensor in sorted(state.items())}
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = StreamingWriter(path, specs, {"format": "pt"})
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def link_or_copy_tree(source: Path, dest: Path) -> None:
    """Hard-link every file of `source` under `dest` (a copy where linking is impossible).

    Temporaries of interrupted runs are skipped. A hard link shares the bytes, so the manifest's sha256
    of each file also guards the original against later edits going unnoticed.
    """
    if not source.is_dir():
        raise NevaError(f"{source} is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(is_temp_name(Path(part)) for part in relative.parts) or not path.is_file():
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


# ---------------------------------------------------------------------------------------------
# The trained-model folder: reading


def resolve_trained_folder(folder: Path | str) -> Path:
    """`folder` itself, or its `final/` when it is a run's output folder."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file() and (folder / RUN_FINAL).is_dir():
        return folder / RUN_FINAL
    return folder


def is_trained_folder(folder: Path | str) -> bool:
    folder = resolve_trained_folder(folder)
    return (folder / MODEL_CONFIG).is_file()


def read_trained_config(folder: Path | str, deep: bool = False) -> tuple[Path, TrainedModelConfig, dict[str, Any]]:
    """(resolved folder, settings, model.json) of a complete trained-model folder, verified against its
    manifest (sizes; sha256 too when `deep`)."""
    folder = resolve_trained_folder(folder)
    if not folder.is_dir():
        raise NevaError(f"trained model {folder} does not exist")
    manifest = read_manifest(folder)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise NevaError(f"{folder / MANIFEST_NAME} is not a trained-model manifest (format {manifest.get('format')!r})")
    verify_files(folder, manifest["files"], check_hash=deep)
    document = json.loads((folder / MODEL_CONFIG).read_text())
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise NevaError(f"{folder / MODEL_CONFIG} is format {document.get('format')!r} version "
                        f"{document.get('format_version')!r}; this neva reads {FORMAT!r} version {FORMAT_VERSION}")
    return folder, TrainedModelConfig.from_dict(document, folder / MODEL_CONFIG), document


def read_projector(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path)


def load_trained_model(folder: Path | str, tp_group: TPGroup = None, dtype: torch.dtype | None = None,
                       deep: bool = False, activation_checkpointing: bool = False) -> NevaModel:
    """The NevaModel of a trained-model folder (or a run's OUT) on this rank of `tp_group`.

    Rank files written for the group's TP size are read directly; for another size each rank merges
    and re-splits the tensors as it reads them. `dtype` casts every part (e.g. torch.bfloat16);
    `activation_checkpointing` recomputes each LLM decoder layer in backward.
    """
    folder, settings, _ = read_trained_config(folder, deep=deep)
    llm_dir = folder / LLM_DIR
    config, meta = read_native_config(llm_dir)
    tp = tp_world_size(tp_group)
    if int(meta["tp"]) == tp:
        rank_tensors = load_native_rank(llm_dir, tp_rank(tp_group), deep=deep)
    else:
        with NativeReader(llm_dir, deep=deep) as reader:
            rank_tensors = rank_tensors_from_full(reader.full_tensors(), config, tp_group)
    llm = NevaLLM.from_rank_tensors(config, rank_tensors, tp_group, dtype=dtype,
                                    activation_checkpointing=activation_checkpointing)
    vision = VisionTower.from_folder(folder / VISION_DIR, settings.vision_select_layer, dtype or torch.float32)
    return assemble_model(llm, vision, settings, read_projector(folder / PROJECTOR_FILE), dtype)
