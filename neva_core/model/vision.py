"""The frozen CLIP vision tower: patch features from one hidden layer, CLS dropped, as LLaVA uses them.

A local Hugging Face folder holds either a full `CLIPModel` (text and vision towers, `model_type: clip`,
as `openai/clip-vit-large-patch14-336` ships) or a `CLIPVisionModel` (`model_type: clip_vision_model`).
Only the vision weights are read. safetensors are preferred; a `pytorch_model.bin` is read with
`torch.load(weights_only=True)`, which refuses pickled objects other than tensors.

The tower is built on the meta device and its weights assigned from the file, so no random
initialisation is drawn. It never trains: parameters are frozen, the module stays in eval mode and the
forward runs under no_grad.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neva_core.checkpoint.safetensors_stream import SafetensorsReader
from neva_core.errors import NevaError

DEFAULT_SELECT_LAYER = -2  # LLaVA / NeVA: the penultimate layer's hidden states
VISION_MODEL_TYPES = {"clip": "full CLIPModel", "clip_vision_model": "CLIPVisionModel"}
SAFETENSORS_SINGLE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
_VISION_PREFIX = "vision_model."
_UNUSED_BUFFERS = ("embeddings.position_ids",)  # old checkpoints store it; it is rebuilt from the config


def read_vision_config(folder: Path) -> Any:
    """The `CLIPVisionConfig` of a CLIPModel or CLIPVisionModel folder; NevaError naming the folder otherwise."""
    path = folder / "config.json"
    if not path.is_file():
        raise NevaError(f"{folder} is not a Hugging Face model folder (no config.json); pass a CLIP vision tower folder")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NevaError(f"{path} is not valid JSON ({exc}); download the vision tower again") from exc
    model_type = document.get("model_type")
    if model_type not in VISION_MODEL_TYPES:
        raise NevaError(
            f"{folder} holds a {model_type!r} model, not a CLIP model; the vision tower must be a CLIPModel "
            f"(model_type 'clip') or CLIPVisionModel (model_type 'clip_vision_model') folder"
        )
    return clip_vision_config(document.get("vision_config", {}) if model_type == "clip" else document)


def clip_vision_config(fields: Mapping[str, Any]) -> Any:
    """A CLIPVisionConfig from the fields of a config.json (or of its `vision_config` part)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{k: v for k, v in fields.items()
                               if k not in ("model_type", "architectures", "transformers_version")})


def read_vision_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The vision encoder's tensors of `folder`, named without the `vision_model.` prefix."""
    return vision_tensors(read_state_dict(folder, "CLIP"), folder)


def read_state_dict(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model folder: safetensors (single or indexed) first, else pytorch_model.bin."""
    if (folder / SAFETENSORS_INDEX).is_file():
        files = _indexed_files(folder / SAFETENSORS_INDEX)
        return {name: t for file in files for name, t in _read_safetensors(folder / file).items()}
    if (folder / SAFETENSORS_SINGLE).is_file():
        return _read_safetensors(folder / SAFETENSORS_SINGLE)
    if (folder / BIN_SINGLE).is_file():
        return read_bin(folder / BIN_SINGLE)
    raise NevaError(
        f"{folder} holds no {what} weights: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE}"
    )


def vision_tensors(state: dict[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
    """Keep the vision tower's tensors of a CLIPModel / CLIPVisionModel state dict, prefix removed."""
    prefixed = any(name.startswith(_VISION_PREFIX) for name in state)
    vision = {}
    for name, tensor in state.items():
        if prefixed:
            if not name.startswith(_VISION_PREFIX):
                continue  # text tower, projections, logit scale
            name = name[len(_VISION_PREFIX):]
        if name not in _UNUSED_BUFFERS:
            vision[name] = tensor
    if not vision:
        raise NevaError(f"{source} holds no CLIP vision tower tensors")
    return vision


def _indexed_files(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NevaError(f"{index} is not a valid checkpoint index (no weight_map): {exc}") from exc
    return sorted(set(weight_map.values()))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NevaError(f"{path} is missing; download the vision tower again")
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.names()}


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, loaded with weights_only=True: plain tensors only, never arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise NevaError(
            f"{path} holds objects other than tensors ({found[1] if found else 'not a plain state dict'}) and is "
            f"refused for safety; convert it to safetensors where you trust the file (transformers' "
            f"CLIPModel.from_pretrained, then save_pretrained(safe_serialization=True))"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise NevaError(f"cannot read {path} (damaged?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NevaError(f"{path} is not a state dict of tensors")
    return state


class VisionTower(nn.Module):
    """A frozen CLIP vision encoder returning [B, patches, C] features of `select_layer` (CLS dropped).

    Under tensor parallelism every rank holds the whole tower (it is small next to the LLM) and computes
    the same features from the same images.
    """

    def __init__(self, clip: nn.Module, select_layer: int = DEFAULT_SELECT_LAYER) -> None:
        super().__init__()
        config = clip.config
        layers = config.num_hidden_layers
        if not -layers - 1 <= select_layer <= layers:
            raise NevaError(
                f"vision_select_layer={select_layer} does not exist: the tower has {layers} layers "
                f"(valid: {-layers - 1}..{layers})"
            )
        self.clip = clip
        self.select_layer = select_layer
        self.image_size: int = config.image_size
        self.patch_size: int = config.patch_size
        self.hidden_size: int = config.hidden_size
        self.freeze()

    @classmethod
    def from_folder(cls, folder: Path | str, select_layer: int = DEFAULT_SELECT_LAYER,
                    dtype: torch.dtype = torch.float32) -> VisionTower:
        """The tower of a local CLIPModel or CLIPVisionModel folder."""
        folder = Path(folder)
        return cls.from_state(read_vision_config(folder), read_vision_weights(folder), select_layer, dtype, folder)

    @classmethod
    def from_state(cls, config: Any, weights: dict[str, torch.Tensor], select_layer: int = DEFAULT_SELECT_LAYER,
                   dtype: torch.dtype = torch.float32, source: Path | str = "the vision weights") -> VisionTower:
        """The tower of a CLIPVisionConfig and its tensors (named without the `vision_model.` prefix).

        Built on the meta device and assigned the given tensors: no random initialisation is drawn.
        """
        from transformers import CLIPVisionModel

        with torch.device("meta"):
            clip = CLIPVisionModel(config)
        expected = clip.state_dict()
        prefix = _VISION_PREFIX if all(k.startswith(_VISION_PREFIX) for k in expected) else ""
        weights = {prefix + name: tensor.to(dtype) for name, tensor in weights.items()}
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise NevaError(
                f"{source} does not match its CLIP config (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}); download the vision tower again"
            )
        for name, tensor in weights.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise NevaError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, its CLIP config "
                                f"says {tuple(expected[name].shape)}")
        clip.load_state_dict(weights, assign=True)
        _rebuild_meta_buffers(clip, source)
        return cls(clip.to(dtype), select_layer)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tower's tensors named as in a CLIPVisionModel file without the `vision_model.` prefix."""
        return vision_tensors(dict(self.clip.state_dict()), "the vision tower")

    @property
    def num_patches(self) -> int:
        """Image tokens per image: (image_size / patch_size)^2, CLS not counted."""
        return (self.image_size // self.patch_size) ** 2

    def freeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VisionTower:
        # Always eval: model.train() on the whole NeVA model must not put CLIP into training mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (CLIP-normalised) -> features [B, (S/patch)^2, C] of the selected layer."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise NevaError(
                f"images are {tuple(images.shape[-2:])} pixels; the vision tower takes {self.image_size}x{self.image_size}"
            )
        dtype = next(self.clip.parameters()).dtype
        outputs = self.clip(pixel_values=images.to(dtype), output_hidden_states=True)
        return outputs.hidden_states[self.select_layer][:, 1:]


def _rebuild_meta_buffers(clip: nn.Module, source: Path | str) -> None:
    """Non-persistent buffers (position ids) are not in the file: rebuild them from the config."""
    for module_name, module in clip.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise NevaError(f"{source}: buffer {module_name}.{name} is not in the weights")
            module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
