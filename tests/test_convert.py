"""HF -> native conversion (and native -> HF export) on tiny random models of every supported family."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoint_support import (
    FAMILIES,
    HF_VOCAB,
    assert_same_tensors,
    hf_logits,
    hf_model,
    native_logits,
    native_model,
    safetensors_dir,
    same_bytes,
    token_ids,
    train_sentencepiece,
    write_bin_model,
    write_hf_model,
)
from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.checkpoint.layout import load_native_rank, read_native_config, verify_native
from neva_core.cli import main
from neva_core.errors import NevaError
from neva_core.export import export_hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: write_hf_model(root / kind, kind) for kind in FAMILIES}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_converted_model_matches_hf_logits_and_exports_back(kind: str, hf_dirs: dict[str, Path], tmp_path: Path):
    hf_dir = hf_dirs[kind]
    native = convert_hf_checkpoint(hf_dir, tmp_path / "native")
    assert (native.tp, native.dtype, native.vocab_size, native.padded_vocab_size) == (1, "fp32", HF_VOCAB, 384)
    ids = token_ids(length=9)  # longer than Mistral's sliding window of 5
    reference = hf_logits(hf_dir, ids)
    torch.testing.assert_close(native_logits(tmp_path / "native", ids), reference, rtol=1e-5, atol=1e-5)

    exported = export_hf(tmp_path / "native", tmp_path / "exported")
    assert_same_tensors(safetensors_dir(exported), safetensors_dir(hf_dir))
    torch.testing.assert_close(hf_logits(exported, ids), reference, rtol=0, atol=0)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == json.loads((hf_dir / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias", "qwen2_tied"])
def test_export_from_tp2_gives_identical_hf_state_dict(kind: str, hf_dirs: dict[str, Path], tmp_path: Path):
    convert_hf_checkpoint(hf_dirs[kind], tmp_path / "tp2", tp=2)
    exported = export_hf(tmp_path / "tp2", tmp_path / "exported", max_shard_bytes=60_000)
    assert (exported / "model.safetensors.index.json").is_file()  # sharded: 4 x ~130 kB of weights
    assert_same_tensors(safetensors_dir(exported), safetensors_dir(hf_dirs[kind]))
    ids = token_ids()
    torch.testing.assert_close(hf_logits(exported, ids), hf_logits(hf_dirs[kind], ids), rtol=0, atol=0)


def test_vocab_growth_from_tokenizer(tmp_path: Path):
    hf_dir = write_hf_model(tmp_path / "hf", "llama_gqa", vocab_size=90)
    tokenizer = train_sentencepiece(tmp_path, vocab_size=100)
    native = convert_hf_checkpoint(hf_dir, tmp_path / "native", tp=2, tokenizer=tokenizer)
    assert (native.vocab_size, native.original_vocab_size, native.padded_vocab_size) == (100, 90, 256)

    source = safetensors_dir(hf_dir)
    for rank_name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                               ("output_layer.weight", "lm_head.weight")):
        shards = [load_native_rank(tmp_path / "native", rank)[rank_name] for rank in range(2)]
        assert [s.shape[0] for s in shards] == [128, 128]  # padded to a multiple of 128 x TP
        rows = torch.cat(shards)
        assert torch.equal(rows[:90], source[hf_name])
        assert torch.equal(rows[90:100], source[hf_name].mean(dim=0).expand(10, -1))
        assert not rows[100:].any()  # padding rows 100..255 are zero

    # The grown model, back at TP=1, gives HF's logits on the original ids.
    from neva_core.checkpoint.repartition import repartition

    repartition(tmp_path / "native", tmp_path / "tp1", 1)
    ids = token_ids(vocab=90)
    ours = native_model(tmp_path / "tp1")(ids)
    torch.testing.assert_close(ours[..., :90], hf_logits(hf_dir, ids), rtol=1e-5, atol=1e-5)


def test_smaller_vocab_is_refused(hf_dirs: dict[str, Path], tmp_path: Path):
    with pytest.raises(NevaError, match="smaller than the checkpoint's vocab_size=300"):
        convert_hf_checkpoint(hf_dirs["llama_mha"], tmp_path / "out", vocab_size=299)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("source_dtype", "requested", "expected"),
    [(torch.bfloat16, None, "bf16"), (torch.float32, "fp16", "fp16"), (torch.float32, "bf16", "bf16"),
     (torch.float16, "fp32", "fp32")],
)
def test_dtype_is_exactly_what_was_asked(source_dtype, requested, expected, tmp_path: Path):
    hf_dir = write_hf_model(tmp_path / "hf", "qwen2_bias", dtype=source_dtype)
    native = convert_hf_checkpoint(hf_dir, tmp_path / "native", tp=2, dtype=requested)
    assert native.dtype == expected
    code = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[expected]
    for rank in range(2):
        path = tmp_path / "native" / f"model-tp{rank:02d}-of02.safetensors"
        header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
        assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {code}
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[expected]
    source = safetensors_dir(hf_dir)["model.layers.0.self_attn.o_proj.weight"]
    ours = load_native_rank(tmp_path / "native", 0)["decoder.layers.0.self_attention.linear_proj.weight"]
    assert torch.equal(ours, source.to(torch_dtype)[:, :32])  # row-parallel: rank 0 holds the first half


def test_bin_and_sharded_inputs_convert_to_the_same_bytes(tmp_path: Path):
    write_hf_model(tmp_path / "single", "qwen2_bias")
    sharded = write_hf_model(tmp_path / "sharded", "qwen2_bias", max_shard_size="100KB")
    write_bin_model(tmp_path / "bin", "qwen2_bias")
    write_bin_model(tmp_path / "bin-sharded", "qwen2_bias", shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    names = ("single", "sharded", "bin", "bin-sharded")
    for name in names:
        convert_hf_checkpoint(tmp_path / name, tmp_path / f"out-{name}", tp=2)
    for rank in range(2):
        file = f"model-tp{rank:02d}-of02.safetensors"
        for name in names[1:]:
            assert same_bytes(tmp_path / "out-single" / file, tmp_path / f"out-{name}" / file), name


def test_rank_files_load_with_official_safetensors(hf_dirs: dict[str, Path], tmp_path: Path):
    convert_hf_checkpoint(hf_dirs["qwen2_bias"], tmp_path / "native", tp=2)
    for rank in range(2):
        path = tmp_path / "native" / f"model-tp{rank:02d}-of02.safetensors"
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["tp_rank"] == str(rank)
            official = {name: f.get_tensor(name) for name in f.keys()}
        assert_same_tensors(official, load_native_rank(tmp_path / "native", rank))


def test_provenance_and_idempotent_rerun(tmp_path: Path):
    hf_dir = write_hf_model(tmp_path / "hf", "llama_mha")
    # What the download stage writes for a Hub snapshot.
    (hf_dir / "manifest.json").write_text(json.dumps({"stage": "download", "repo_id": "org/tiny", "revision": "main", "commit": "abc123", "files": {}}))
    first = convert_hf_checkpoint(hf_dir, tmp_path / "native", dtype="bf16")
    _, meta = read_native_config(tmp_path / "native")
    provenance = {key: meta["source"][key] for key in ("repo", "revision", "commit", "path")}
    assert provenance == {"repo": "org/tiny", "revision": "main", "commit": "abc123", "path": str(hf_dir.resolve())}
    assert meta["vocab"] == {"original": 300, "real": 300, "padded": 384}

    mtime = (tmp_path / "native" / "manifest.json").stat().st_mtime_ns
    assert convert_hf_checkpoint(hf_dir, tmp_path / "native", dtype="bf16") == first
    assert (tmp_path / "native" / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    # Other settings into the same folder: rebuilt beside, then swapped in whole.
    assert convert_hf_checkpoint(hf_dir, tmp_path / "native", dtype="fp16").dtype == "fp16"
    verify_native(tmp_path / "native")
    # An edited source file (same manifest) is a different source: the reuse check sees it.
    weights = hf_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    again = convert_hf_checkpoint(hf_dir, tmp_path / "native", dtype="fp16")
    assert (tmp_path / "native" / "manifest.json").stat().st_mtime_ns != mtime and again.dtype == "fp16"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("user data")
    with pytest.raises(NevaError, match="not a native checkpoint"):
        convert_hf_checkpoint(hf_dir, tmp_path / "notes")


def _write_config(folder: Path, **changes) -> Path:
    hf_model("llama_mha").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures=\\['GPT2LMHeadModel'\\] is not supported"),
        # Yi's first releases (remote code) named their own class; today's Yi repos say LlamaForCausalLM.
        ({"architectures": ["YiForCausalLM"], "model_type": "Yi"}, "architectures=\\['YiForCausalLM'\\]"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "RoPE scaling type 'yarn'"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"intermediate_size": 100}, "has shape \\(96, 64\\), but config.json implies \\(100, 64\\)"),
    ],
)
def test_unsupported_inputs_are_clear_errors(changes, message, tmp_path: Path):
    hf_dir = _write_config(tmp_path / "hf", **changes)
    with pytest.raises(NevaError, match=message):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_yi_checkpoints_are_llama_and_no_yi_family_exists() -> None:
    from neva_core.checkpoint.hf import family_of
    from neva_core.model.config import LLMConfig

    yi_6b = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64000}  # 01-ai/Yi-6B
    assert family_of(yi_6b) == "llama"
    with pytest.raises(NevaError, match="model family 'yi' is not supported"):
        LLMConfig(family="yi", num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                  num_query_groups=2, head_dim=4, vocab_size=8, padded_vocab_size=128, max_position_embeddings=8)


def test_unknown_extra_tensor_is_refused(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    hf_dir = _write_config(tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NevaError, match="o_proj.bias.*refusing to drop it"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")


def test_cli_convert_and_errors(hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "native"
    assert main(["convert", "--hf", str(hf_dirs["mistral"]), "--out", str(out), "--tp", "2", "--dtype", "bf16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["tp"], printed["dtype"], printed["path"]) == (2, "bf16", str(out.resolve()))
    verify_native(out, deep=True)
    assert main(["export", "--in", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert_same_tensors(safetensors_dir(tmp_path / "hf"), {
        name: tensor.bfloat16() for name, tensor in safetensors_dir(hf_dirs["mistral"]).items()})
    assert main(["convert", "--hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'config.json'} is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--hf", "a", "--out", "b", "--vocab-size", "5", "--tokenizer", "t.model"])


@pytest.mark.parametrize("kind", ["llama_gqa", "mistral", "qwen2_tied"])
def test_hf_config_rebuilt_from_native_config_alone_gives_the_same_model(kind: str):
    """Export without the source config.json (e.g. a checkpoint written by training) still restores the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from neva_core.checkpoint.hf import hf_config_from_llm, llm_config_from_hf

    source = hf_model(kind)
    rebuilt = hf_config_from_llm(llm_config_from_hf(source.config.to_dict()), "fp32")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**rebuilt))
    assert type(model) is type(source)
    model.load_state_dict(source.state_dict())
    ids = token_ids()
    torch.testing.assert_close(hf_logits(model.eval(), ids), hf_logits(source, ids), rtol=0, atol=0)
