"""The native LLM against transformers' Llama / Mistral / Qwen2 in fp32, and meta-device shape checks."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from model_support import hf_to_native, native_config_from_hf, pad_vocab_rows, tiny_config
from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig, padded_vocab_size
from neva_core.model.llm import NevaLLM
from neva_core.model.partition import shard_shape, tensor_names

SEQ_LEN = 12
# Every model is 2 layers, hidden 64, 8 query heads of dim 8: small, yet RoPE, GQA grouping and the
# SwiGLU order all show up in the logits if wrong. A large init std makes attention far from uniform.
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=64, vocab_size=300, initializer_range=0.2)

HF_CASES = {
    "llama_mha": ("llama", LlamaForCausalLM, lambda: LlamaConfig(**COMMON, num_key_value_heads=8)),
    "llama_gqa": ("llama", LlamaForCausalLM, lambda: LlamaConfig(**COMMON, num_key_value_heads=2, rms_norm_eps=1e-6)),
    "mistral_sliding_window": ("mistral", MistralForCausalLM,
                               lambda: MistralConfig(**COMMON, num_key_value_heads=4, sliding_window=5)),
    "qwen2_bias_tied": ("qwen2", Qwen2ForCausalLM,
                        lambda: Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_linear_rope_theta": ("llama", LlamaForCausalLM, lambda: LlamaConfig(
        **COMMON, num_key_value_heads=4,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0})),
}


def build_pair(case: str) -> tuple[torch.nn.Module, NevaLLM]:
    family, model_class, make_config = HF_CASES[case]
    torch.manual_seed(0)
    hf_model = model_class(make_config()).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))  # non-trivial norms and biases
    config = native_config_from_hf(hf_model.config, family)
    ours = NevaLLM(config).eval()
    ours.load_state_dict(pad_vocab_rows(hf_to_native(hf_model.state_dict(), config), config))
    return hf_model, ours


@pytest.fixture(scope="module", params=list(HF_CASES))
def model_pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, NevaLLM]:
    return build_pair(request.param)


def test_logits_match_transformers(model_pair: tuple[torch.nn.Module, NevaLLM]) -> None:
    hf_model, ours = model_pair
    vocab = ours.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        actual = ours(input_ids)
    assert actual.shape == (2, SEQ_LEN, ours.config.padded_vocab_size)
    assert expected.abs().max() > 1.0  # a model that predicts something, so agreement means something
    torch.testing.assert_close(actual[..., :vocab], expected[..., :vocab])


def test_position_ids_and_inputs_embeds_match_transformers(model_pair: tuple[torch.nn.Module, NevaLLM]) -> None:
    hf_model, ours = model_pair
    input_ids = torch.randint(0, ours.config.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    position_ids = torch.arange(7, 7 + SEQ_LEN).unsqueeze(0)
    with torch.no_grad():
        expected = hf_model(input_ids, position_ids=position_ids).logits
        embeds = ours.embedding(input_ids)
        actual = ours(inputs_embeds=embeds, position_ids=position_ids)
    torch.testing.assert_close(actual[..., : ours.config.vocab_size], expected)


def test_state_dict_uses_native_names_and_rank_shapes() -> None:
    for config in (tiny_config(), tiny_config(family="qwen2", qkv_bias=True, tie_embeddings=True)):
        state = NevaLLM(config).state_dict()
        assert list(state) == tensor_names(config)
        assert {name: tuple(t.shape) for name, t in state.items()} == {
            name: shard_shape(name, config, 1) for name in tensor_names(config)}


def test_sharded_parameters_carry_megatron_attributes() -> None:
    params = dict(NevaLLM(tiny_config()).named_parameters())
    expected_dims = {"embedding.word_embeddings.weight": 0, "output_layer.weight": 0,
                     "decoder.layers.0.self_attention.linear_qkv.weight": 0,
                     "decoder.layers.0.mlp.linear_fc1.weight": 0,
                     "decoder.layers.0.self_attention.linear_proj.weight": 1,
                     "decoder.layers.0.mlp.linear_fc2.weight": 1}
    for name, dim in expected_dims.items():
        param = params[name]
        assert param.tensor_model_parallel is True and param.partition_dim == dim and param.partition_stride == 1
    assert not getattr(params["decoder.layers.0.input_layernorm.weight"], "tensor_model_parallel", False)


def test_fresh_model_has_zero_vocab_padding_and_trains() -> None:
    torch.manual_seed(0)
    model = NevaLLM(tiny_config(vocab_size=300))  # padded to 384
    assert torch.count_nonzero(model.embedding.word_embeddings.weight[300:]) == 0
    assert torch.count_nonzero(model.output_layer.weight[300:]) == 0
    input_ids = torch.randint(0, 300, (2, 8))
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    loss = model.cross_entropy(model(input_ids), labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(torch.log(torch.tensor(300.0)).item(), rel=0.05)
    assert torch.count_nonzero(model.output_layer.weight.grad[300:]) == 0  # padding never gets gradient


def test_forward_needs_exactly_one_input() -> None:
    model = NevaLLM(tiny_config())
    with pytest.raises(NevaError, match="exactly one of input_ids or inputs_embeds"):
        model()


def llama_config(layers: int, hidden: int, ffn: int, heads: int, groups: int) -> LLMConfig:
    return LLMConfig(family="llama", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=heads, num_query_groups=groups, head_dim=hidden // heads,
                     vocab_size=32000, padded_vocab_size=padded_vocab_size(32000, 1), max_position_embeddings=4096)


@pytest.mark.parametrize(
    ("config", "expected_params"),
    [
        (llama_config(32, 4096, 11008, 32, 32), 6_738_415_616),  # Llama-2-7b
        (llama_config(40, 5120, 13824, 40, 40), 13_015_864_320),  # Llama-2-13b
        (llama_config(80, 8192, 28672, 64, 8), 68_976_648_192),  # Llama-2-70b (GQA, 8 KV heads)
    ],
    ids=["7b", "13b", "70b"],
)
def test_meta_device_construction_of_real_sizes(config: LLMConfig, expected_params: int) -> None:
    with torch.device("meta"):
        model = NevaLLM(config)
    assert sum(p.numel() for p in model.parameters()) == expected_params
    assert all(p.is_meta for p in model.parameters())
    with torch.device("meta"):
        logits = model(torch.zeros(1, 16, dtype=torch.long))
    assert logits.shape == (1, 16, 32000)
