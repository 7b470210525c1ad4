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


def test_logits_and_loss_equal_transformers(pair) -> None:
    _, hf_model, ours = pair
    batch = mixed_batch()
    with torch.no_grad():
        expected_logits, expected_loss = hf_outputs(hf_model, batch)
        logits = gather_logits(ours(batch["input_ids"], batch["images"]))[..., : ours.llm.config.vocab_size]
        loss_sum, tokens = ours.loss_terms(batch["input_ids"], batch["images"], batch["labels"])
    torch.testing.assert_close(logits, expected_logits)
    assert tokens == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(loss_sum / tokens, expected_loss)


def test_text_only_batch_equals_transformers_and_keeps_the_projector_in_the_graph(pair) -> None:
    _, hf_model, ours = pair
    batch = mixed_batch(image_offsets=(None, None))
    with torch.no_grad():
        expected_logits, _ = hf_outputs(hf_model, batch)
    logits = gather_logits(ours(batch["input_ids"], batch["images"]))[..., : ours.llm.config.vocab_size]
    torch.testing.assert_close(logits.detach(), expected_logits)
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
    with torch.no_grad():
        expected_logits, _ = hf_outputs(hf_model, batch)
        logits = gather_logits(ours(shifted, batch["images"]))[..., : ours.llm.config.vocab_size]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logits, expected_logits)
