"""Any-to-any tensor-parallel repartition of native checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoint_support import (
    assert_same_tensors,
    hf_logits,
    same_bytes,
    token_ids,
    tp_rank_logits,
    write_hf_model,
)
from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.checkpoint.layout import load_native_rank, read_native_config, verify_native
from neva_core.checkpoint.partition import tensor_names
from neva_core.checkpoint.repartition import repartition
from neva_core.cli import main
from neva_core.errors import NevaError


def _rank_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-tp*.safetensors"))


@pytest.fixture(scope="module")
def tp1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TP=1 bf16 native checkpoint of a GQA LLaMA with 4 KV groups (divisible by 1, 2 and 4)."""
    root = tmp_path_factory.mktemp("repartition")
    hf_dir = write_hf_model(root / "hf", "llama_gqa")
    convert_hf_checkpoint(hf_dir, root / "tp1", dtype="bf16")
    return root / "tp1"


def test_round_trip_1_4_2_1_is_bit_exact(tp1: Path, tmp_path: Path):
    tp4 = repartition(tp1, tmp_path / "tp4", 4)
    assert (tp4.tp, tp4.padded_vocab_size, len(_rank_files(tmp_path / "tp4"))) == (4, 512, 4)
    repartition(tmp_path / "tp4", tmp_path / "tp2", 2)
    back = repartition(tmp_path / "tp2", tmp_path / "back", 1)
    assert back.padded_vocab_size == 384
    assert same_bytes(_rank_files(tp1)[0], _rank_files(tmp_path / "back")[0])
    assert_same_tensors(load_native_rank(tmp_path / "back", 0), load_native_rank(tp1, 0))

    _, meta = read_native_config(tmp_path / "back")
    assert [step["stage"] for step in meta["history"]] == ["convert", "repartition", "repartition", "repartition"]
    assert meta["parent"]["path"] == str((tmp_path / "tp2").resolve())
    assert meta["source"] == read_native_config(tp1)[1]["source"]


def test_tp4_rank_layout(tp1: Path, tmp_path: Path):
    """Rank r holds query groups r (each [q heads; k; v]), gate/up halves split separately, vocab rows."""
    repartition(tp1, tmp_path / "tp4", 4)
    full = load_native_rank(tp1, 0)
    ranks = [load_native_rank(tmp_path / "tp4", rank) for rank in range(4)]
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"]  # 4 groups x (2 q + k + v) x head_dim 8
    fc1 = full["decoder.layers.1.mlp.linear_fc1.weight"]  # cat(gate [96], up [96])
    embedding = torch.cat([full["embedding.word_embeddings.weight"], torch.zeros(512 - 384, 64, dtype=torch.bfloat16)])
    for rank, tensors in enumerate(ranks):
        assert torch.equal(tensors["decoder.layers.1.self_attention.linear_qkv.weight"], qkv[rank * 32 : (rank + 1) * 32])
        gate, up = fc1[rank * 24 : (rank + 1) * 24], fc1[96 + rank * 24 : 96 + (rank + 1) * 24]
        assert torch.equal(tensors["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate, up]))
        # Rows 300..511 are zero padding: rank 2's last 84 rows and all of rank 3.
        assert torch.equal(tensors["embedding.word_embeddings.weight"], embedding[rank * 128 : (rank + 1) * 128])
        assert torch.equal(tensors["decoder.final_layernorm.weight"], full["decoder.final_layernorm.weight"])


def test_direct_tp2_conversion_equals_convert_then_repartition(tmp_path: Path):
    hf_dir = write_hf_model(tmp_path / "hf", "qwen2_bias")
    convert_hf_checkpoint(hf_dir, tmp_path / "direct", tp=2)
    convert_hf_checkpoint(hf_dir, tmp_path / "tp1")
    repartition(tmp_path / "tp1", tmp_path / "via", 2)
    for direct, via in zip(_rank_files(tmp_path / "direct"), _rank_files(tmp_path / "via"), strict=True):
        assert same_bytes(direct, via), direct.name


def test_indivisible_sizes_name_every_factor(tmp_path: Path):
    hf_dir = write_hf_model(tmp_path / "hf", "mistral", intermediate_size=100)  # 2 KV groups, ffn 100
    convert_hf_checkpoint(hf_dir, tmp_path / "tp1")
    with pytest.raises(NevaError) as error:
        repartition(tmp_path / "tp1", tmp_path / "tp8", 8)
    assert "num_query_groups=2 (KV heads) is not divisible by tp=8" in str(error.value)
    assert "ffn_hidden_size=100 is not divisible by tp=8" in str(error.value)
    assert not (tmp_path / "tp8").exists()
    with pytest.raises(NevaError, match="num_query_groups=2 \\(KV heads\\) is not divisible by tp=4"):
        convert_hf_checkpoint(hf_dir, tmp_path / "tp4", tp=4)


def test_repartition_is_idempotent_and_replaces_a_different_output(tp1: Path, tmp_path: Path):
    first = repartition(tp1, tmp_path / "tp2", 2)
    assert repartition(tp1, tmp_path / "tp2", 2) == first
    assert repartition(tp1, tmp_path / "tp2", 4).tp == 4
    verify_native(tmp_path / "tp2")


@pytest.mark.slow
def test_tp2_rank_files_run_in_a_tensor_parallel_model(tmp_path: Path):
    """Each rank's file loads into NevaLLM on a 2-process gloo group; the gathered logits equal HF's."""
    from model_support import run_distributed

    hf_dir = write_hf_model(tmp_path / "hf", "qwen2_tied")
    convert_hf_checkpoint(hf_dir, tmp_path / "tp2", tp=2)
    ids = token_ids()
    results = run_distributed(tp_rank_logits, 2, tmp_path / "dist", str(tmp_path / "tp2"), ids)
    reference = hf_logits(hf_dir, ids)
    for logits in results:
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_cli_repartition(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["repartition", "--in", str(tp1), "--out", str(tmp_path / "tp2"), "--tp", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tp"] == 2
    verify_native(tmp_path / "tp2", deep=True)
    config, _ = read_native_config(tmp_path / "tp2")
    assert len(tensor_names(config)) == 3 + 2 * 6  # embedding, final norm, output + 6 per layer (no bias)
    assert main(["repartition", "--in", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--tp", "2"]) == 2
    assert "does not exist; run `neva convert` first" in capsys.readouterr().err
