"""Hugging Face `LlavaForConditionalGeneration` tensor names <-> the NeVA model's parts, as name maps.

HF LLaVA checkpoints hold three groups of tensors. Files written by LLaVA's converter (and the
`llava-hf/*` repos) use the first prefixes; transformers 5 names the same tensors in memory with the
second ones and maps files either way:

    LLM           language_model.model.* / language_model.lm_head.*     model.language_model.* / lm_head.*
    vision tower  vision_tower.vision_model.*                           model.vision_tower.*
    projector     multi_modal_projector.*                               model.multi_modal_projector.*

`split_llava_state` sorts either layout into the LLM's HF causal-LM names (`model.*`, `lm_head.weight`),
the vision tower's names without `vision_model.`, and the projector's names; the LLM part then goes
through the converter's own family tables (`neva_core.checkpoint.hf`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neva_core.checkpoint.hf import (
    from_native,
    llm_config_from_hf,
    tensor_recipe,
    to_native,
)
from neva_core.checkpoint.partition import tensor_names
from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig
from neva_core.model.projector import projector_from_hf
from neva_core.model.vision import clip_vision_config, vision_tensors

# (prefix in an HF LLaVA state dict, part, prefix it becomes)
_PREFIXES = (
    ("language_model.model.", "llm", "model."),
    ("language_model.lm_head.", "llm", "lm_head."),
    ("model.language_model.", "llm", "model."),
    ("lm_head.", "llm", "lm_head."),
    ("vision_tower.", "vision", ""),
    ("model.vision_tower.", "vision", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.multi_modal_projector.", "projector", ""),
)
FILE_PREFIXES = {"llm": "language_model.", "vision": "vision_tower.vision_model.", "projector": "multi_modal_projector."}


class RenamedTensors(Mapping[str, torch.Tensor]):
    """A read-only view of `state` under new names; a tensor is looked up (read, for a lazy state) only
    when asked for, so a 7B checkpoint is never held whole."""

    def __init__(self, state: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
        self._state, self._names = state, dict(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._state[self._names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def source_names(self) -> dict[str, str]:
        """New name -> name in the underlying state."""
        return dict(self._names)


def split_llava_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Mapping[str, torch.Tensor]]:
    """{"llm": HF causal-LM tensors, "vision": CLIP tensors, "projector": linear_1/linear_2 tensors}, as
    views of `state` (nothing is read until a tensor is looked up)."""
    names: dict[str, dict[str, str]] = {"llm": {}, "vision": {}, "projector": {}}
    for name in state:
        for prefix, part, replacement in _PREFIXES:
            if name.startswith(prefix):
                names[part][replacement + name[len(prefix):]] = name
                break
        else:
            raise NevaError(f"{source}: tensor {name!r} is not part of an HF LLaVA model")
    return {part: RenamedTensors(state, part_names) for part, part_names in names.items()}


def native_llm_tensors(hf_llm: Mapping[str, torch.Tensor], config: LLMConfig,
                       source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical full native tensors from HF causal-LM tensors (tied models may lack lm_head)."""
    for name in tensor_names(config):
        recipe = tensor_recipe(name, config.family)
        missing = [hf_name for hf_name in recipe.hf_names if hf_name not in hf_llm]
        if missing:
            raise NevaError(f"{source} has no tensor {missing[0]!r} for the {config.family} language model")
        yield name, to_native(name, [hf_llm[hf_name] for hf_name in recipe.hf_names], config)


def hf_llm_file_tensors(name: str, full: torch.Tensor, config: LLMConfig) -> list[tuple[str, torch.Tensor]]:
    """A native LLM tensor as the HF LLaVA file names it (`language_model.` + the causal-LM name)."""
    return [(FILE_PREFIXES["llm"] + hf_name, tensor) for hf_name, tensor in from_native(name, full, config)]


@dataclass(frozen=True)
class LlavaParts:
    """An HF LLaVA model's weights sorted into the NeVA model's parts."""

    llm_config: LLMConfig
    llm_hf: Mapping[str, torch.Tensor]  # the LLM's HF causal-LM tensors (a lazy view)
    vision_config: Any  # CLIPVisionConfig
    vision_tensors: dict[str, torch.Tensor]
    projector_type: str
    projector_tensors: dict[str, torch.Tensor]
    image_token_id: int
    vision_select_layer: int
    source: str

    def llm_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Canonical full native LLM tensors, formed one at a time in canonical order."""
        return native_llm_tensors(self.llm_hf, self.llm_config, self.source)


def llava_parts(state: Mapping[str, torch.Tensor], llava_config: Mapping[str, Any], source: str) -> LlavaParts:
    """Sort an HF LLaVA state dict (either naming) and its config.json into our parts."""
    if llava_config.get("model_type") != "llava":
        raise NevaError(f"{source} is a {llava_config.get('model_type')!r} model, not LLaVA (model_type 'llava')")
    strategy = llava_config.get("vision_feature_select_strategy", "default")
    layer = llava_config.get("vision_feature_layer", -2)
    if strategy != "default" or not isinstance(layer, int):
        raise NevaError(f"{source}: vision_feature_select_strategy={strategy!r}, vision_feature_layer={layer!r}; "
                        f"only LLaVA-1.5's 'default' strategy (CLS dropped) with one layer is supported")
    parts = split_llava_state(state, source)
    llm_config = llm_config_from_hf(dict(llava_config["text_config"]))
    projector_type, projector = projector_from_hf(dict(parts["projector"]),
                                                  llava_config.get("projector_hidden_act", "gelu"), source)
    image_token = llava_config.get("image_token_index", llava_config.get("image_token_id"))
    if image_token is None:
        raise NevaError(f"{source}: config.json has no image_token_index")
    return LlavaParts(
        llm_config=llm_config,
        llm_hf=parts["llm"],
        vision_config=clip_vision_config(llava_config["vision_config"]),
        vision_tensors=vision_tensors(dict(parts["vision"]), source),
        projector_type=projector_type,
        projector_tensors=projector,
        image_token_id=int(image_token),
        vision_select_layer=layer,
        source=source,
    )
