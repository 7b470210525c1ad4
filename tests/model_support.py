"""Test helpers for the native LLM: tiny configs, an HF -> native weight fuser, and a gloo process launcher.

The fuser is deliberately minimal and local to the tests: it lets the model be checked against
transformers in isolation from the real converter.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neva_core.model.config import LLMConfig, padded_vocab_size


def tiny_config(**overrides: Any) -> LLMConfig:
    """A 2-layer GQA LLaMA (8 query heads in 4 groups, vocab 300) small enough for CPU tests; fields overridable."""
    fields: dict[str, Any] = dict(
        family="llama", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8,
        num_query_groups=4, head_dim=4, vocab_size=300, max_position_embeddings=64, norm_eps=1e-5,
    )
    fields.update(overrides)
    fields.setdefault("padded_vocab_size", padded_vocab_size(fields["vocab_size"], 1))
    return LLMConfig(**fields)


def native_config_from_hf(hf_config: Any, family: str) -> LLMConfig:
    """The LLMConfig of a transformers Llama/Mistral/Qwen2 config (only what these tests build)."""
    rope = hf_config.rope_parameters
    heads = hf_config.num_attention_heads
    return LLMConfig(
        family=family,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=hf_config.num_key_value_heads or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=padded_vocab_size(hf_config.vocab_size, 1),
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_theta=rope["rope_theta"],
        rope_scaling_factor=rope.get("factor") if rope.get("rope_type") == "linear" else None,
        norm_eps=hf_config.rms_norm_eps,
        qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        sliding_window=getattr(hf_config, "sliding_window", None) if family == "mistral" else None,
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: LLMConfig) -> torch.Tensor:
    """Rows grouped by query group: for each group g, [its query heads; k_g; v_g] (weights or biases)."""
    groups, d = config.num_query_groups, config.head_dim
    tail = q.shape[1:]
    q = q.reshape(groups, config.heads_per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def hf_to_native(hf_state: dict[str, torch.Tensor], config: LLMConfig) -> dict[str, torch.Tensor]:
    """Canonical full native tensors (vocab rows = vocab_size) from an HF *ForCausalLM state dict."""
    native = {"embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
              "decoder.final_layernorm.weight": hf_state["model.norm.weight"]}
    if not config.tie_embeddings:
        native["output_layer.weight"] = hf_state["lm_head.weight"]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        native[ours + "input_layernorm.weight"] = hf_state[hf + "input_layernorm.weight"]
        native[ours + "pre_mlp_layernorm.weight"] = hf_state[hf + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            native[ours + f"self_attention.linear_qkv.{kind}"] = fuse_qkv(
                hf_state[attn + f"q_proj.{kind}"], hf_state[attn + f"k_proj.{kind}"],
                hf_state[attn + f"v_proj.{kind}"], config)
        native[ours + "self_attention.linear_proj.weight"] = hf_state[attn + "o_proj.weight"]
        native[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[hf + "mlp.gate_proj.weight"], hf_state[hf + "mlp.up_proj.weight"]], dim=0)
        native[ours + "mlp.linear_fc2.weight"] = hf_state[hf + "mlp.down_proj.weight"]
    return native


def pad_vocab_rows(full: dict[str, torch.Tensor], config: LLMConfig) -> dict[str, torch.Tensor]:
    """A TP=1 rank's tensors: the full tensors with vocab tensors zero-padded to config.padded_vocab_size."""
    padded = dict(full)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in full:
            extra = full[name].new_zeros(config.padded_vocab_size - config.vocab_size, full[name].shape[1])
            padded[name] = torch.cat([full[name], extra])
    return padded


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # 4 processes must fit on 2 shared cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, dist.group.WORLD, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, out_dir: Path, *args: Any) -> list[Any]:
    """Run fn(rank, world, group, *args) in `world` gloo processes on 127.0.0.1; return each rank's result.

    fn must be a module-level function (spawn pickles it); results travel through files in out_dir.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_worker, args=(world, free_port(), fn, args, str(out_dir)), nprocs=world, join=True)
    except Exception as exc:
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("rank*.error")))
        raise AssertionError(f"distributed run failed:\n{errors or exc}") from exc
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def converted_fixture_llama(folder: Path, *, tp: int = 1, vocab_size: int = 300, seed: int = 0,
                            **arch: Any) -> tuple[Path, Path]:
    """The fixture LLaMA (neva_core.fixtures) saved as an HF folder and converted by `neva convert` at `tp`.

    Returns (hf_dir, native_dir); `arch` overrides LlamaConfig fields (e.g. initializer_range).
    """
    from neva_core.checkpoint.convert import convert_hf_checkpoint
    from neva_core.fixtures import write_tiny_llama

    hf_dir = write_tiny_llama(folder / "hf", vocab_size, seed, **arch)
    convert_hf_checkpoint(hf_dir, folder / f"native-tp{tp}", tp=tp)
    return hf_dir, folder / f"native-tp{tp}"
