"""The native LLM's inference and training options against transformers and against itself: padding masks,
the KV cache, activation checkpointing, loading a rank file on the meta device, bf16, and the loss terms."""

from __future__ import annotations

import pytest
import torch

from test_llm import HF_CASES, build_pair
from neva_core.model.llm import NevaLLM

LENGTHS = (12, 7, 9)  # real tokens per row: one full row, two padded ones
PADDED_CASES = ["llama_gqa", "mistral_sliding_window", "qwen2_bias_tied"]


def padded_batch(vocab: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [3, 12] with junk in the padding, the bool mask, and each token's real position."""
    generator = torch.Generator().manual_seed(7)
    width = max(LENGTHS)
    input_ids = torch.randint(0, vocab, (len(LENGTHS), width), generator=generator)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        if side == "right":
            mask[row, :length] = True
        else:
            mask[row, width - length :] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


@pytest.fixture(scope="module", params=PADDED_CASES)
def padded_pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, NevaLLM]:
    return build_pair(request.param)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_logits_match_transformers(padded_pair: tuple[torch.nn.Module, NevaLLM], side: str) -> None:
    hf_model, ours = padded_pair
    vocab = ours.config.vocab_size
    input_ids, mask, positions = padded_batch(vocab, side)
    with torch.no_grad():
        expected = hf_model(input_ids, attention_mask=mask.long(), position_ids=positions).logits
        actual = ours(input_ids, position_ids=positions, attention_mask=mask)
    torch.testing.assert_close(actual[..., :vocab][mask], expected[mask])


def test_padding_never_reaches_real_tokens(padded_pair: tuple[torch.nn.Module, NevaLLM]) -> None:
    _, ours = padded_pair
    input_ids, mask, _ = padded_batch(ours.config.vocab_size, "right")
    other_padding = input_ids.masked_fill(~mask, 3)
    with torch.no_grad():
        logits = ours(input_ids, attention_mask=mask)
        repadded = ours(other_padding, attention_mask=mask)
        unmasked = ours(input_ids)
        all_real = ours(input_ids, attention_mask=torch.ones_like(mask))
    assert torch.isfinite(logits).all()  # padding rows are finite too (no fully masked attention row)
    torch.testing.assert_close(repadded[mask], logits[mask], rtol=0, atol=0)
    torch.testing.assert_close(all_real, unmasked)  # an all-real mask is the plain causal path
    # Control: without the mask, the right padding's junk changes nothing before it (causal) ...
    torch.testing.assert_close(unmasked[mask], logits[mask])
    # ... but left padding is seen by every real token unless masked.
    left_ids, left_mask, left_positions = padded_batch(ours.config.vocab_size, "left")
    with torch.no_grad():
        masked = ours(left_ids, position_ids=left_positions, attention_mask=left_mask)
        leaky = ours(left_ids, position_ids=left_positions)
    first_real = max(LENGTHS) - LENGTHS[1]  # row 1's first real token: padding just before it
    assert not torch.allclose(masked[1, first_real], leaky[1, first_real])
