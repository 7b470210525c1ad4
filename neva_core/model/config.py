"""The native LLM's architecture: one small, self-validating description shared by the model,
the converter and the repartitioner. It is what a native checkpoint's config.json stores under "model".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from neva_core.errors import NevaError

VOCAB_DIVISIBLE_BY = 128
# Yi checkpoints say LlamaForCausalLM (model_type "llama") and are LLaMA in every tensor: they convert, run
# and export as "llama"; no field of their config tells them apart, so there is no separate family.
FAMILIES = ("llama", "mistral", "qwen2")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's padding: the smallest multiple of divisible_by×tp that holds every real token."""
    multiple = divisible_by * tp
    return math.ceil(vocab_size / multiple) * multiple


@dataclass(frozen=True)
class LLMConfig:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # = num_key_value_heads; equal to num_attention_heads for plain MHA
    head_dim: int  # Megatron's kv_channels
    vocab_size: int  # real tokens (after any tokenizer extension)
    padded_vocab_size: int  # rows of the embedding and output layer (multiple of 128×tp)
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # linear RoPE scaling (positions divided by it)
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise NevaError(f"model family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "head_dim", "vocab_size", "padded_vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise NevaError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise NevaError(
                f"model config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise NevaError(
                f"model config: padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size={self.vocab_size}"
            )
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise NevaError(f"model config: rope_scaling_factor must be positive, got {self.rope_scaling_factor}")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: every query head plus one key and one value head per group."""
        return self.head_dim * (self.num_attention_heads + 2 * self.num_query_groups)

    def validate_tp(self, tp: int) -> None:
        """Raise, naming every factor, if this model cannot be split `tp` ways."""
        if tp < 1:
            raise NevaError(f"tensor-parallel size must be at least 1, got {tp}")
        problems = []
        if self.num_query_groups % tp:
            problems.append(f"num_query_groups={self.num_query_groups} (KV heads) is not divisible by tp={tp}")
        if self.ffn_hidden_size % tp:
            problems.append(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by tp={tp}")
        if self.padded_vocab_size % tp:
            problems.append(f"padded_vocab_size={self.padded_vocab_size} is not divisible by tp={tp}")
        if problems:
            raise NevaError("cannot split the model for tensor parallelism: " + "; ".join(problems))

    def with_tp(self, tp: int) -> LLMConfig:
        """The same model padded for `tp` ranks (padding grows on split, shrinks back on merge)."""
        resized = dataclasses.replace(self, padded_vocab_size=padded_vocab_size(self.vocab_size, tp))
        resized.validate_tp(tp)
        return resized

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise NevaError(f"model config has unknown fields {sorted(unknown)}; was it written by a newer neva?")
        return cls(**data)
