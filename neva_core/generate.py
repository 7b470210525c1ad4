"""Batched greedy decoding with a KV cache on the native LLM, at any tensor-parallel size.

The prompt is token ids or, for a multimodal model, its input embeddings (image features already
spliced in); every new token is embedded by the LLM's own embedding. Rows may be padded on the left or
the right: the attention mask keeps padding out of attention and the position ids count real tokens
only, so a row decodes exactly as it would alone. Every TP rank gathers the full logits and takes the
same argmax, so all ranks produce the same tokens.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from neva_core.errors import NevaError
from neva_core.model.llm import KVCache, NevaLLM, gather_logits


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
    mask = torch.ones(batch, prompt_len, dtype=torch.bool, device=device) if attention_mask is None else (
        attention_mask.to(device=device, dtype=torch.bool))
    if mask.shape != (batch, prompt_len):
        raise NevaError(f"attention_mask has shape {tuple(mask.shape)}, expected {(batch, prompt_len)}")
    if not bool(mask.any(dim=-1).all()):
        raise NevaError("every prompt needs at least one real token (a row of attention_mask is all False)")
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


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:index]
    return tokens
