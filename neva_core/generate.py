"""Batched greedy decoding with a KV cache on the native LLM, at any tensor-parallel size, and answers
of a NeVA model to questions about images, prompted by its training template.

The prompt is token ids or, for a multimodal model, its input embeddings (image features already
spliced in); every new token is embedded by the LLM's own embedding. Rows may be padded on the left or
the right: the attention mask keeps padding out of attention and the position ids count real tokens
only, so a row decodes exactly as it would alone. Every TP rank gathers the full logits and takes the
same argmax, so all ranks produce the same tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import torch

from neva_core.data.templates import build_generation_prompt
from neva_core.data.text_tokenizer import TextTokenizer
from neva_core.errors import NevaError
from neva_core.model.llm import KVCache, NevaLLM, gather_logits

if TYPE_CHECKING:
    from neva_core.model.neva import NevaModel  # the vision side is only needed by callers that have one

# Where a template's answer ends besides EOS: `plain` (pretraining) trains a caption followed by a newline.
ANSWER_END = {"plain": "\n"}


@torch.no_grad()
def greedy_generate(
    llm: NevaLLM,
    prompt_ids: torch.Tensor | None = None,
    *,
    prompt_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_id: int | Collection[int] | None = None,
    max_new_tokens: int,
) -> list[list[int]]:
    """The new tokens of each row, greedy, until EOS (not included) or max_new_tokens.

    prompt_ids [B, T] or prompt_embeds [B, T, H] (exactly one); attention_mask [B, T] (True = real token,
    padding on either side; None = no padding). eos_id: one id or several (e.g. `</s>` and a template's
    turn separator); None decodes max_new_tokens tokens for every row.
    """
    if (prompt_ids is None) == (prompt_embeds is None):
        raise NevaError("greedy_generate needs exactly one of prompt_ids or prompt_embeds")
    if max_new_tokens < 1:
        raise NevaError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prompt = prompt_ids if prompt_embeds is None else prompt_embeds
    batch, prompt_len = prompt.shape[:2]
    device = prompt.device
    mask = _prompt_mask(attention_mask, batch, prompt_len, device)
    stop_ids = torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id or ())),
                            dtype=torch.long, device=device)

    cache = KVCache.for_model(llm, batch, prompt_len + max_new_tokens)
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    hidden = llm.hidden_states(prompt_ids, positions, prompt_embeds, mask, cache)
    # Each row continues from its last real token (the last column only under left padding).
    last_real = (mask.long() * torch.arange(prompt_len, device=device)).argmax(dim=-1)
    rows = torch.arange(batch, device=device)
    local_logits = llm.output_logits(hidden[rows, last_real])
    next_position = mask.sum(dim=-1)

    generated: list[torch.Tensor] = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = gather_logits(local_logits, llm.tp_group)[:, : llm.config.vocab_size].argmax(dim=-1)
        generated.append(tokens)
        finished |= torch.isin(tokens, stop_ids)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        # Finished rows keep decoding (their tokens are dropped below) so the batch stays rectangular.
        local_logits = llm(tokens.unsqueeze(1), position_ids=next_position.unsqueeze(1), kv_cache=cache)[:, 0]
        next_position = next_position + 1
    return [_until_stop(row, set(stop_ids.tolist())) for row in torch.stack(generated, dim=1).tolist()]


def _prompt_mask(attention_mask: torch.Tensor | None, batch: int, prompt_len: int,
                 device: torch.device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, prompt_len, dtype=torch.bool, device=device)
    if attention_mask.shape != (batch, prompt_len):
        raise NevaError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, prompt_len)}")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if not bool(mask.any(dim=-1).all()):
        raise NevaError("every prompt needs at least one real token (a row of attention_mask is all False)")
    return mask


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:index]
    return tokens


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] and attention_mask [B, T] of prompts padded on the left to the longest."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = True
    return input_ids, mask


def generate_answers(
    model: NevaModel,
    tokenizer: TextTokenizer,
    template: str,
    questions: Sequence[str],
    images: torch.Tensor | None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of `model` to one question per image (images [B, 3, S, S], preprocessed; None for
    text-only questions), each prompt built by `template` as in training."""
    if images is not None and images.shape[0] != len(questions):
        raise NevaError(f"{images.shape[0]} images for {len(questions)} questions: pass one image per question")
    prompts = [build_generation_prompt(template, question, tokenizer, model.image_tokens, has_image=images is not None)
               for question in questions]
    device = model.llm.embedding.word_embeddings.weight.device
    input_ids, mask = left_padded(prompts, tokenizer.pad_id)
    with torch.no_grad():
        embeds = model.embed(input_ids.to(device), None if images is None else images.to(device))
    stop = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    answers = greedy_generate(model.llm, prompt_embeds=embeds, attention_mask=mask.to(device), eos_id=stop,
                              max_new_tokens=max_new_tokens)
    texts = [tokenizer.decode(tokens) for tokens in answers]
    if template in ANSWER_END:
        texts = [text.split(ANSWER_END[template], 1)[0] for text in texts]
    return [text.strip() for text in texts]
