"""Tensor-parallel split/merge rules: exact round trips, layouts, vocab padding and clear errors."""

from __future__ import annotations

import pytest
import torch

from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig, padded_vocab_size
from neva_core.model.partition import (
    EMBEDDING,
    OUTPUT_LAYER,
    full_shape,
    merge_tensor,
    shard_shape,
    split_tensor,
    tensor_names,
)
from model_support import fuse_qkv, tiny_config

QKV = "decoder.layers.1.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.0.mlp.linear_fc1.weight"

CONFIGS = {
    "gqa": tiny_config(),
    "mha": tiny_config(num_attention_heads=4, num_query_groups=4, head_dim=8),
    "qwen2_bias_tied": tiny_config(family="qwen2", qkv_bias=True, tie_embeddings=True, vocab_size=333),
}


def real_config(layers: int, hidden: int, ffn: int, heads: int, groups: int, vocab: int = 32000) -> LLMConfig:
    return LLMConfig(family="llama", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=heads, num_query_groups=groups, head_dim=hidden // heads,
                     vocab_size=vocab, padded_vocab_size=padded_vocab_size(vocab, 1), max_position_embeddings=4096)


LLAMA_7B = real_config(32, 4096, 11008, 32, 32)
LLAMA_13B = real_config(40, 5120, 13824, 40, 40)
LLAMA_70B = real_config(80, 8192, 28672, 64, 8)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_split_merge_round_trip_is_bit_exact(config_name: str, tp: int, dtype: torch.dtype) -> None:
    config = CONFIGS[config_name]
    generator = torch.Generator().manual_seed(tp)
    for name in tensor_names(config):
        full = torch.randn(full_shape(name, config), generator=generator).to(dtype)
        shards = split_tensor(name, full, config, tp)
        assert len(shards) == tp
        for shard in shards:
            assert tuple(shard.shape) == shard_shape(name, config, tp)
            assert shard.is_contiguous() and shard.dtype == dtype
        merged = merge_tensor(name, shards, config)
        assert merged.dtype == dtype
        assert torch.equal(merged, full), name


def test_shards_do_not_share_storage_with_the_full_tensor() -> None:
    config = tiny_config()
    full = torch.randn(full_shape(QKV, config))
    shards = split_tensor(QKV, full, config, 2)
    full.zero_()
    assert all(shard.abs().sum() > 0 for shard in shards)


def test_tensor_names_follow_the_config() -> None:
    gqa, qwen = CONFIGS["gqa"], CONFIGS["qwen2_bias_tied"]
    names = tensor_names(gqa)
    assert names[0] == EMBEDDING and names[-1] == OUTPUT_LAYER and names[-2] == "decoder.final_layernorm.weight"
    assert len(names) == 3 + 6 * gqa.num_layers
    assert names[1:7] == [f"decoder.layers.0.{s}" for s in (
        "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
    qwen_names = tensor_names(qwen)
    assert OUTPUT_LAYER not in qwen_names
    assert "decoder.layers.1.self_attention.linear_qkv.bias" in qwen_names
    assert len(qwen_names) == 2 + 7 * qwen.num_layers


def test_vocab_is_zero_padded_on_split_and_trimmed_on_merge() -> None:
    config = tiny_config(vocab_size=300)
    full = torch.randn(300, config.hidden_size) + 10.0  # no real row is all zeros
    shards = split_tensor(EMBEDDING, full, config, 2)
    assert padded_vocab_size(300, 2) == 512
    assert [tuple(s.shape) for s in shards] == [(256, config.hidden_size)] * 2
    assert torch.equal(shards[0], full[:256])
    assert torch.equal(shards[1][:44], full[256:])
    assert torch.count_nonzero(shards[1][44:]) == 0
    assert tuple(merge_tensor(EMBEDDING, shards, config).shape) == (300, config.hidden_size)


def test_fc1_splits_gate_and_up_separately() -> None:
    config = tiny_config()
    ffn, hidden, tp = config.ffn_hidden_size, config.hidden_size, 4
    gate = torch.arange(ffn * hidden, dtype=torch.float32).reshape(ffn, hidden)
    up = -gate - 1.0
    shards = split_tensor(FC1, torch.cat([gate, up]), config, tp)
    rows = ffn // tp
    for rank, shard in enumerate(shards):
        expected = torch.cat([gate[rank * rows:(rank + 1) * rows], up[rank * rows:(rank + 1) * rows]])
        assert torch.equal(shard, expected)


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_ranks_hold_whole_query_groups(tp: int) -> None:
    config = tiny_config()  # 8 query heads in 4 groups
    d, hidden, groups = config.head_dim, config.hidden_size, config.num_query_groups
    q = torch.randn(config.num_attention_heads * d, hidden)
    k = torch.randn(groups * d, hidden)
    v = torch.randn(groups * d, hidden)
    shards = split_tensor(QKV, fuse_qkv(q, k, v, config), config, tp)
    per_rank = groups // tp
    q_rows = per_rank * config.heads_per_group * d
    for rank, shard in enumerate(shards):
        first, last = rank * per_rank, (rank + 1) * per_rank
        sub = tiny_config(num_attention_heads=per_rank * config.heads_per_group, num_query_groups=per_rank)
        expected = fuse_qkv(q[rank * q_rows:(rank + 1) * q_rows], k[first * d:last * d], v[first * d:last * d], sub)
        assert torch.equal(shard, expected)


def test_row_parallel_splits_input_columns_and_norms_replicate() -> None:
    config = tiny_config()
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    full = torch.randn(full_shape(proj, config))
    shards = split_tensor(proj, full, config, 2)
    assert torch.equal(shards[1], full[:, full.shape[1] // 2:])
    norm = "decoder.layers.0.input_layernorm.weight"
    norm_full = torch.randn(config.hidden_size)
    assert all(torch.equal(s, norm_full) for s in split_tensor(norm, norm_full, config, 4))


def test_differing_replicated_shards_are_refused() -> None:
    config = tiny_config()
    norm = "decoder.final_layernorm.weight"
    with pytest.raises(NevaError, match="rank 1 differs from rank 0"):
        merge_tensor(norm, [torch.ones(config.hidden_size), torch.zeros(config.hidden_size)], config)


def test_indivisible_sizes_name_every_factor() -> None:
    config = tiny_config(num_attention_heads=16, num_query_groups=8, ffn_hidden_size=40)
    with pytest.raises(NevaError) as excinfo:
        split_tensor(FC1, torch.zeros(full_shape(FC1, config)), config, 16)
    message = str(excinfo.value)
    assert "num_query_groups=8" in message and "ffn_hidden_size=40" in message and "tp=16" in message
    with pytest.raises(NevaError, match="num_query_groups=8"):
        shard_shape(EMBEDDING, config, 16)


def test_wrong_shapes_and_names_are_refused() -> None:
    config, tied = tiny_config(), CONFIGS["qwen2_bias_tied"]
    with pytest.raises(NevaError, match=r"linear_qkv\.weight.*full tensor has shape"):
        split_tensor(QKV, torch.zeros(3, 3), config, 1)
    shards = split_tensor(FC1, torch.zeros(full_shape(FC1, config)), config, 2)
    with pytest.raises(NevaError, match="shard of rank 1"):
        merge_tensor(FC1, [shards[0], shards[1][:-1]], config)
    with pytest.raises(NevaError, match="not a native LLM tensor name"):
        shard_shape("model.layers.0.self_attn.q_proj.weight", config, 1)
    with pytest.raises(NevaError, match="num_layers=2"):
        shard_shape("decoder.layers.2.mlp.linear_fc2.weight", config, 1)
    with pytest.raises(NevaError, match="qkv_bias=False"):
        shard_shape("decoder.layers.0.self_attention.linear_qkv.bias", config, 1)
    with pytest.raises(NevaError, match="tie_embeddings=True"):
        shard_shape(OUTPUT_LAYER, tied, 1)


@pytest.mark.parametrize(
    ("config", "tp", "expected"),
    [
        (LLAMA_7B, 4, {EMBEDDING: (8064, 4096), QKV: (3072, 4096), FC1: (5504, 4096),
                       "decoder.layers.31.mlp.linear_fc2.weight": (4096, 2752),
                       "decoder.layers.0.self_attention.linear_proj.weight": (4096, 1024),
                       OUTPUT_LAYER: (8064, 4096), "decoder.final_layernorm.weight": (4096,)}),
        (LLAMA_13B, 8, {EMBEDDING: (4096, 5120), QKV: (1920, 5120), FC1: (3456, 5120),
                        "decoder.layers.39.mlp.linear_fc2.weight": (5120, 1728),
                        "decoder.layers.0.self_attention.linear_proj.weight": (5120, 640)}),
        (LLAMA_70B, 8, {EMBEDDING: (4096, 8192), QKV: (1280, 8192), FC1: (7168, 8192),
                        "decoder.layers.79.mlp.linear_fc2.weight": (8192, 3584),
                        "decoder.layers.0.self_attention.linear_proj.weight": (8192, 1024)}),
    ],
    ids=["7b-tp4", "13b-tp8", "70b-tp8"],
)
def test_real_model_shard_shapes(config: LLMConfig, tp: int, expected: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        assert shard_shape(name, config, tp) == shape, name


def test_real_model_full_shapes_at_tp1() -> None:
    assert shard_shape(QKV, LLAMA_70B, 1) == (10240, 8192)  # 64 query heads + 8 k + 8 v, head_dim 128
    assert shard_shape(EMBEDDING, LLAMA_7B, 1) == (32000, 4096)
    with pytest.raises(NevaError, match="num_query_groups=8"):
        shard_shape(QKV, LLAMA_70B, 16)
