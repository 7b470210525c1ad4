"""Real-size NeVA models (CLIP ViT-L/14-336 + LLaMA-2 7B / 13B) on the meta device: parameter counts per
part and per stage, and the sequence through the model with 576 image tokens."""

from __future__ import annotations

import pytest
import torch

from neva_core.checkpoint.hf import llm_config_from_hf
from neva_core.model.llm import NevaLLM
from neva_core.model.neva import Stage
from neva_core.model.trained import TrainedModelConfig, assemble_model
from neva_core.model.vision import VisionTower
from test_meta_shapes import MODELS, PARAMETERS

# openai/clip-vit-large-patch14-336's vision_config (published config.json).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def clip_l_336_parameters() -> int:
    """Written out from the architecture: patch conv (no bias), CLS, 577 positions, pre/post norms, 24 layers."""
    hidden, ffn, layers = 1024, 4096, 24
    embeddings = 3 * 14 * 14 * hidden + hidden + (24 * 24 + 1) * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + (hidden * ffn + ffn) + (ffn * hidden + hidden)
    return embeddings + 2 * 2 * hidden + layers * layer


def mlp2x_parameters(vision_hidden: int, llm_hidden: int) -> int:
    return vision_hidden * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def meta_model(size: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        vision = VisionTower(CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336)))
        llm = NevaLLM(llm_config_from_hf(MODELS[size]))
        settings = TrainedModelConfig(family="llama", template="vicuna_v1", projector_type="mlp2x_gelu",
                                      image_size=336, patch_size=14, image_token_id=32000 - 1)
        return assemble_model(llm, vision, settings)


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_parameter_counts_and_trainable_counts_per_stage(size: str) -> None:
    model = meta_model(size)
    assert model.image_tokens == 576
    llm_hidden = MODELS[size]["hidden_size"]
    projector = mlp2x_parameters(1024, llm_hidden)
    assert clip_l_336_parameters() == 303_507_456  # the published CLIP-L/14-336 vision tower
    assert model.parameter_summary(Stage.PRETRAIN) == {
        "vision": {"trainable": 0, "frozen": clip_l_336_parameters()},
        "projector": {"trainable": projector, "frozen": 0},
        "llm": {"trainable": 0, "frozen": PARAMETERS[size]},
    }
    finetune = model.parameter_summary(Stage.FINETUNE)
    assert finetune["llm"] == {"trainable": PARAMETERS[size], "frozen": 0}
    assert sum(p.numel() for p in model.trainable_parameters(Stage.FINETUNE)) == projector + PARAMETERS[size]
    assert sum(p.numel() for p in model.trainable_parameters(Stage.PRETRAIN)) == projector


def test_7b_sequence_with_576_image_tokens() -> None:
    model = meta_model("7b")
    text_tokens = 40
    input_ids = torch.randint(0, 31000, (2, 1 + 576 + text_tokens))
    input_ids[:, 1:577] = model.image_token_id
    images = torch.empty(2, 3, 336, 336, device="meta")
    embeddings = model.embed(input_ids.to("meta"), images)
    assert embeddings.shape == (2, 617, 4096) and embeddings.device.type == "meta"
    logits = model(input_ids.to("meta"), images)
    assert logits.shape == (2, 617, 32000)
