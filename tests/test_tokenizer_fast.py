"""Tokenizer extension for Hugging Face fast tokenizers (tokenizer.json, no tokenizer.model: Qwen2, Llama-3)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer

from neva_core import cli
from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.checkpoint.layout import read_native_config
from neva_core.errors import NevaError
from neva_core.fixtures import write_tiny_qwen2
from neva_core.fixtures.datasets import tokenizer_corpus
from neva_core.fixtures.models import qwen2_tokenizer_config
from neva_core.tokenizer import NEVA_SPECIAL_TOKENS, NEVA_TOKEN_ROLES, TokenizerExtension, extend_tokenizer

TEXTS = [
    "a red circle",
    "hello <extra_id_3> world",
    "<extra_id_4><extra_id_3><extra_id_3><extra_id_5>a blue square\n",
    "x<extra_id_0>y<extra_id_1>z<extra_id_2> <|im_start|>user\nWhat shape is it?<|im_end|>",
    "unicode: café, naïve, 漢字, emoji 🙂",
    "  two leading spaces and  double  gaps  ",
    "",
]


def auto_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def qwen2_tokenizer(qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenizerExtension:
    return extend_tokenizer(qwen2_dir, tmp_path_factory.mktemp("qwen2-tokenizer") / "extended")


def variant(qwen2_dir: Path, dest: Path, special: Sequence[str] = (), plain: Sequence[str] = ()) -> Path:
    """A copy of the fixture's tokenizer files with more special (or plain added) tokens at the end."""
    dest.mkdir()
    tokenizer = Tokenizer.from_file(str(qwen2_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens(list(plain))
    tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(qwen2_tokenizer_config(tokenizer)))
    return dest


def test_tokens_are_special_tokens_after_the_last_id(qwen2_dir: Path, qwen2_tokenizer: TokenizerExtension) -> None:
    assert not (qwen2_dir / "tokenizer.model").exists()
    assert qwen2_tokenizer.kind == "hf-fast" and qwen2_tokenizer.old_vocab_size == 403  # 400 BPE + 3 Qwen2 specials
    assert qwen2_tokenizer.added == {token: 403 + i for i, token in enumerate(NEVA_SPECIAL_TOKENS)}
    assert qwen2_tokenizer.vocab_size == 411 and qwen2_tokenizer.already_present == {}
    assert qwen2_tokenizer.roles == dict(NEVA_TOKEN_ROLES)
    record = json.loads((qwen2_tokenizer.out_dir / "extension.json").read_text())
    assert record["roles"] == dict(NEVA_TOKEN_ROLES) and record["vocab_size"] == 411
    assert sorted(p.name for p in qwen2_tokenizer.out_dir.iterdir()) == [
        "extension.json", "manifest.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("text", TEXTS)
def test_transformers_encodes_like_the_source_with_the_new_ids(qwen2_dir: Path, qwen2_tokenizer: TokenizerExtension,
                                                              text: str) -> None:
    source, extended = auto_tokenizer(qwen2_dir), auto_tokenizer(qwen2_tokenizer.out_dir)
    assert len(extended) == qwen2_tokenizer.vocab_size
    pieces = text
    for token in NEVA_SPECIAL_TOKENS:
        pieces = pieces.replace(token, f"\0{token}\0")
    expected: list[int] = []
    for piece in filter(None, pieces.split("\0")):
        expected += [qwen2_tokenizer.added[piece]] if piece in qwen2_tokenizer.added else source(
            piece, add_special_tokens=False).input_ids
    assert extended(text, add_special_tokens=False).input_ids == expected
    assert extended.decode(expected) == text


def test_rerun_and_re_extension_change_nothing(qwen2_dir: Path, qwen2_tokenizer: TokenizerExtension,
                                               tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in qwen2_tokenizer.out_dir.iterdir()}
    assert extend_tokenizer(qwen2_dir / "tokenizer.json", qwen2_tokenizer.out_dir).reused
    assert {p: p.stat().st_mtime_ns for p in qwen2_tokenizer.out_dir.iterdir()} == before
    again = extend_tokenizer(qwen2_tokenizer.out_dir, tmp_path / "again")
    assert again.added == {} and again.already_present == qwen2_tokenizer.added
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again.out_dir / name).read_bytes() == (qwen2_tokenizer.out_dir / name).read_bytes(), name
    # Other tokens into a folder that holds an extension: rebuilt beside it and swapped in, never refused.
    other = tmp_path / "other"
    extend_tokenizer(qwen2_dir, other)
    rebuilt = extend_tokenizer(qwen2_dir, other, ["<image>"])
    assert not rebuilt.reused and list(rebuilt.added) == ["<image>"]


def test_clashes_are_errors(qwen2_dir: Path, tmp_path: Path) -> None:
    vocab = Tokenizer.from_file(str(qwen2_dir / "tokenizer.json")).get_vocab(with_added_tokens=False)
    normal = next(token for token in vocab if token.startswith("\u0120") and len(token) > 2)  # 'Ġ' + a word
    with pytest.raises(NevaError, match=f"{normal!r} already exists at id {vocab[normal]} .* as a normal vocabulary"):
        extend_tokenizer(qwen2_dir, tmp_path / "out", [normal])
    plain = variant(qwen2_dir, tmp_path / "plain", plain=["<img>"])
    with pytest.raises(NevaError, match="'<img>' already exists at id 403 .* as a non-special added token"):
        extend_tokenizer(plain, tmp_path / "out", ["<img>"])
    with pytest.raises(NevaError, match="applies to sentencepiece models only"):
        extend_tokenizer(qwen2_dir, tmp_path / "out", piece_type="control")
    assert not (tmp_path / "out").exists()
    present = extend_tokenizer(qwen2_dir, tmp_path / "present", ["<|im_end|>", "<image>"])
    assert present.already_present == {"<|im_end|>": 402} and present.added == {"<image>": 403}


def test_llama3_reserved_tokens_play_the_roles_as_in_nemo(qwen2_dir: Path, tmp_path: Path) -> None:
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(10)]
    folder = variant(qwen2_dir, tmp_path / "llama3", special=["<|begin_of_text|>", *reserved])
    result = extend_tokenizer(folder, tmp_path / "out")
    assert result.added == {} and result.vocab_size == result.old_vocab_size == 414
    assert (result.roles["image_patch"], result.roles["image_start"], result.roles["image_end"]) == tuple(
        reserved[3:6])
    assert result.roles["system"] == reserved[0] and result.roles["eos"] == reserved[7]
    assert result.already_present == {token: 404 + i for i, token in enumerate(reserved[:8])}
    assert auto_tokenizer(result.out_dir).convert_tokens_to_ids(result.roles["image_patch"]) == 407


def test_qwen2_vl_vision_tokens_play_the_image_roles(qwen2_dir: Path, tmp_path: Path) -> None:
    folder = variant(qwen2_dir, tmp_path / "qwen2vl", special=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    result = extend_tokenizer(folder, tmp_path / "out")
    assert (result.roles["image_start"], result.roles["image_end"], result.roles["image_patch"]) == (
        "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    others = [token for token in NEVA_SPECIAL_TOKENS if token not in ("<extra_id_3>", "<extra_id_4>", "<extra_id_5>")]
    assert result.added == {token: 406 + i for i, token in enumerate(others)}
    assert result.roles["system"] == "<extra_id_0>"


def test_convert_grows_the_vocabulary_only_past_the_embedding(qwen2_tokenizer: TokenizerExtension,
                                                              tmp_path: Path) -> None:
    padded = write_tiny_qwen2(tmp_path / "padded", tokenizer_corpus(), seed=7, vocab_size=448)
    convert_hf_checkpoint(padded, tmp_path / "native", tokenizer=qwen2_tokenizer.out_dir)
    config, _ = read_native_config(tmp_path / "native")
    assert config.vocab_size == 448  # 411 ids fit in Qwen2's padded embedding: nothing to grow


def test_cli_prints_ids_and_roles(qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tokenizer", "extend", "--in", str(qwen2_dir), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "created token <extra_id_3> at id 406" in printed and "role image_patch: <extra_id_3>" in printed
    assert "vocab size: 403 -> 411" in printed
