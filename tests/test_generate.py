"""Greedy generation with the KV cache against transformers' generate(do_sample=False), token for token,
on the fixture LLaMA converted by `neva convert`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from model_support import converted_fixture_llama
from neva_core.errors import NevaError
from neva_core.generate import greedy_generate
from neva_core.model.llm import NevaLLM

PROMPTS = ([5, 17, 42, 99, 7, 3, 250, 11, 64], [8, 120, 33], [1, 77, 19, 240, 6])
MAX_NEW_TOKENS = 10
PAD_ID = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, NevaLLM]:
    # A wide init (0.2, not LLaMA's 0.02) keeps the greedy choices far from ties.
    hf_dir, native_dir = converted_fixture_llama(tmp_path_factory.mktemp("llama"), initializer_range=0.2)
    return LlamaForCausalLM.from_pretrained(hf_dir).eval(), NevaLLM.from_rank_file(native_dir).eval()


def padded(prompts: tuple[list[int], ...], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        columns = slice(0, len(prompt)) if side == "right" else slice(width - len(prompt), width)
        ids[row, columns] = torch.tensor(prompt)
        mask[row, columns] = True
    return ids, mask


def hf_generate(hf_model: LlamaForCausalLM, eos_id: int | None) -> list[list[int]]:
    """transformers' greedy continuations of PROMPTS (left-padded, as it requires), cut before EOS."""
    ids, mask = padded(PROMPTS, "left")
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask.long(), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                eos_token_id=eos_id, pad_token_id=PAD_ID)
    rows = out[:, ids.shape[1] :].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


@pytest.fixture(scope="module")
def reference(models: tuple[LlamaForCausalLM, NevaLLM]) -> tuple[list[list[int]], int, list[list[int]]]:
    """Continuations without EOS, an EOS id that stops row 0 at its 4th token, and the continuations with it."""
    hf_model, _ = models
    unstopped = hf_generate(hf_model, eos_id=None)
    assert all(len(row) == MAX_NEW_TOKENS for row in unstopped)
    eos_id = unstopped[0][3]
    return unstopped, eos_id, hf_generate(hf_model, eos_id)


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_generate_equals_transformers(models: tuple, reference: tuple, side: str) -> None:
    _, ours = models
    unstopped, eos_id, stopped = reference
    ids, mask = padded(PROMPTS, side)
    assert greedy_generate(ours, ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS) == unstopped
    result = greedy_generate(ours, ids, attention_mask=mask, eos_id=eos_id, max_new_tokens=MAX_NEW_TOKENS)
    assert result == stopped
    assert len(result[0]) == 3 and any(len(row) > 3 for row in result[1:])  # rows stop on their own


def test_prompt_embeddings_and_single_rows_give_the_same_tokens(models: tuple, reference: tuple) -> None:
    _, ours = models
    unstopped, _, _ = reference
    ids, mask = padded(PROMPTS, "right")
    with torch.no_grad():
        embeds = ours.embedding(ids)  # what a multimodal model passes, image features spliced in
    assert greedy_generate(ours, prompt_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS) == unstopped
    row = unstopped[1]
    assert greedy_generate(ours, torch.tensor([PROMPTS[1]]), max_new_tokens=4) == [row[:4]]
    stop = next(i for i in range(1, len(row)) if row[i] not in row[:i])  # a token not generated before
    alone = greedy_generate(ours, torch.tensor([PROMPTS[1]]), max_new_tokens=MAX_NEW_TOKENS, eos_id=[row[stop], 9999])
    assert alone == [row[:stop]]


def test_greedy_generate_refuses_bad_arguments(models: tuple) -> None:
    _, ours = models
    ids, mask = padded(PROMPTS, "right")
    with pytest.raises(NevaError, match="exactly one of prompt_ids or prompt_embeds"):
        greedy_generate(ours, max_new_tokens=3)
    with pytest.raises(NevaError, match="max_new_tokens must be at least 1"):
        greedy_generate(ours, ids, max_new_tokens=0)
    mask[1] = False
    with pytest.raises(NevaError, match="at least one real token"):
        greedy_generate(ours, ids, attention_mask=mask, max_new_tokens=3)
