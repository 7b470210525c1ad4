"""The native LLaMA-family decoder (LLaMA, Mistral, Qwen2, Yi) in Megatron-core layout.

Parameter names are the native checkpoint names, and each rank holds its tensor-parallel shard in the
layout of `neva_core.model.partition`, so a rank file loads with `model.load_state_dict(tensors)`.

The arithmetic follows transformers' LlamaForCausalLM so converted weights give the same logits:
RMSNorm in fp32 then cast back before the weight, rotate-half RoPE with cos/sin computed in fp32 from
inv_freq = 1/theta^(2j/head_dim) (divided by the linear scaling factor), attention scaled by
1/sqrt(head_dim). There is no dropout.

Padding: `attention_mask` [B, T] (True = real token) keeps padding out of every real token's attention,
wherever the padding sits (right for training, left or right for generation). Without it, attention is
plain causal and takes SDPA's fused `is_causal` path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neva_core.checkpoint.layout import load_native_rank, read_native_config
from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig
from neva_core.model.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_tp_region,
    mark_tensor_parallel_parameters,
    tp_rank,
    tp_world_size,
    vocab_parallel_cross_entropy,
)
from neva_core.model.partition import full_shape, split_tensor

__all__ = ["KVCache", "NevaLLM", "gather_logits", "training_attention_mask", "vocab_parallel_cross_entropy"]

INIT_STD = 0.02  # LLaMA's initializer_range
SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)  # scaled_dot_product_attention(enable_gqa=)


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


def build_attention_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_mask: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """Boolean mask (True = may attend) of the step's queries over every key, or None when plain causal
    attention (SDPA's is_causal) is exactly right.

    query_positions [B, Tq] and key_positions [B, Tk] are RoPE positions; the queries are the last Tq keys.
    key_mask [B, Tk] marks the real tokens. Causality goes by sequence index, the sliding window by
    position, so padding between a prompt and its continuation does not eat into the window.
    """
    query_len, key_len = query_positions.shape[1], key_positions.shape[1]
    past_len = key_len - query_len
    # Positions of real tokens grow by at most one per index, so a window longer than the keys never binds.
    window_binds = sliding_window is not None and key_len > sliding_window
    if key_mask is None and past_len == 0 and not window_binds:
        return None
    device = key_positions.device
    query = torch.arange(past_len, key_len, device=device).unsqueeze(1)
    key = torch.arange(key_len, device=device).unsqueeze(0)
    allowed = (key <= query).unsqueeze(0)
    if window_binds:
        allowed = allowed & (key_positions.unsqueeze(1) > query_positions.unsqueeze(2) - sliding_window)
    if key_mask is not None:
        # A padding query may also see itself, so no row is fully masked (SDPA would give NaN); it never
        # matters, because no real query ever sees a padding key.
        allowed = allowed & (key_mask.unsqueeze(1) | (key == query))
    return allowed.unsqueeze(1)


def training_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """What a training forward needs of a batch's mask [B, T] (True = real token): None when every row is
    right-padded (no real token after a padding one), because causal attention then never lets a real token
    see padding and SDPA keeps its fused is_causal kernel; otherwise the mask itself. It reads the mask's
    values, so pass the loader's host tensor, not a device copy."""
    real_after_padding = attention_mask[:, 1:] & ~attention_mask[:, :-1]
    return None if not bool(real_after_padding.any()) else attention_mask


class KVCache:
    """Keys (after RoPE) and values of every decoder layer, for incremental decoding on one TP rank.

    Each rank caches only its own query groups: [B, local_groups, max_length, head_dim] per layer, before
    the GQA repeat, allocated once. `key_mask` [B, max_length] remembers which cached positions are real
    tokens and `positions` [B, max_length] their RoPE positions, so a forward step passes the mask and
    positions of its new tokens only. `length` is the number of positions filled; NevaLLM.forward
    advances it after every layer has written its step.
    """

    def __init__(self, config: LLMConfig, batch_size: int, max_length: int, tp_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if batch_size < 1 or max_length < 1:
            raise NevaError(f"KVCache needs batch_size and max_length >= 1, got {batch_size} and {max_length}")
        shape = (batch_size, config.num_query_groups // tp_size, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, model: NevaLLM, batch_size: int, max_length: int) -> KVCache:
        """An empty cache in the model's dtype and device, for this rank's heads."""
        weight = model.embedding.word_embeddings.weight
        return cls(model.config, batch_size, max_length, tp_world_size(model.tp_group), weight.dtype, weight.device)

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]

    def begin_step(self, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the new tokens' mask (None: all real) and positions [B, step]; return the mask and the
        positions of every key the step attends to."""
        batch_size, step_len = position_ids.shape
        if batch_size != self.batch_size:
            raise NevaError(f"the KV cache holds {self.batch_size} sequences but the batch has {batch_size}")
        end = self.length + step_len
        if end > self.max_length:
            raise NevaError(
                f"the KV cache holds at most {self.max_length} positions; {self.length} are filled and the step "
                f"adds {step_len}: make the cache with a larger max_length"
            )
        self.key_mask[:, self.length : end] = True if attention_mask is None else attention_mask
        self.positions[:, self.length : end] = position_ids
        return self.key_mask[:, :end], self.positions[:, :end]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s new keys/values [B, local_groups, step, head_dim]; return all of them so far."""
        end = self.length + key.shape[2]
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class SelfAttention(nn.Module):
    """Causal GQA attention with one fused QKV projection grouped by query group: [q heads; k; v] per group."""

    def __init__(self, config: LLMConfig, tp_group: TPGroup, layer_index: int) -> None:
        super().__init__()
        tp = tp_world_size(tp_group)
        self.layer_index = layer_index  # its slot in a KVCache
        self.head_dim = config.head_dim
        self.heads_per_group = config.heads_per_group
        self.local_groups = config.num_query_groups // tp
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, config.qkv_rows, tp_group, bias=config.qkv_bias)
        self.linear_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size, tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        qkv = self.linear_qkv(x).view(batch, seq_len, self.local_groups, self.heads_per_group + 2, self.head_dim)
        query = qkv[:, :, :, : self.heads_per_group].reshape(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        key = qkv[:, :, :, self.heads_per_group].transpose(1, 2)
        value = qkv[:, :, :, self.heads_per_group + 1].transpose(1, 2)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        gqa: dict[str, bool] = {}
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_index, key, value)
        if self.heads_per_group > 1 and kv_cache is not None and SDPA_HAS_GQA:
            # Decoding: SDPA maps query heads to cached key heads itself, without copying the cache each step.
            gqa["enable_gqa"] = True
        elif self.heads_per_group > 1:
            # Query head h belongs to group h // heads_per_group: repeat each key/value head that many times
            # (fused training kernels take this path on every torch version).
            key = key.repeat_interleave(self.heads_per_group, dim=1)
            value = value.repeat_interleave(self.heads_per_group, dim=1)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5, **gqa
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
    def __init__(self, config: LLMConfig, tp_group: TPGroup, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attention = SelfAttention(config, tp_group, layer_index)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config, tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: LLMConfig, tp_group: TPGroup, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config, tp_group, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        # Checkpointing only pays when a backward follows; there is no dropout, so the recompute is exact.
        checkpointed = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for layer in self.layers:
            if checkpointed:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
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
    `activation_checkpointing` recomputes each decoder layer in backward instead of keeping its
    activations (also settable later through the attribute of the same name).
    """

    def __init__(self, config: LLMConfig, tp_group: TPGroup = None, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config.with_tp(tp_world_size(tp_group))
        self.tp_group = tp_group
        self.embedding = Embedding(self.config, tp_group)
        self.decoder = Decoder(self.config, tp_group, activation_checkpointing)
        if not self.config.tie_embeddings:
            self.output_layer = ColumnParallelLinear(self.config.hidden_size, self.config.padded_vocab_size, tp_group)
        self.reset_parameters()

    @classmethod
    def from_rank_file(
        cls,
        folder: Path | str,
        tp_group: TPGroup = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        activation_checkpointing: bool = False,
        verify: bool = True,
    ) -> NevaLLM:
        """This rank's model from a native checkpoint written for this TP size, without a random init.

        The modules are built on the meta device (no memory, no init) and take the rank file's tensors as
        their parameters; dtype None keeps the file's. `verify` checks the manifest and the file's sha256.
        """
        folder = Path(folder)
        config, meta = read_native_config(folder)
        tp = tp_world_size(tp_group)
        if int(meta["tp"]) != tp:
            raise NevaError(
                f"{folder} holds rank files for tp={meta['tp']} but the model runs at tp={tp}; "
                f"rewrite it with `neva repartition --in {folder} --out DIR --tp {tp}`"
            )
        tensors = load_native_rank(folder, tp_rank(tp_group), verify=verify)
        return cls.from_rank_tensors(
            config, tensors, tp_group, dtype=dtype, device=device, activation_checkpointing=activation_checkpointing,
            mismatch=f"{folder}: rank {tp_rank(tp_group)} does not fit the model its config.json describes",
        )

    @classmethod
    def from_rank_tensors(
        cls,
        config: LLMConfig,
        rank_tensors: Mapping[str, torch.Tensor],
        tp_group: TPGroup = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        activation_checkpointing: bool = False,
        mismatch: str = "the LLM tensors do not fit the model their config describes",
    ) -> NevaLLM:
        """This rank's model holding `rank_tensors` (this rank's shards), built on the meta device (no
        memory, no random init); dtype and device None keep the tensors'. `mismatch` starts the error
        raised when the tensors do not fit `config`."""
        with torch.device("meta"):
            model = cls(config, tp_group, activation_checkpointing=activation_checkpointing)
        tensors = {name: tensor.to(device=device, dtype=dtype) for name, tensor in rank_tensors.items()}
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise NevaError(f"{mismatch} ({exc})") from exc
        # assign=True put new Parameter objects in place, without the TP tags DeepSpeed's grad norm reads.
        mark_tensor_parallel_parameters(model)
        return model

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

    @property
    def activation_checkpointing(self) -> bool:
        return self.decoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.decoder.activation_checkpointing = enabled

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits shard [B, T, padded_vocab/tp] from token ids [B, T] or embeddings [B, T, H] (exactly one).

        attention_mask [B, T] (bool, True = real token): padding positions never attend to or are attended by
        real tokens; their own logits are meaningless. None: every token is real (plain causal attention).
        Right padding alone never reaches a real token under causal attention, so a training batch may pass
        None and keep the fused causal kernel; left padding and padding inside a cache need the mask.
        position_ids [B, T] or [T] (RoPE only) default to 0..T-1, or past..past+T-1 with a cache; with left
        padding pass the real positions (cumsum of the mask - 1), as `neva_core.generate` does.
        kv_cache: the step's keys/values are appended to it and attention covers everything cached;
        attention_mask then covers this step's tokens only (the cache remembers earlier ones).
        """
        return self.output_logits(
            self.hidden_states(input_ids, position_ids, inputs_embeds, attention_mask, kv_cache)
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states [B, T, H] that forward turns into logits (same arguments)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise NevaError("NevaLLM.forward needs exactly one of input_ids or inputs_embeds")
        hidden = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq_len, _ = hidden.shape
        if attention_mask is not None and attention_mask.shape != (batch, seq_len):
            raise NevaError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq_len)}")
        past_len = 0 if kv_cache is None else kv_cache.length
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=hidden.device)
        position_ids = position_ids.expand(batch, seq_len)
        cos, sin = rotary_cos_sin(self.config, position_ids, hidden.dtype)
        key_mask, key_positions = attention_mask, position_ids
        if kv_cache is not None:
            key_mask, key_positions = kv_cache.begin_step(attention_mask, position_ids)
        if key_mask is not None:
            key_mask = key_mask.to(device=hidden.device, dtype=torch.bool)
        mask = build_attention_mask(position_ids, key_positions, key_mask, self.config.sliding_window)
        hidden = self.decoder(hidden, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += seq_len
        return hidden

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits shard of hidden states [..., H] (e.g. only the positions a decoder needs)."""
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

    def loss_terms(self, local_logits: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the token losses, number of supervised tokens) as device tensors, with no host sync.

        labels [B, T] are aligned with the logits (label t is the target of position t). Summing both terms
        over micro-batches and data-parallel ranks before dividing gives the token-weighted mean. Label ids
        are not range-checked here (that needs a sync): they come from the tokenizer's vocabulary.
        """
        loss_sum = vocab_parallel_cross_entropy(
            local_logits, labels, self.tp_group, ignore_index, vocab_size=self.config.vocab_size,
            reduction="sum", check_labels=False,
        )
        return loss_sum, (labels != ignore_index).sum()


def gather_logits(local_logits: torch.Tensor, tp_group: TPGroup = None) -> torch.Tensor:
    """Full logits [B, T, padded_vocab] on every rank (tests and inference; training uses the sharded loss)."""
    return gather_from_tp_region(local_logits, tp_group)
