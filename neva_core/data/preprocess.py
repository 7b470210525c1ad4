"""CLIP image preprocessing for training and generation: `square` and `pad`, read from the vision folder.

`square` (pretraining) is CLIP's own: resize the shortest side (bicubic), centre crop, rescale to [0, 1],
normalise with the CLIP mean and std; it equals transformers' `CLIPImageProcessor` on the same image.
`pad` (LLaVA-1.5 finetuning) first pads the image to a square with the mean colour
(`tuple(int(x * 255) for x in mean)`), centred as LLaVA's `expand2square` does, then applies `square`.

The settings come from the folder's `preprocessor_config.json`, in the current form (`size:
{"shortest_edge": n}`, `crop_size: {"height", "width"}`) or the older one real CLIP repos still ship
(`size: 336`, `crop_size: 336`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from neva_core.errors import NevaError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
Aspect = Literal["square", "pad"]
ASPECTS: tuple[str, ...] = ("square", "pad")
_BICUBIC = 3


@dataclass(frozen=True)
class ImageProcessor:
    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: Aspect = "square"
    resample: int = _BICUBIC
    rescale_factor: float = 1 / 255

    @classmethod
    def from_folder(cls, vision_dir: Path, aspect: Aspect = "square") -> ImageProcessor:
        """The processor described by `vision_dir/preprocessor_config.json`."""
        path = Path(vision_dir) / PREPROCESSOR_CONFIG
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise NevaError(f"{path} does not exist; the vision folder needs its CLIP preprocessor config") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise NevaError(f"cannot read {path}: {exc}") from exc
        return cls.from_config(config, aspect, source=path)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], aspect: Aspect = "square", *,
                    source: Path | str = PREPROCESSOR_CONFIG) -> ImageProcessor:
        if aspect not in ASPECTS:
            raise NevaError(f"image aspect {aspect!r} is not one of {', '.join(ASPECTS)}")
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag, True) is not True:
                raise NevaError(f"{source}: {flag} is {config[flag]!r}; the CLIP pipeline needs it true")
        shortest_edge = _shortest_edge(config.get("size"), source)
        crop_height, crop_width = _crop_size(config.get("crop_size", shortest_edge), source)
        if crop_height > shortest_edge or crop_width > shortest_edge:
            raise NevaError(f"{source}: crop_size {crop_height}x{crop_width} is larger than size {shortest_edge}")
        return cls(
            shortest_edge=shortest_edge,
            crop_height=crop_height,
            crop_width=crop_width,
            mean=_triple(config, "image_mean", source),
            std=_triple(config, "image_std", source),
            aspect=aspect,
            resample=int(config.get("resample", _BICUBIC)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        )

    @property
    def background(self) -> tuple[int, int, int]:
        """LLaVA's padding colour: the mean in 0-255, truncated."""
        return tuple(int(x * 255) for x in self.mean)  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """FloatTensor[3, crop_height, crop_width]."""
        image = image.convert("RGB")
        if self.aspect == "pad":
            image = expand_to_square(image, self.background)
        pixels = np.asarray(self._resize(image))
        top = (pixels.shape[0] - self.crop_height) // 2
        left = (pixels.shape[1] - self.crop_width) // 2
        pixels = pixels[top: top + self.crop_height, left: left + self.crop_width]
        # float64 then float32 at each step, as transformers' rescale does, so results match to the last bits
        scaled = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean, std = np.array(self.mean, dtype=np.float32), np.array(self.std, dtype=np.float32)
        normalised = (scaled - mean) / std
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        return image.resize(size, resample=self.resample)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side with `background`, the image centred (offset rounded down), as LLaVA does."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _shortest_edge(size: Any, source: Path | str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, Mapping) and isinstance(size.get("shortest_edge"), int):
        return size["shortest_edge"]
    raise NevaError(f"{source}: size must be an int or {{\"shortest_edge\": n}} (CLIP resizes the shortest side), "
                    f"got {size!r}")


def _crop_size(crop: Any, source: Path | str) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, Mapping) and isinstance(crop.get("height"), int) and isinstance(crop.get("width"), int):
        return crop["height"], crop["width"]
    raise NevaError(f"{source}: crop_size must be an int or {{\"height\", \"width\"}}, got {crop!r}")


def _triple(config: Mapping[str, Any], key: str, source: Path | str) -> tuple[float, float, float]:
    value = config.get(key)
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(x, (int, float)) for x in value):
        raise NevaError(f"{source}: {key} must be a list of 3 numbers (one per RGB channel), got {value!r}")
    return tuple(float(x) for x in value)  # type: ignore[return-value]
