"""Our NevaModel against transformers' LlavaForConditionalGeneration with the same weights and batch."""

from __future__ import annotations

import pytest
import torch

from neva_support import IMAGE_TOKEN, IMAGE_TOKENS, hf_outputs, mixed_batch, neva_from_hf, tiny_llava
from neva_core.model.llm import gather_logits

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest):
    hf_model = tiny_llava(request.param)
    return request.param, hf_model, neva_from_hf(hf_model)


def our_logits(model, batch, input_ids=None) -> torch.Tensor:
    input_ids = batch["input_ids"] if input_ids is None else input_ids
    local = model(input_ids, batch["images"], batch["attention_mask"])
    return gather_logits(local)[..., : model.llm.config.vocab_size]


@pytest.mark.parametrize("padding", [(0, 4, 3), (0, 0, 0)], ids=["padded", "unpadded"])
def test_logits_and_loss_equal_transformers(pair, padding) -> None:
    _, hf_model, ours = pair
    batch = mixed_batch(padding=padding)
    real = batch["attention_mask"]  # padding positions' logits mean nothing in either model
    with torch.no_grad():
        expected_logits, expected_loss = hf_outputs(hf_model, batch)
        logits = our_logits(ours, batch)
        loss_sum, tokens = ours.loss_terms(batch["input_ids"], batch["images"], batch["labels"],
                                           batch["attention_mask"])
    torch.testing.assert_close(logits[real], expected_logits[real])
    assert tokens == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(loss_sum / tokens, expected_loss)


def test_text_only_batch_equals_transformers_and_keeps_the_projector_in_the_graph(pair) -> None:
    _, hf_model, ours = pair
    batch = mixed_batch(image_offsets=(None, None), padding=(0, 0))
    with torch.no_grad():
        expected_logits, _ = hf_outputs(hf_model, batch)
    torch.testing.assert_close(our_logits(ours, batch).detach(), expected_logits)
    loss_sum, _ = ours.loss_terms(batch["input_ids"], batch["images"], batch["labels"])
    loss_sum.backward()
    for param in ours.projector.parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0  # in the graph, zero gradient
    ours.zero_grad(set_to_none=True)


def test_features_spliced_one_position_off_fail_the_comparison(pair) -> None:
    _, hf_model, ours = pair
    batch = mixed_batch()
    shifted = batch["input_ids"].clone()
    row, start = 0, 2
    shifted[row, start] = batch["input_ids"][row, start + IMAGE_TOKENS]  # block moves one position right
    shifted[row, start + 1:start + 1 + IMAGE_TOKENS] = IMAGE_TOKEN
    real = batch["attention_mask"]
    with torch.no_grad():
        expected_logits, _ = hf_outputs(hf_model, batch)
        torch.testing.assert_close(our_logits(ours, batch)[real], expected_logits[real])  # unshifted: equal
        shifted_logits = our_logits(ours, batch, shifted)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(shifted_logits[real], expected_logits[real])
