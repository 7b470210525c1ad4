"""Helpers for the checkpoint tests: tiny random HF models of each supported family, a tiny
sentencepiece model, and loaders that compare logits and state dicts."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from neva_core.checkpoint.layout import load_native_rank, read_native_config
from neva_core.model.llm import NevaLLM, gather_logits

HF_VOCAB = 300  # not a multiple of 128, so every TP size pads

# Keyword arguments of each family's transformers config; every model has 2 layers and hidden size 64.
_COMMON = dict(
    vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128
)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": (
        "llama",
        dict(num_attention_heads=8, num_key_value_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                            "rope_theta": 500.0}),
    ),
    "mistral": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=5, head_dim=12)),
    "qwen2_bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


def hf_model(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random transformers model of `kind` (a FAMILIES key); every weight random, norms near 1."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    family, kwargs = FAMILIES[kind]
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**_COMMON, **kwargs, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # HF initialises biases to zero and norms to one; random values make the fusion checks real.
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def write_hf_model(
    folder: Path,
    kind: str,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    model = hf_model(kind, seed, **overrides).to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


def write_bin_model(folder: Path, kind: str, shards: int = 1, seed: int = 0) -> Path:
    """The same model as write_hf_model, saved the pre-safetensors way: pytorch_model*.bin (+ index).

    transformers 5 no longer writes .bin files, so they are written here with torch.save as older
    releases did.
    """
    model = hf_model(kind, seed)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = list(state)
    weight_map = {}
    for index in range(shards):
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = names[index::shards]
        torch.save({name: state[name] for name in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index_doc = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index_doc))
    return folder


def load_hf(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def token_ids(vocab: int = HF_VOCAB, seed: int = 1, length: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model_or_folder: torch.nn.Module | Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_hf(model_or_folder) if isinstance(model_or_folder, Path) else model_or_folder
    return model(ids).logits.float()


def native_model(folder: Path) -> NevaLLM:
    """The TP=1 native checkpoint at `folder` loaded into NevaLLM (fp32)."""
    config, _ = read_native_config(folder)
    model = NevaLLM(config)
    model.load_state_dict(load_native_rank(folder, 0))
    return model.float().eval()


@torch.no_grad()
def native_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = native_model(folder)
    return model(ids)[..., : model.config.vocab_size].float()


def tp_rank_logits(rank: int, world: int, group: Any, folder: str, ids: torch.Tensor) -> torch.Tensor:
    """Run inside a gloo process: this rank's file in a TP NevaLLM; the gathered real-vocab logits."""
    config, _ = read_native_config(folder)
    model = NevaLLM(config, tp_group=group)
    model.load_state_dict(load_native_rank(folder, rank))
    with torch.no_grad():
        return gather_logits(model.float()(ids), group)[..., : config.vocab_size]


def safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder`, read with the official library."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def train_sentencepiece(folder: Path, vocab_size: int) -> Path:
    """A tiny BPE sentencepiece model with exactly `vocab_size` pieces, trained on a few lines."""
    import sentencepiece

    lines = [f"the quick brown fox jumps over the lazy dog number {i} with a few more words" for i in range(200)]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=[f"<extra_id_{i}>" for i in range(8)], minloglevel=2,
    )
    path = folder / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


def flip_byte(path: Path, offset_from_end: int = 3) -> None:
    """Corrupt one byte of a file's data (near its end, inside the last tensor) without changing its size."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))
