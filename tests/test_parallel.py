"""Tensor parallelism: TP=2/4 (gloo, one spawn of 4 processes for the module) against TP=1 in one process."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model_support import run_distributed, tiny_config
from neva_core.checkpoint.layout import Provenance, save_native
from neva_core.errors import NevaError
from neva_core.generate import greedy_generate
from neva_core.model.config import LLMConfig
from neva_core.model.llm import KVCache, NevaLLM, gather_logits
from neva_core.model.parallel import (
    _VocabParallelCrossEntropy,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    vocab_parallel_cross_entropy,
)
from neva_core.model.partition import merge_tensor, split_tensor

WORLD = 4
TP_SIZES = (2, 4)
CONFIGS = {
    # vocab 300: at TP4 the vocab is padded to 512 and rank 3 holds only padding rows.
    "gqa": tiny_config(),
    "qwen2_bias_tied": tiny_config(family="qwen2", qkv_bias=True, tie_embeddings=True, vocab_size=333),
}
CE_VOCAB, CE_PADDED = 300, 512


def canonical_weights(config: LLMConfig) -> dict[str, torch.Tensor]:
    """A TP=1 model's full tensors with non-trivial norms and biases (vocab rows trimmed)."""
    torch.manual_seed(0)
    model = NevaLLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("layernorm.weight", "bias")):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.mul_(10.0)  # large enough that logits and gradients are far from trivial
    return {name: merge_tensor(name, [tensor], config) for name, tensor in model.state_dict().items()}


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, vocab, (2, 10), generator=generator)
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    return input_ids, labels


def ce_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    logits = 3.0 * torch.randn(3, 7, CE_PADDED, generator=generator)
    logits[..., CE_VOCAB:] += 20.0  # padding columns would dominate the softmax if they were not excluded
    labels = torch.randint(0, CE_VOCAB, (3, 7), generator=generator)
    labels[labels % 4 == 0] = -100
    labels[0, 0] = CE_VOCAB - 1  # last real token: lives on the last rank that has real rows
    return logits, labels


def model_step(config: LLMConfig, weights: dict[str, torch.Tensor], group: Any, tp: int) -> dict[str, Any]:
    """Forward and backward on one rank; returns the gathered logits, the loss and this rank's gradients."""
    rank = 0 if group is None else dist.get_rank(group)
    model = NevaLLM(config, group)
    model.load_state_dict({name: split_tensor(name, full, config, tp)[rank] for name, full in weights.items()})
    input_ids, labels = batch(config.vocab_size)
    local_logits = model(input_ids)
    loss = model.cross_entropy(local_logits, labels)
    loss.backward()
    return {"logits": gather_logits(local_logits.detach(), group), "loss": loss.detach(),
            "grads": {name: param.grad for name, param in model.named_parameters()}}


def ce_step(group: Any, tp: int, rank: int) -> dict[str, torch.Tensor]:
    logits, labels = ce_inputs()
    local = logits.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    losses = vocab_parallel_cross_entropy(local, labels, group, vocab_size=CE_VOCAB, reduction="none")
    losses.sum().backward()
    return {"losses": losses.detach(), "grad": local.grad}


def decode_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A right-padded prompt batch and the tokens fed one by one after it."""
    generator = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, vocab, (2, 7), generator=generator)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[1, 4:] = False
    return prompt, mask, torch.randint(0, vocab, (2, 3), generator=generator)


def decode_step(model: NevaLLM) -> dict[str, Any]:
    """Prefill and one-token steps through a KV cache (gathered logits), greedy tokens, and the TP tags."""
    prompt, mask, new_tokens = decode_inputs(model.config.vocab_size)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.for_model(model, 2, prompt.shape[1] + new_tokens.shape[1])
    with torch.no_grad():
        logits = [model(prompt, position_ids=positions, attention_mask=mask, kv_cache=cache)]
        next_position = mask.sum(-1, keepdim=True)
        for step in range(new_tokens.shape[1]):
            logits.append(model(new_tokens[:, step : step + 1], position_ids=next_position + step, kv_cache=cache))
    return {"logits": [gather_logits(part, model.tp_group) for part in logits],
            "generated": torch.tensor(greedy_generate(model, prompt, attention_mask=mask, max_new_tokens=6)),
            "tags": {name: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", -1))
                     for name, p in model.named_parameters()}}


def tp_worker(rank: int, world: int, group: Any, weights_path: str, native_root: str) -> dict[str, Any]:
    del group  # TP groups are built here: the whole world (TP4) and the pairs {0,1}, {2,3} (TP2)
    all_weights = torch.load(weights_path, weights_only=True)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2]}
    results: dict[str, Any] = {}
    for tp, tp_group in groups.items():
        for name, config in CONFIGS.items():
            results[f"{name}-tp{tp}"] = model_step(config, all_weights[name], tp_group, tp)
        results[f"ce-tp{tp}"] = ce_step(tp_group, tp, dist.get_rank(tp_group))
        results[f"decode-tp{tp}"] = decode_step(NevaLLM.from_rank_file(f"{native_root}/tp{tp}", tp_group))
        torch.manual_seed(5)
        results[f"init-tp{tp}"] = NevaLLM(CONFIGS["gqa"], tp_group).state_dict()
    return results


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    return {name: canonical_weights(config) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory, weights: dict) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("tp")
    torch.save(weights, workdir / "weights.pt")
    config = CONFIGS["gqa"]
    for tp in TP_SIZES:  # the gqa model as native checkpoints, loaded by NevaLLM.from_rank_file on each rank
        save_native(workdir / "native" / f"tp{tp}", config, tp=tp, dtype="fp32",
                    provenance=Provenance(source={}, original_vocab_size=config.vocab_size),
                    tensors=iter(weights["gqa"].items()), wanted={"tp": tp, "dtype": "fp32"})
    return run_distributed(tp_worker, WORLD, workdir / "out", str(workdir / "weights.pt"), str(workdir / "native"))


@pytest.fixture(scope="module")
def tp1_results(weights: dict) -> dict[str, dict[str, Any]]:
    return {name: model_step(config, weights[name], None, 1) for name, config in CONFIGS.items()}


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp_forward_matches_tp1(rank_results: list, tp1_results: dict, name: str, tp: int) -> None:
    vocab = CONFIGS[name].vocab_size
    expected = tp1_results[name]["logits"][..., :vocab]
    for rank in range(WORLD):
        gathered = rank_results[rank][f"{name}-tp{tp}"]["logits"]
        assert gathered.shape[-1] == CONFIGS[name].with_tp(tp).padded_vocab_size
        torch.testing.assert_close(gathered[..., :vocab], expected)
        assert torch.count_nonzero(gathered[..., vocab:]) == 0  # zero padding rows give zero logits
        torch.testing.assert_close(rank_results[rank][f"{name}-tp{tp}"]["loss"], tp1_results[name]["loss"])


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp_backward_matches_tp1_after_merge(rank_results: list, tp1_results: dict, name: str, tp: int) -> None:
    config = CONFIGS[name]
    reference = tp1_results[name]["grads"]
    for first_rank in range(0, WORLD, tp):
        rank_grads = [rank_results[r][f"{name}-tp{tp}"]["grads"] for r in range(first_rank, first_rank + tp)]
        for param_name, tp1_grad in reference.items():
            # merge_tensor also proves replicated gradients (norms) are identical on every rank.
            merged = merge_tensor(param_name, [grads[param_name] for grads in rank_grads], config)
            expected = merge_tensor(param_name, [tp1_grad], config)
            torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5, msg=param_name)
        last_rank_output = rank_grads[-1].get("output_layer.weight", rank_grads[-1]["embedding.word_embeddings.weight"])
        local_rows = last_rank_output.shape[0]
        padding_start = max(config.vocab_size - (tp - 1) * local_rows, 0)
        assert torch.count_nonzero(last_rank_output[padding_start:]) == 0  # padding never gets gradient


@pytest.mark.parametrize("tp", TP_SIZES)
def test_vocab_parallel_cross_entropy_multi_process(rank_results: list, tp: int) -> None:
    logits, labels = ce_inputs()
    reference = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(reference[..., :CE_VOCAB].transpose(1, 2), labels, reduction="none")
    expected.sum().backward()
    for first_rank in range(0, WORLD, tp):
        group_results = [rank_results[r][f"ce-tp{tp}"] for r in range(first_rank, first_rank + tp)]
        for result in group_results:
            torch.testing.assert_close(result["losses"], expected.detach())
        torch.testing.assert_close(torch.cat([r["grad"] for r in group_results], dim=-1), reference.grad)


def test_vocab_parallel_cross_entropy_single_process() -> None:
    logits, labels = ce_inputs()
    ours_input = logits.clone().requires_grad_(True)
    reference = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(ours_input, labels, None, vocab_size=CE_VOCAB)
    expected = F.cross_entropy(reference[..., :CE_VOCAB].transpose(1, 2), labels)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours_input.grad, reference.grad)
    assert torch.count_nonzero(ours_input.grad[..., CE_VOCAB:]) == 0
    assert torch.count_nonzero(ours_input.grad[labels == -100]) == 0
    assert torch.equal(logits, ours_input.detach())  # the caller's logits are not modified


def test_cross_entropy_reductions_and_custom_ignore_index() -> None:
    logits, labels = ce_inputs()
    nemo_labels = labels.masked_fill(labels == -100, -1)  # NeMo's ignore label
    per_token = vocab_parallel_cross_entropy(logits, nemo_labels, ignore_index=-1, vocab_size=CE_VOCAB,
                                             reduction="none")
    expected = F.cross_entropy(logits[..., :CE_VOCAB].transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(per_token, expected)
    summed = vocab_parallel_cross_entropy(logits, nemo_labels, ignore_index=-1, vocab_size=CE_VOCAB, reduction="sum")
    torch.testing.assert_close(summed, expected.sum())
    all_ignored = torch.full_like(labels, -100)
    masked_logits = logits.clone().requires_grad_(True)
    empty = vocab_parallel_cross_entropy(masked_logits, all_ignored, vocab_size=CE_VOCAB)
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(masked_logits.grad) == 0


def test_cross_entropy_refuses_bad_labels_and_shapes() -> None:
    logits, labels = ce_inputs()
    labels[1, 1] = CE_VOCAB  # a padding id is not a token
    with pytest.raises(NevaError, match=r"token ids in \[0, 300\)"):
        vocab_parallel_cross_entropy(logits, labels, vocab_size=CE_VOCAB)
    with pytest.raises(NevaError, match="do not match"):
        vocab_parallel_cross_entropy(logits, labels[:, :3], vocab_size=CE_VOCAB)
    with pytest.raises(NevaError, match="reduction"):
        vocab_parallel_cross_entropy(logits, labels.clamp(max=0), reduction="avg")


def test_mappings_are_identity_without_a_group() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    for mapping in (copy_to_tp_region, reduce_from_tp_region, gather_from_tp_region):
        y = mapping(x, None)
        assert torch.equal(y, x)
        (y * 2.0).sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 2.0))
        x.grad = None


@pytest.mark.parametrize("tp", TP_SIZES)
def test_fresh_init_is_the_same_model_at_every_tp_size(rank_results: list, tp: int) -> None:
    config = CONFIGS["gqa"]
    torch.manual_seed(5)
    reference = NevaLLM(config).state_dict()
    for name, tp1_tensor in reference.items():
        merged = merge_tensor(name, [rank_results[r][f"init-tp{tp}"][name] for r in range(tp)], config)
        assert torch.equal(merged, merge_tensor(name, [tp1_tensor], config)), name
    last_embedding = rank_results[tp - 1][f"init-tp{tp}"]["embedding.word_embeddings.weight"]
    real_rows = max(config.vocab_size - (tp - 1) * last_embedding.shape[0], 0)
    assert torch.count_nonzero(last_embedding[real_rows:]) == 0


def test_second_tp2_pair_agrees_with_the_first(rank_results: list) -> None:
    for name in CONFIGS:
        for offset in range(2):
            first, second = rank_results[offset], rank_results[2 + offset]
            assert torch.equal(first[f"{name}-tp2"]["logits"], second[f"{name}-tp2"]["logits"])


def test_vocab_parallel_kernel_refuses_a_second_backward_through_the_same_graph() -> None:
    """The TP kernel turns its saved softmax into the gradient in place, so it cannot run backward twice.
    (At TP=1 vocab_parallel_cross_entropy takes torch's fused cross entropy, which has no such limit.)"""
    logits, labels = ce_inputs()
    logits.requires_grad_(True)
    loss = _VocabParallelCrossEntropy.apply(logits, labels, None, -100, CE_VOCAB).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


@pytest.fixture(scope="module")
def tp1_decode(weights: dict) -> dict[str, Any]:
    """TP=1: every position's logits recomputed over the whole sequence, and the greedy tokens."""
    config = CONFIGS["gqa"]
    model = NevaLLM(config).eval()
    model.load_state_dict({name: split_tensor(name, full, config, 1)[0] for name, full in weights["gqa"].items()})
    prompt, mask, new_tokens = decode_inputs(config.vocab_size)
    full_mask = torch.cat([mask, torch.ones_like(new_tokens, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        full = model(torch.cat([prompt, new_tokens], dim=1), attention_mask=full_mask,
                     position_ids=(full_mask.long().cumsum(-1) - 1).clamp(min=0))
    return {"full": full, "mask": mask, "tags": decode_step(model)["tags"],
            "generated": torch.tensor(greedy_generate(model, prompt, attention_mask=mask, max_new_tokens=6))}


@pytest.mark.parametrize("tp", TP_SIZES)
def test_tp_kv_cache_steps_and_generation_match_tp1(rank_results: list, tp1_decode: dict, tp: int) -> None:
    vocab, width = CONFIGS["gqa"].vocab_size, tp1_decode["mask"].shape[1]
    full, mask = tp1_decode["full"][..., :vocab], tp1_decode["mask"]
    for rank in range(WORLD):
        decoded = rank_results[rank][f"decode-tp{tp}"]
        prefill, *steps = [logits[..., :vocab] for logits in decoded["logits"]]
        torch.testing.assert_close(prefill[mask], full[:, :width][mask])
        for step, logits in enumerate(steps):
            torch.testing.assert_close(logits[:, 0], full[:, width + step], msg=f"rank {rank} step {step}")
        assert torch.equal(decoded["generated"], tp1_decode["generated"])
        assert decoded["tags"] == tp1_decode["tags"]  # from_rank_file re-applied the TP attributes
