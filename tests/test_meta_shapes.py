"""Real LLaMA-2 7B / 13B / 70B shapes through conversion and repartition on the meta device (no data).

Every native tensor is formed from meta HF tensors by the converter's own code, split for each TP size
by the real rules and compared with shapes computed here independently; the file plans are checked
against the models' published parameter counts.
"""

from __future__ import annotations

import math

import pytest
import torch

from neva_core.checkpoint.convert import form_native_tensor
from neva_core.checkpoint.hf import hf_tensor_shapes, llm_config_from_hf
from neva_core.checkpoint.layout import rank_plan
from neva_core.errors import NevaError
from neva_core.model.partition import Split, merge_tensor, split_kind, split_tensor, tensor_names

# The fields of the published config.json files (meta-llama/Llama-2-{7b,13b,70b}-chat-hf).
_LLAMA2 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 10000.0,
    "torch_dtype": "float16", "tie_word_embeddings": False, "pretraining_tp": 1,
}
MODELS = {
    "7b": dict(_LLAMA2, num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008),
    "13b": dict(_LLAMA2, num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, num_key_value_heads=40,
                intermediate_size=13824),
    "70b": dict(_LLAMA2, num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672),
}
PARAMETERS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}  # published counts
TP_SIZES = (1, 2, 4, 8)


def expected_shard_shape(name: str, hf: dict, tp: int, vocab: int) -> tuple[int, ...]:
    """Megatron-core's per-rank shapes, written out from the facts (not from partition.py)."""
    hidden, heads, groups = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim, ffn = hidden // heads, hf["intermediate_size"]
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return (math.ceil(vocab / (128 * tp)) * 128 * tp // tp, hidden)
    if name.endswith("linear_qkv.weight"):
        return (head_dim * (heads + 2 * groups) // tp, hidden)
    if name.endswith("linear_proj.weight"):
        return (hidden, heads * head_dim // tp)
    if name.endswith("linear_fc1.weight"):
        return (2 * ffn // tp, hidden)
    if name.endswith("linear_fc2.weight"):
        return (hidden, ffn // tp)
    return (hidden,)


def _meta_reader(shapes: dict[str, tuple[int, ...]]):
    return lambda hf_name: torch.empty(shapes[hf_name], dtype=torch.float16, device="meta")


@pytest.mark.parametrize("model", list(MODELS))
def test_file_plans_hold_exactly_the_published_parameters(model: str):
    hf = MODELS[model]
    config = llm_config_from_hf(hf)
    assert sum(math.prod(shape) for shape in hf_tensor_shapes(config).values()) == PARAMETERS[model]
    assert sum(spec.nbytes for spec in rank_plan(config, 1, "bf16")) == 2 * PARAMETERS[model]
    for tp in TP_SIZES:
        plan = rank_plan(config.with_tp(tp), tp, "bf16")
        assert [spec.shape for spec in plan] == [expected_shard_shape(s.name, hf, tp, 32000) for s in plan]


@pytest.mark.parametrize(("model", "vocab"), [("7b", 32008), ("13b", 32000), ("70b", 32008)])
def test_meta_conversion_and_repartition_give_megatron_shapes(model: str, vocab: int):
    hf = MODELS[model]
    source_config = llm_config_from_hf(hf)
    read = _meta_reader(hf_tensor_shapes(source_config))
    for tp in TP_SIZES:
        config = llm_config_from_hf(hf, vocab_size=vocab, tp=tp)
        assert config.padded_vocab_size % (128 * tp) == 0
        for name in tensor_names(config):
            full = form_native_tensor(name, read, config, torch.bfloat16)
            assert full.dtype == torch.bfloat16 and full.device.type == "meta"
            shards = split_tensor(name, full, config, tp)
            assert [tuple(s.shape) for s in shards] == [expected_shard_shape(name, hf, tp, vocab)] * tp, name
            if split_kind(name, config) is Split.REPLICATED:
                continue  # merging compares the replicas' values, which meta tensors do not have
            merged = merge_tensor(name, shards, config)
            for new_tp in TP_SIZES:
                resplit = split_tensor(name, merged, config.with_tp(new_tp), new_tp)
                assert tuple(resplit[0].shape) == expected_shard_shape(name, hf, new_tp, vocab), (name, new_tp)


def test_70b_refuses_tp16_naming_the_kv_groups():
    with pytest.raises(NevaError, match="num_query_groups=8 \\(KV heads\\) is not divisible by tp=16"):
        llm_config_from_hf(MODELS["70b"], tp=16)
