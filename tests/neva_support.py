"""Test helpers for the NeVA model: tiny HF LLaVA models per LLM family, a mixed batch, and our model
built from the HF model's weights."""

from __future__ import annotations

from typing import Any

import torch

from neva_core.llava import model_from_llava_state
from neva_core.model.neva import NevaModel
from neva_core.model.parallel import TPGroup

VOCAB = 300
IMAGE_TOKEN = 297  # an ordinary id of the vocabulary, as the image_patch role token is
IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16
SEQ_LEN = 28

_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
TEXT_CONFIGS = {
    "llama": ("LlamaConfig", dict(_TEXT)),
    "mistral": ("MistralConfig", dict(_TEXT, sliding_window=16)),  # shorter than the batch: the window binds
    "qwen2": ("Qwen2Config", dict(_TEXT, use_sliding_window=False, tie_word_embeddings=True)),  # q/k/v bias, tied
}


def tiny_llava(family: str, seed: int = 0) -> Any:
    """A random fp32 LlavaForConditionalGeneration whose language model is of `family`, in eval mode."""
    import transformers
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    config_class, fields = TEXT_CONFIGS[family]
    text = getattr(transformers, config_class)(**fields)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=24, intermediate_size=40,
                              num_hidden_layers=3, num_attention_heads=4)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2, projector_hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        with torch.no_grad():  # non-trivial norms and biases, so a mixed-up tensor shows
            for name, param in model.named_parameters():
                if name.endswith(("norm.weight", "layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
                elif name.endswith("bias"):
                    param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def neva_from_hf(hf_model: Any, tp_group: TPGroup = None) -> NevaModel:
    """Our model with the HF LLaVA model's weights, through our own name maps and converter tables."""
    return model_from_llava_state(hf_model.state_dict(), hf_model.config.to_dict(), template="vicuna_v1",
                                  tp_group=tp_group)


def mixed_batch(image_offsets: tuple[int | None, ...] = (2, None, 7), padding: tuple[int, ...] = (0, 4, 3),
                seed: int = 1) -> dict[str, torch.Tensor]:
    """Rows with an image block at the given offset (None: a text-only row with a zero image), each
    right-padded by the given number of positions (id 0, attention_mask False, label ignored).

    labels follow input_ids (HF convention), ignored on the image tokens and the first two tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = len(image_offsets)
    input_ids = torch.randint(3, IMAGE_TOKEN, (rows, SEQ_LEN), generator=generator)
    images = torch.zeros(rows, 3, IMAGE_SIZE, IMAGE_SIZE)
    for row, offset in enumerate(image_offsets):
        if offset is not None:
            input_ids[row, offset:offset + IMAGE_TOKENS] = IMAGE_TOKEN
            images[row] = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    attention_mask = torch.ones(rows, SEQ_LEN, dtype=torch.bool)
    for row, pad in enumerate(padding[:rows]):
        if pad:
            attention_mask[row, -pad:] = False
    input_ids = input_ids.masked_fill(~attention_mask, 0)
    labels = input_ids.masked_fill((input_ids == IMAGE_TOKEN) | ~attention_mask, -100)
    labels[:, :2] = -100
    has_image = torch.tensor([offset is not None for offset in image_offsets])
    return {"input_ids": input_ids, "labels": labels, "images": images, "has_image": has_image,
            "attention_mask": attention_mask}


def hf_outputs(hf_model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, mean loss) of transformers' LLaVA: pixel values only for the rows that have an image."""
    pixel_values = batch["images"][batch["has_image"]]
    out = hf_model(input_ids=batch["input_ids"], pixel_values=pixel_values if len(pixel_values) else None,
                   attention_mask=batch["attention_mask"].long(), labels=batch["labels"])
    return out.logits, out.loss
