"""Hugging Face LLaMA-family checkpoints <-> native (Megatron-core) names, as data plus small pure helpers.

Each supported family is a `FamilySpec`: its HF architecture and a table that says, for every native
tensor name template, which HF tensors form it and how (copied, fused q/k/v, fused gate/up). The
converter reads the table forwards, the exporter backwards. The config helpers translate the HF
`config.json` into an `LLMConfig` (refusing features our model does not implement) and back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig, padded_vocab_size
from neva_core.model.partition import Split, full_shape, split_kind, tensor_names

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"

# Native name template -> (rule, HF name templates). `{i}` is the layer index.
LLAMA_STYLE_TENSORS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": (COPY, ("model.embed_tokens.weight",)),
    "decoder.layers.{i}.input_layernorm.weight": (COPY, ("model.layers.{i}.input_layernorm.weight",)),
    "decoder.layers.{i}.self_attention.linear_qkv.weight": (
        QKV,
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
    ),
    "decoder.layers.{i}.self_attention.linear_qkv.bias": (
        QKV,
        (
            "model.layers.{i}.self_attn.q_proj.bias",
            "model.layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias",
        ),
    ),
    "decoder.layers.{i}.self_attention.linear_proj.weight": (COPY, ("model.layers.{i}.self_attn.o_proj.weight",)),
    "decoder.layers.{i}.pre_mlp_layernorm.weight": (COPY, ("model.layers.{i}.post_attention_layernorm.weight",)),
    "decoder.layers.{i}.mlp.linear_fc1.weight": (
        GATE_UP,
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ),
    "decoder.layers.{i}.mlp.linear_fc2.weight": (COPY, ("model.layers.{i}.mlp.down_proj.weight",)),
    "decoder.final_layernorm.weight": (COPY, ("model.norm.weight",)),
    "output_layer.weight": (COPY, ("lm_head.weight",)),
}

# HF tensors that carry no weights of their own: old checkpoints store RoPE's inv_freq buffer, and
# tied models may still store lm_head (a copy of the embedding).
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
TIED_OUTPUT_HF_NAME = "lm_head.weight"


@dataclass(frozen=True)
class FamilySpec:
    family: str  # LLMConfig.family
    architecture: str  # HF `architectures[0]`
    model_type: str  # HF `model_type`
    tensors: Mapping[str, tuple[str, tuple[str, ...]]]


FAMILY_SPECS: Mapping[str, FamilySpec] = {
    "llama": FamilySpec("llama", "LlamaForCausalLM", "llama", LLAMA_STYLE_TENSORS),
    "mistral": FamilySpec("mistral", "MistralForCausalLM", "mistral", LLAMA_STYLE_TENSORS),
    "qwen2": FamilySpec("qwen2", "Qwen2ForCausalLM", "qwen2", LLAMA_STYLE_TENSORS),
}
ARCHITECTURE_FAMILIES: Mapping[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

DTYPES: Mapping[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES: Mapping[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class TensorRecipe:
    """How one native tensor is formed from HF tensors."""

    rule: str  # COPY, QKV or GATE_UP
    hf_names: tuple[str, ...]


def tensor_recipe(native_name: str, family: str) -> TensorRecipe:
    """The HF tensors (and fusion rule) behind `native_name` for `family`."""
    match = _LAYER_NAME.fullmatch(native_name)
    template = f"decoder.layers.{{i}}.{match.group(2)}" if match else native_name
    entry = family_spec(family).tensors.get(template)
    if entry is None:
        raise NevaError(f"tensor {native_name!r} has no Hugging Face counterpart for model family {family!r}")
    rule, hf_templates = entry
    layer = match.group(1) if match else ""
    return TensorRecipe(rule, tuple(t.format(i=layer) for t in hf_templates))


def family_spec(family: str) -> FamilySpec:
    if family not in FAMILY_SPECS:
        raise NevaError(f"model family {family!r} has no Hugging Face mapping; supported: {', '.join(FAMILY_SPECS)}")
    return FAMILY_SPECS[family]


def dtype_name(dtype: str) -> str:
    """Validate a native dtype name (bf16, fp16, fp32)."""
    if dtype not in DTYPES:
        raise NevaError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return dtype


def dtype_from_torch(dtype: torch.dtype) -> str:
    for name, torch_dtype in DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise NevaError(f"tensor dtype {dtype} is not a supported checkpoint dtype ({', '.join(DTYPES)})")


# ---------------------------------------------------------------------------------------------
# Pure tensor helpers (work on weights [rows, hidden] and on biases [rows] alike).


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: LLMConfig) -> torch.Tensor:
    """Megatron's fused QKV: for each query group g, [q heads of g; k_g; v_g] stacked on dim 0."""
    groups, head_dim, rest = config.num_query_groups, config.head_dim, q.shape[1:]
    per_group = (
        q.reshape(groups, config.heads_per_group * head_dim, *rest),
        k.reshape(groups, head_dim, *rest),
        v.reshape(groups, head_dim, *rest),
    )
    return torch.cat(per_group, dim=1).reshape(config.qkv_rows, *rest)


def split_qkv(fused: torch.Tensor, config: LLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv: contiguous (q, k, v) as HF stores them."""
    groups, head_dim, rest = config.num_query_groups, config.head_dim, fused.shape[1:]
    grouped = fused.reshape(groups, (config.heads_per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([config.heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(part.reshape(-1, *rest).contiguous() for part in (q, k, v))  # type: ignore[return-value]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's linear_fc1 for SwiGLU: cat(gate, up), gate first."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def to_native(native_name: str, hf_parts: Sequence[torch.Tensor], config: LLMConfig) -> torch.Tensor:
    """The native tensor from its HF parts (in `tensor_recipe(...).hf_names` order)."""
    rule = tensor_recipe(native_name, config.family).rule
    if rule == QKV:
        return fuse_qkv(*hf_parts, config)
    if rule == GATE_UP:
        return fuse_gate_up(*hf_parts)
    return hf_parts[0]


def from_native(native_name: str, full: torch.Tensor, config: LLMConfig) -> list[tuple[str, torch.Tensor]]:
    """Inverse of to_native: (HF name, tensor) pairs of a canonical full native tensor."""
    recipe = tensor_recipe(native_name, config.family)
    if recipe.rule == QKV:
        parts: Sequence[torch.Tensor] = split_qkv(full, config)
    elif recipe.rule == GATE_UP:
        parts = split_gate_up(full)
    else:
        parts = (full,)
    return list(zip(recipe.hf_names, parts))


def hf_tensor_shapes(config: LLMConfig, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of `config` with its shape, in the order the native tensors use them.

    `vocab_rows` is the row count of the HF embedding / lm_head (default: config.vocab_size).
    """
    rows = config.vocab_size if vocab_rows is None else vocab_rows
    hidden, head_dim = config.hidden_size, config.head_dim
    kv_rows = config.num_query_groups * head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for name in tensor_names(config):
        recipe = tensor_recipe(name, config.family)
        native_shape = full_shape(name, config)
        if recipe.rule == QKV:
            q_rows = config.num_attention_heads * head_dim
            tail = native_shape[1:]
            for hf_name, part_rows in zip(recipe.hf_names, (q_rows, kv_rows, kv_rows)):
                shapes[hf_name] = (part_rows, *tail)
        elif recipe.rule == GATE_UP:
            for hf_name in recipe.hf_names:
                shapes[hf_name] = (config.ffn_hidden_size, hidden)
        elif split_kind(name, config) is Split.VOCAB:
            shapes[recipe.hf_names[0]] = (rows, hidden)
        else:
            shapes[recipe.hf_names[0]] = native_shape
    return shapes


# ---------------------------------------------------------------------------------------------
# config.json translation.


def family_of(hf_config: Mapping[str, Any]) -> str:
    """The native family of an HF config, from its `architectures` (or, when absent, its `model_type`)."""
    architectures = hf_config.get("architectures") or []
    if not architectures:
        architectures = [s.architecture for s in FAMILY_SPECS.values() if s.model_type == hf_config.get("model_type")][:1]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURE_FAMILIES:
        raise NevaError(
            f"HF config.json architectures={architectures!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURE_FAMILIES)} (LLaMA-2, Yi, Mistral, Qwen2)"
        )
    return ARCHITECTURE_FAMILIES[architectures[0]]


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
    value = hf_config.get(key)
    if value is None:
        raise NevaError(f"HF config.json has no {key!r}; it is required to convert the checkpoint")
    return value


def rope_settings(hf_config: Mapping[str, Any]) -> tuple[float, float | None]:
    """(rope_theta, linear scaling factor or None) from either transformers-5 or legacy config keys."""
    params = hf_config.get("rope_parameters")
    legacy_scaling = hf_config.get("rope_scaling")
    if params:
        theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    else:
        theta = float(hf_config.get("rope_theta", 10000.0))
        params = legacy_scaling or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, float(_require(params, "factor"))
    raise NevaError(
        f"HF config.json uses RoPE scaling type {rope_type!r}; only linear scaling (or none) is supported"
    )


def _refuse_unsupported_features(hf_config: Mapping[str, Any], family: str) -> None:
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise NevaError(f"HF config.json hidden_act={activation!r} is not supported; the native MLP is SwiGLU (silu)")
    if hf_config.get("attention_bias"):
        raise NevaError(
            "HF config.json attention_bias=true (biases on q/k/v and o_proj) is not supported; "
            "only Qwen2-style q/k/v biases are"
        )
    if hf_config.get("mlp_bias"):
        raise NevaError("HF config.json mlp_bias=true is not supported: the native MLP has no biases")
    if family == "qwen2" and hf_config.get("use_sliding_window"):
        raise NevaError(
            "HF config.json use_sliding_window=true (Qwen2 per-layer sliding window) is not supported; "
            "convert a checkpoint with use_sliding_window=false"
        )


def llm_config_from_hf(hf_config: Mapping[str, Any], vocab_size: int | None = None, tp: int = 1) -> LLMConfig:
    """The native LLMConfig of an HF LLaMA-family config, with `vocab_size` real tokens, padded for `tp`.

    `vocab_size` defaults to the checkpoint's; a larger one grows the vocabulary, a smaller one is refused.
    """
    family = family_of(hf_config)
    _refuse_unsupported_features(hf_config, family)
    source_vocab = int(_require(hf_config, "vocab_size"))
    vocab = source_vocab if vocab_size is None else int(vocab_size)
    if vocab < source_vocab:
        raise NevaError(
            f"requested vocab size {vocab} is smaller than the checkpoint's vocab_size={source_vocab}; "
            f"the vocabulary can only grow (pass the extended tokenizer or a larger --vocab-size)"
        )
    hidden = int(_require(hf_config, "hidden_size"))
    heads = int(_require(hf_config, "num_attention_heads"))
    if hidden % heads and not hf_config.get("head_dim"):
        raise NevaError(f"HF config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    theta, scaling = rope_settings(hf_config)
    config = LLMConfig(
        family=family,
        num_layers=int(_require(hf_config, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(hf_config, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(hf_config.get("num_key_value_heads") or heads),
        head_dim=int(hf_config.get("head_dim") or hidden // heads),
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, tp),
        max_position_embeddings=int(_require(hf_config, "max_position_embeddings")),
        rope_theta=theta,
        rope_scaling_factor=scaling,
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        sliding_window=hf_config.get("sliding_window") if family == "mistral" else None,
    )
    return config.with_tp(tp)


_LEGACY_KEYS = ("torch_dtype", "rope_scaling", "rope_theta")


def hf_config_from_llm(config: LLMConfig, dtype: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An HF config.json for `config`: the architecture from `config`, other keys (token ids...) from `base`.

    Both the transformers-5 (`rope_parameters`, `dtype`) and the legacy (`rope_theta`, `rope_scaling`,
    `torch_dtype`) keys are written so that older transformers releases read the same RoPE settings.
    """
    spec = family_spec(config.family)
    hf: dict[str, Any] = {k: v for k, v in (base or {}).items() if k not in _LEGACY_KEYS}
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    legacy_scaling = None
    if config.rope_scaling_factor is not None:
        rope.update(rope_type="linear", factor=config.rope_scaling_factor)
        legacy_scaling = {"type": "linear", "rope_type": "linear", "factor": config.rope_scaling_factor}
    hf.update(
        architectures=[spec.architecture],
        model_type=spec.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        rope_theta=config.rope_theta,
        rope_scaling=legacy_scaling,
        tie_word_embeddings=config.tie_embeddings,
        dtype=HF_DTYPE_NAMES[dtype],
        torch_dtype=HF_DTYPE_NAMES[dtype],
    )
    if spec.model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if spec.model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    if spec.model_type == "qwen2":
        hf.update(use_sliding_window=False, layer_types=["full_attention"] * config.num_layers)
    return hf
