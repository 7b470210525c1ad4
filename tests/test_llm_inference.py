"""The native LLM's inference and training options against transformers and against itself: padding masks,
the KV cache, activation checkpointing, loading a rank file on the meta device, bf16, and the loss terms."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from model_support import converted_fixture_llama, tiny_config
from test_llm import build_pair
from neva_core.checkpoint.layout import load_native_rank, read_native_config
from neva_core.errors import NevaError
from neva_core.model.llm import KVCache, NevaLLM, training_attention_mask

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


def full_sequence(input_ids: torch.Tensor, mask: torch.Tensor, new_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The prompt followed by `new_tokens`, its mask and its real positions, as one sequence."""
    full_ids = torch.cat([input_ids, new_tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new_tokens, dtype=torch.bool)], dim=1)
    return full_ids, full_mask, (full_mask.long().cumsum(-1) - 1).clamp(min=0)


def test_training_mask_drops_right_padding_only(padded_pair: tuple[torch.nn.Module, NevaLLM]) -> None:
    """A right-padded batch trains with the fused causal kernel (mask None) and the same real-token logits;
    a left-padded one keeps its mask."""
    _, ours = padded_pair
    input_ids, right, _ = padded_batch(ours.config.vocab_size, "right")
    assert training_attention_mask(right) is None
    _, left, _ = padded_batch(ours.config.vocab_size, "left")
    assert training_attention_mask(left) is left
    with torch.no_grad():
        masked, causal = ours(input_ids, attention_mask=right), ours(input_ids, attention_mask=None)
    torch.testing.assert_close(causal[right], masked[right])


@pytest.mark.parametrize("side", ["right", "left"])
def test_kv_cache_steps_equal_a_full_recompute(padded_pair: tuple[torch.nn.Module, NevaLLM], side: str) -> None:
    _, ours = padded_pair
    input_ids, mask, positions = padded_batch(ours.config.vocab_size, side)
    steps, width = 6, input_ids.shape[1]  # 6 steps: past Mistral's window of 5
    new_tokens = torch.randint(0, ours.config.vocab_size, (len(LENGTHS), steps), generator=torch.Generator().manual_seed(8))
    full_ids, full_mask, full_positions = full_sequence(input_ids, mask, new_tokens)
    cache = KVCache.for_model(ours, len(LENGTHS), width + steps)
    with torch.no_grad():
        full = ours(full_ids, position_ids=full_positions, attention_mask=full_mask)
        prefill = ours(input_ids, position_ids=positions, attention_mask=mask, kv_cache=cache)
        torch.testing.assert_close(prefill[mask], full[:, :width][mask])
        for step in range(steps):
            column = width + step
            logits = ours(new_tokens[:, step : step + 1], position_ids=full_positions[:, column : column + 1],
                          kv_cache=cache)
            torch.testing.assert_close(logits[:, 0], full[:, column], msg=f"step {step}")
    assert cache.length == width + steps


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_decode_as_they_would_alone(padded_pair: tuple[torch.nn.Module, NevaLLM], side: str) -> None:
    """Right padding sits between a prompt and its continuation; Mistral's window must not count it."""
    _, ours = padded_pair
    input_ids, mask, positions = padded_batch(ours.config.vocab_size, side)
    new_tokens = torch.randint(0, ours.config.vocab_size, (len(LENGTHS), 6), generator=torch.Generator().manual_seed(8))
    cache = KVCache.for_model(ours, len(LENGTHS), input_ids.shape[1] + new_tokens.shape[1])
    with torch.no_grad():
        ours(input_ids, position_ids=positions, attention_mask=mask, kv_cache=cache)
        next_position = mask.sum(-1, keepdim=True)
        steps = torch.cat([ours(new_tokens[:, i : i + 1], position_ids=next_position + i, kv_cache=cache)
                           for i in range(new_tokens.shape[1])], dim=1)
        for row in range(len(LENGTHS)):
            alone = ours(torch.cat([input_ids[row][mask[row]], new_tokens[row]]).unsqueeze(0))
            torch.testing.assert_close(steps[row], alone[0, LENGTHS[row] :], msg=f"row {row}")


def test_kv_cache_is_per_rank_heads_and_refuses_overflow() -> None:
    config = tiny_config()
    model = NevaLLM(config).eval()
    cache = KVCache.for_model(model, batch_size=2, max_length=5)
    assert cache.keys[0].shape == (2, config.num_query_groups, 5, config.head_dim)
    assert KVCache(config, 2, 5, tp_size=2).keys[0].shape == (2, config.num_query_groups // 2, 5, config.head_dim)
    with torch.no_grad():
        model(torch.zeros(2, 4, dtype=torch.long), kv_cache=cache)
        with pytest.raises(NevaError, match="at most 5 positions; 4 are filled and the step adds 2"):
            model(torch.zeros(2, 2, dtype=torch.long), kv_cache=cache)
        with pytest.raises(NevaError, match="holds 2 sequences but the batch has 3"):
            model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)


def test_activation_checkpointing_recomputes_layers_and_keeps_gradients() -> None:
    torch.manual_seed(0)
    plain = NevaLLM(tiny_config())
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    input_ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(9))
    labels = input_ids.roll(-1, dims=1)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    mask[1, 6:] = False
    labels[~mask] = -100
    layer_calls = []
    checkpointed.decoder.layers[0].register_forward_pre_hook(lambda *_: layer_calls.append(1))
    for model in (plain, checkpointed):
        model.cross_entropy(model(input_ids, attention_mask=mask), labels).backward()
    assert len(layer_calls) == 2  # forward, then the recompute in backward
    for (name, expected), actual in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=0, atol=0, msg=name)


def test_loss_terms_are_token_weighted_over_micro_batches() -> None:
    torch.manual_seed(0)
    model = NevaLLM(tiny_config())
    input_ids = torch.randint(0, 300, (4, 8), generator=torch.Generator().manual_seed(10))
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100  # micro-batches with different numbers of supervised tokens
    with torch.no_grad():
        logits = model(input_ids)
        terms = [model.loss_terms(logits[rows], labels[rows]) for rows in (slice(0, 1), slice(1, 4))]
        whole = model.cross_entropy(logits, labels)
    loss_sum = sum(term[0] for term in terms)
    token_count = sum(term[1] for term in terms)
    assert token_count.item() == int((labels != -100).sum())
    torch.testing.assert_close(loss_sum / token_count, whole)


@pytest.fixture(scope="module")
def native_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, native_dir = converted_fixture_llama(tmp_path_factory.mktemp("llama"), initializer_range=0.2)
    return native_dir


def test_from_rank_file_builds_on_meta_and_equals_the_normal_path(native_llama: Path) -> None:
    config, _ = read_native_config(native_llama)
    normal = NevaLLM(config).eval()
    normal.load_state_dict(load_native_rank(native_llama, 0))
    rng_before = torch.get_rng_state()
    loaded = NevaLLM.from_rank_file(native_llama).eval()
    assert torch.equal(torch.get_rng_state(), rng_before)  # no random initialisation was drawn
    for (name, expected), actual in zip(normal.named_parameters(), loaded.parameters()):
        assert not actual.is_meta and actual.requires_grad, name
        for attribute in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            assert getattr(actual, attribute, None) == getattr(expected, attribute, None), (name, attribute)
    assert loaded.output_layer.weight.tensor_model_parallel and loaded.output_layer.weight.partition_dim == 0
    assert loaded.decoder.layers[1].mlp.linear_fc2.weight.partition_dim == 1
    input_ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids), normal(input_ids), rtol=0, atol=0)
    bf16 = NevaLLM.from_rank_file(native_llama, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_from_rank_file_refuses_another_tp_size(tmp_path: Path) -> None:
    _, native_dir = converted_fixture_llama(tmp_path, tp=2)
    with pytest.raises(NevaError, match=r"rank files for tp=2 but the model runs at tp=1; rewrite it with `neva repartition"):
        NevaLLM.from_rank_file(native_dir)


def bf16_ulp(value: float) -> float:
    """The spacing of bf16 numbers (8 significant bits) around `value`."""
    return 2.0 ** (torch.tensor(value).abs().log2().floor().item() - 7)


def test_bf16_logits_match_transformers_bf16(padded_pair: tuple[torch.nn.Module, NevaLLM]) -> None:
    """bf16 parity, stated: on real tokens of a padded batch, our bf16 logits are within 4 bf16 ulps (at the
    largest logit) of transformers' bf16 logits, 1/2 ulp on average, and no further from the fp32 logits
    than twice transformers' own bf16 error. Both round differently (fused QKV and gate/up matmuls)."""
    hf_model, ours = padded_pair
    vocab = ours.config.vocab_size
    input_ids, mask, _ = padded_batch(vocab, "right")
    with torch.no_grad():
        reference = hf_model(input_ids, attention_mask=mask.long()).logits[mask]
        theirs = copy.deepcopy(hf_model).to(torch.bfloat16)(input_ids, attention_mask=mask.long()).logits[mask]
        bf16_model = copy.deepcopy(ours).to(torch.bfloat16)
        mine = bf16_model(input_ids, attention_mask=mask)[..., :vocab][mask]
    assert mine.dtype == torch.bfloat16
    ulp = bf16_ulp(reference.abs().max().item())
    difference = (mine.float() - theirs.float()).abs()
    assert difference.max().item() <= 4 * ulp and difference.mean().item() <= ulp / 2
    their_error = (theirs.float() - reference).abs().max().item()
    assert (mine.float() - reference).abs().max().item() <= 2 * their_error
