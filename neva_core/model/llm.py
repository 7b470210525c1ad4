"""The native LLaMA-family decoder (LLaMA, Mistral, Qwen2, Yi) in Megatron-core layout.

Parameter names are the native checkpoint names, and each rank holds its tensor-parallel shard in the
layout of `neva_core.checkpoint.partition`, so a rank file loads with `model.load_state_dict(tensors)`.

The arithmetic follows transformers' LlamaForCausalLM so converted weights give the same logits:
RMSNorm in fp32 then cast back before the weight, rotate-half RoPE with cos/sin computed in fp32 from
inv_freq = 1/theta^(2j/head_dim) (divided by the linear scaling factor), attention scaled by
1/sqrt(head_dim). There is no dropout and no padding mask: sequences are right-padded and their
padding positions carry ignored labels, so causal attention never lets a real token see padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neva_core.checkpoint.partition import full_shape, split_tensor
from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig
from neva_core.model.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_tp_region,
    tp_rank,
    tp_world_size,
    vocab_parallel_cross_entropy,
)

__all__ = ["NevaLLM", "gather_logits", "vocab_parallel_cross_entropy"]

INIT_STD = 0.02  # LLaMA's initializer_range


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back BEFORE scaling by the weight, exactly as HF does (bf16 parity).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(
    config: LLMConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, head_dim] for rotate-half RoPE, computed in fp32 and then cast to `dtype`."""
    exponent = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (config.rope_theta ** (exponent / config.head_dim))
    if config.rope_scaling_factor is not None:
        # Linear scaling: dividing the frequencies equals dividing the positions (HF's order, no drift).
        inv_freq = inv_freq / config.rope_scaling_factor
    freqs = position_ids.unsqueeze(-1).float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [B, T, head_dim] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def attention_mask(seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [T, T] mask (True = may attend) for a sliding window; None when plain causal suffices."""
    if sliding_window is None or seq_len <= sliding_window:
        return None
    query = torch.arange(seq_len, device=device).unsqueeze(1)
    key = torch.arange(seq_len, device=device).unsqueeze(0)
    return (key <= query) & (key > query - sliding_window)


class SelfAttention(nn.Module):
    """Causal GQA attention with one fused QKV projection grouped by query group: [q heads; k; v] per group."""

    def __init__(self, config: LLMConfig, tp_group: TPGroup) -> None:
        super().__init__()
        tp = tp_world_size(tp_group)
        self.head_dim = config.head_dim
        self.heads_per_group = config.heads_per_group
        self.local_groups = config.num_query_groups // tp
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, config.qkv_rows, tp_group, bias=config.qkv_bias)
        self.linear_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size, tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        qkv = self.linear_qkv(x).view(batch, seq_len, self.local_groups, self.heads_per_group + 2, self.head_dim)
        query = qkv[:, :, :, : self.heads_per_group].reshape(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        key = qkv[:, :, :, self.heads_per_group].transpose(1, 2)
        value = qkv[:, :, :, self.heads_per_group + 1].transpose(1, 2)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        # Query head h belongs to group h // heads_per_group: repeat each key/value head that many times.
        key = key.repeat_interleave(self.heads_per_group, dim=1)
        value = value.repeat_interleave(self.heads_per_group, dim=1)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5
        )
        return self.linear_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class SwiGLU(nn.Module):
    """linear_fc1 = cat(gate, up) on every rank's shard, so chunking the local output splits gate from up."""

    def __init__(self, config: LLMConfig, tp_group: TPGroup) -> None:
        super().__init__()
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, 2 * config.ffn_hidden_size, tp_group)
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, tp_group: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attention = SelfAttention(config, tp_group)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config, tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: LLMConfig, tp_group: TPGroup) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config, tp_group) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.final_layernorm(x)


class Embedding(nn.Module):
    def __init__(self, config: LLMConfig, tp_group: TPGroup) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size, tp_group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class NevaLLM(nn.Module):
    """The decoder on one tensor-parallel rank; `tp_group=None` is the whole model in one process.

    `self.config` is `config.with_tp(tp)`: the vocabulary is padded for this TP size, as in the rank files.
    forward returns this rank's logits shard [B, T, padded_vocab/tp] in the model's dtype.
    """

    def __init__(self, config: LLMConfig, tp_group: TPGroup = None) -> None:
        super().__init__()
        self.config = config.with_tp(tp_world_size(tp_group))
        self.tp_group = tp_group
        self.embedding = Embedding(self.config, tp_group)
        self.decoder = Decoder(self.config, tp_group)
        if not self.config.tie_embeddings:
            self.output_layer = ColumnParallelLinear(self.config.hidden_size, self.config.padded_vocab_size, tp_group)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LLaMA-style init: normal with std 0.02 (residual output projections scaled by 1/sqrt(2·layers)),
        norms at one, q/k/v bias and vocabulary padding rows at zero. Each tensor is drawn whole and this
        rank keeps its shard, so under the same torch.manual_seed every TP size builds the same model."""
        tp, rank = tp_world_size(self.tp_group), tp_rank(self.tp_group)
        residual_std = INIT_STD / math.sqrt(2.0 * self.config.num_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                full = param.new_empty(full_shape(name, self.config))
                if name.endswith("layernorm.weight"):
                    full.fill_(1.0)
                elif name.endswith("linear_qkv.bias"):
                    full.zero_()
                else:
                    std = residual_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else INIT_STD
                    full.normal_(0.0, std)
                param.copy_(split_tensor(name, full, self.config, tp)[rank])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits shard [B, T, padded_vocab/tp] from token ids [B, T] or embeddings [B, T, H] (exactly one).

        position_ids [B, T] or [T] default to 0..T-1 (RoPE only; attention is always causal by sequence index).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise NevaError("NevaLLM.forward needs exactly one of input_ids or inputs_embeds")
        hidden = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq_len, _ = hidden.shape
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=hidden.device)
        position_ids = position_ids.expand(batch, seq_len)
        cos, sin = rotary_cos_sin(self.config, position_ids, hidden.dtype)
        mask = attention_mask(seq_len, self.config.sliding_window, hidden.device)
        return self._output_logits(self.decoder(hidden, cos, sin, mask))

    def _output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_embeddings:
            # Tied: the vocab-sharded embedding matrix doubles as the column-parallel output layer.
            weight = self.embedding.word_embeddings.weight
            return F.linear(copy_to_tp_region(hidden, self.tp_group), weight)
        return self.output_layer(hidden)

    def cross_entropy(self, local_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                      reduction: str = "mean") -> torch.Tensor:
        """vocab_parallel_cross_entropy with this model's TP group and real vocabulary (padding excluded)."""
        return vocab_parallel_cross_entropy(
            local_logits, labels, self.tp_group, ignore_index, vocab_size=self.config.vocab_size, reduction=reduction
        )


def gather_logits(local_logits: torch.Tensor, tp_group: TPGroup = None) -> torch.Tensor:
    """Full logits [B, T, padded_vocab] on every rank (tests and inference; training uses the sharded loss)."""
    return gather_from_tp_region(local_logits, tp_group)
