"""Tensor-parallel split and merge rules, one per native (Megatron-core) tensor name: the model's layout.

Pure functions on tensors: no files, no process groups. The model owns them (`NevaLLM` holds each rank's
shard in this layout); the checkpoint code (convert, repartition, export) converts to and from it through
them, so a rank file written by one stage is exactly what `NevaLLM` on that rank expects.

"Full" tensors are canonical: the embedding and output layer hold exactly `config.vocab_size` rows.
A rank at TP=tp holds `padded_vocab_size(vocab_size, tp) / tp` of those rows, the padding rows zero.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

import torch

from neva_core.errors import NevaError
from neva_core.model.config import LLMConfig, padded_vocab_size

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"

_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


class Split(enum.Enum):
    """How a tensor is laid out across tensor-parallel ranks."""

    VOCAB = "vocab"  # rows = vocabulary ids, padded then split on dim 0
    QKV = "qkv"  # dim 0 split by whole query groups
    GATE_UP = "gate_up"  # dim 0 = cat(gate, up); each half split separately
    ROW = "row"  # row-parallel linear: split on dim 1 (its input features)
    REPLICATED = "replicated"  # every rank holds the whole tensor


_LAYER_SPLITS = {
    "input_layernorm.weight": Split.REPLICATED,
    "self_attention.linear_qkv.weight": Split.QKV,
    "self_attention.linear_qkv.bias": Split.QKV,
    "self_attention.linear_proj.weight": Split.ROW,
    "pre_mlp_layernorm.weight": Split.REPLICATED,
    "mlp.linear_fc1.weight": Split.GATE_UP,
    "mlp.linear_fc2.weight": Split.ROW,
}


def layer_tensor_names(config: LLMConfig, layer: int) -> list[str]:
    """The native names of one decoder layer, in canonical order."""
    suffixes = list(_LAYER_SPLITS)
    if not config.qkv_bias:
        suffixes.remove("self_attention.linear_qkv.bias")
    return [f"decoder.layers.{layer}.{suffix}" for suffix in suffixes]


def tensor_names(config: LLMConfig) -> list[str]:
    """Every native tensor name of the model, in a fixed canonical order (embedding, layers, norm, output)."""
    names = [EMBEDDING]
    for layer in range(config.num_layers):
        names.extend(layer_tensor_names(config, layer))
    names.append(FINAL_NORM)
    if not config.tie_embeddings:
        names.append(OUTPUT_LAYER)
    return names


def split_kind(name: str, config: LLMConfig) -> Split:
    """The partitioning rule of `name`; raises NevaError for a name this model does not have."""
    if name in (EMBEDDING, OUTPUT_LAYER):
        if name == OUTPUT_LAYER and config.tie_embeddings:
            raise NevaError(f"tensor {name!r} does not exist in a model with tied embeddings (tie_embeddings=True)")
        return Split.VOCAB
    if name == FINAL_NORM:
        return Split.REPLICATED
    match = _LAYER_NAME.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_SPLITS:
        raise NevaError(f"tensor {name!r} is not a native LLM tensor name; expected names like {EMBEDDING!r}")
    layer = int(match.group(1))
    if layer >= config.num_layers:
        raise NevaError(f"tensor {name!r} names layer {layer}, but the model has num_layers={config.num_layers}")
    if match.group(2) == "self_attention.linear_qkv.bias" and not config.qkv_bias:
        raise NevaError(f"tensor {name!r} does not exist in a model without q/k/v bias (qkv_bias=False)")
    return _LAYER_SPLITS[match.group(2)]


def full_shape(name: str, config: LLMConfig) -> tuple[int, ...]:
    """Shape of the canonical full tensor (vocab tensors trimmed to vocab_size rows)."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    kind = split_kind(name, config)
    if kind is Split.VOCAB:
        return (config.vocab_size, hidden)
    if kind is Split.QKV:
        return (config.qkv_rows, hidden) if name.endswith(".weight") else (config.qkv_rows,)
    if kind is Split.GATE_UP:
        return (2 * ffn, hidden)
    if name.endswith("linear_proj.weight"):
        return (hidden, config.num_attention_heads * config.head_dim)
    if name.endswith("linear_fc2.weight"):
        return (hidden, ffn)
    return (hidden,)


def shard_shape(name: str, config: LLMConfig, tp: int) -> tuple[int, ...]:
    """Shape of one rank's tensor at TP=tp (vocab tensors padded to padded_vocab_size(vocab, tp) first)."""
    config.with_tp(tp)  # raises, naming every factor, when the model cannot be split tp ways
    shape = list(full_shape(name, config))
    kind = split_kind(name, config)
    if kind is Split.VOCAB:
        shape[0] = padded_vocab_size(config.vocab_size, tp) // tp
    elif kind in (Split.QKV, Split.GATE_UP):
        shape[0] //= tp
    elif kind is Split.ROW:
        shape[1] //= tp
    return tuple(shape)


def split_tensor(name: str, full: torch.Tensor, config: LLMConfig, tp: int) -> list[torch.Tensor]:
    """Cut the canonical full tensor `name` into `tp` contiguous, independent rank shards."""
    config.with_tp(tp)
    _check_shape(name, full, full_shape(name, config), "full tensor")
    kind = split_kind(name, config)
    if kind is Split.VOCAB:
        return _split_vocab(full, padded_vocab_size(config.vocab_size, tp) // tp, tp)
    if tp == 1:
        return [full.contiguous()]  # the one shard is the full tensor: copying it would double the work
    if kind is Split.QKV:
        shards = _split_groups(full, config, tp)
    elif kind is Split.GATE_UP:
        gate, up = full.chunk(2, dim=0)
        shards = [torch.cat(pair, dim=0) for pair in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]
    elif kind is Split.ROW:
        shards = full.chunk(tp, dim=1)
    else:
        shards = [full] * tp
    return [_owned(shard, full) for shard in shards]


def _owned(shard: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    # A shard must not keep the full tensor alive or share storage with its siblings (safetensors refuses
    # shared storage, and callers free the full tensor right after): views are cloned, fresh tensors
    # (torch.cat's) are not copied a second time.
    if shard.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
        return shard.clone(memory_format=torch.contiguous_format)
    return shard


def merge_tensor(name: str, shards: Sequence[torch.Tensor], config: LLMConfig) -> torch.Tensor:
    """Inverse of split_tensor: the canonical full tensor from every rank's shard, in rank order."""
    tp = len(shards)
    expected = shard_shape(name, config, tp)
    for rank, shard in enumerate(shards):
        _check_shape(name, shard, expected, f"shard of rank {rank} (of tp={tp})")
        if shard.dtype != shards[0].dtype:
            raise NevaError(f"tensor {name!r}: rank {rank} holds {shard.dtype} but rank 0 holds {shards[0].dtype}")
    kind = split_kind(name, config)
    if kind is Split.VOCAB:
        return _merge_vocab(shards, config.vocab_size)
    if kind is Split.QKV:
        return _merge_groups(shards, config)
    if kind is Split.GATE_UP:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([half[0] for half in halves] + [half[1] for half in halves], dim=0)
    if kind is Split.ROW:
        return torch.cat(list(shards), dim=1)
    return _merge_replicated(name, shards)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise NevaError(
            f"tensor {name!r}: {what} has shape {tuple(tensor.shape)}, expected {expected}; "
            f"the checkpoint does not match the model config"
        )


def _split_vocab(full: torch.Tensor, rows: int, tp: int) -> list[torch.Tensor]:
    # Each shard is allocated zeroed (the padding rows) and filled once: the embedding, the largest
    # tensor of the model, is copied exactly once, never padded, chunked and cloned in turn.
    shards = []
    for rank in range(tp):
        shard = full.new_zeros((rows, *full.shape[1:]))
        real = full[rank * rows : (rank + 1) * rows]
        shard[: real.shape[0]] = real
        shards.append(shard)
    return shards


def _merge_vocab(shards: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    rows = shards[0].shape[0]
    merged = shards[0].new_empty((vocab_size, *shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        real = merged[rank * rows : (rank + 1) * rows]  # empty past the last real token
        real.copy_(shard[: real.shape[0]])
    return merged


def _split_groups(full: torch.Tensor, config: LLMConfig, tp: int) -> list[torch.Tensor]:
    # View dim 0 as [group, rows of one group] so each rank takes whole groups, each still [q heads; k; v].
    grouped = full.reshape(config.num_query_groups, -1, *full.shape[1:])
    return [part.reshape(-1, *full.shape[1:]) for part in grouped.chunk(tp, dim=0)]


def _merge_groups(shards: Sequence[torch.Tensor], config: LLMConfig) -> torch.Tensor:
    rows_per_group = config.head_dim * (config.heads_per_group + 2)
    grouped = [shard.reshape(-1, rows_per_group, *shard.shape[1:]) for shard in shards]
    return torch.cat(grouped, dim=0).reshape(-1, *shards[0].shape[1:])


def _merge_replicated(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    # Replicated tensors are identical on every rank; a difference means mixed-up or corrupt rank files.
    for rank, shard in enumerate(shards[1:], start=1):
        if not torch.equal(shard, shards[0]):
            raise NevaError(
                f"tensor {name!r} is replicated across tensor-parallel ranks but rank {rank} differs from rank 0; "
                f"the rank files do not belong to the same checkpoint"
            )
    return shards[0].clone()
