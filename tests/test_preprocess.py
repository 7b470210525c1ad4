"""CLIP image preprocessing: `square` equals transformers' CLIPImageProcessor, `pad` is LLaVA's expand2square."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neva_core.data.preprocess import PREPROCESSOR_CONFIG, ImageProcessor
from neva_core.errors import NevaError
from neva_core.fixtures import Fixtures

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# (width, height): square, landscape, portrait, odd sizes, smaller and larger than the crop.
SIZES = [(64, 64), (97, 61), (50, 131), (640, 480), (333, 500), (300, 301)]


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def clip_336_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preprocessor config in the older form openai/clip-vit-large-patch14-336 ships (plain ints)."""
    folder = tmp_path_factory.mktemp("clip-336")
    config = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
              "resample": 3, "size": 336}
    (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def clip_224_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The current config form, as transformers writes it, at 224 px."""
    from transformers import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("clip-224")
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                          image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)
    return folder


def reference(folder: Path, image: Image.Image) -> torch.Tensor:
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(folder)
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("which", ["fixture", "224", "336"])
def test_square_equals_transformers(which: str, neva_fixtures: Fixtures, clip_224_dir: Path,
                                    clip_336_dir: Path) -> None:
    folder = {"fixture": neva_fixtures.vision_dir, "224": clip_224_dir, "336": clip_336_dir}[which]
    ours = ImageProcessor.from_folder(folder, "square")
    for seed, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed)
        expected = reference(folder, image)
        got = ours(image)
        assert got.dtype == torch.float32 and got.shape == expected.shape == (3, ours.crop_height, ours.crop_width)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_pad_is_expand2square_then_clip(clip_336_dir: Path) -> None:
    ours = ImageProcessor.from_folder(clip_336_dir, "pad")
    assert ours.background == (122, 116, 104)  # LLaVA's tuple(int(x * 255) for x in image_mean)
    for seed, (width, height) in enumerate([(97, 61), (50, 131), (64, 64)]):
        image = random_image(width, height, seed)
        side = max(width, height)
        padded = Image.new("RGB", (side, side), (122, 116, 104))
        padded.paste(image, ((side - width) // 2, (side - height) // 2))
        torch.testing.assert_close(ours(image), reference(clip_336_dir, padded), atol=1e-6, rtol=0)
    # A wide image keeps its whole content: the padded rows are the mean colour, which normalises to ~0.
    wide = ours(Image.new("RGB", (400, 100), (255, 255, 255)))
    assert wide[:, :100].abs().max() < 0.02 and wide[:, 168].min() > 1.5
    square = ImageProcessor.from_folder(clip_336_dir, "square")(Image.new("RGB", (400, 100), (255, 255, 255)))
    assert square.min() > 1.5  # centre crop of a white image: white everywhere


def test_bad_configs_are_named(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match="preprocessor_config.json does not exist"):
        ImageProcessor.from_folder(tmp_path)
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps({"size": {"height": 224, "width": 224},
                                                            "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    with pytest.raises(NevaError, match="shortest"):
        ImageProcessor.from_folder(tmp_path)
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps({"size": 224, "image_mean": [0.5], "image_std": CLIP_STD}))
    with pytest.raises(NevaError, match="image_mean must be a list of 3"):
        ImageProcessor.from_folder(tmp_path)
    with pytest.raises(NevaError, match="aspect 'keep'"):
        ImageProcessor.from_folder(tmp_path, "keep")  # type: ignore[arg-type]
