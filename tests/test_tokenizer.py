"""Tokenizer extension: NeMo-compatible ids, idempotence, clear clashes, and Hugging Face files that agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from neva_core import cli
from neva_core.errors import NevaError
from neva_core.fixtures import Fixtures
from neva_core.fixtures.datasets import tokenizer_corpus
from neva_core.tokenizer import (
    NEVA_SPECIAL_TOKENS,
    NEVA_TOKEN_ROLES,
    TokenizerExtension,
    extend_tokenizer,
    load_model_proto,
)

USER_DEFINED, CONTROL = 4, 3

# Texts with and without the new tokens, at the start, middle and end, repeated, beside spaces and newlines.
AGREEMENT_TEXTS = [
    "a red circle",
    "Describe the image concisely.\n<image>",
    "hello <extra_id_3> world",
    "<extra_id_4><extra_id_3><extra_id_3><extra_id_5>a blue square\n",
    "<extra_id_6> [INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat shape is it? [/INST] a circle <extra_id_7>",
    "x<extra_id_0>y<extra_id_1>z<extra_id_2>",
    "<extra_id_3> leading token then text",
    "  two leading spaces and  double  gaps  ",
    "tabs\tand\nnewlines\n\n",
    "digits 1234567890 and punctuation!?;:",
    "unicode: café, naïve, 漢字, emoji 🙂",
    "literal specials <s> and </s> and <unk> are plain text",
    "almost <extra_id_8> and <extra_id_3 and extra_id_3>",
    "\u2581already\u2581escaped spaces",
    "",
]


def processor(model: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(model))


def hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_new_ids_start_at_old_vocab_size(neva_fixtures: Fixtures, neva_tokenizer: TokenizerExtension) -> None:
    old = processor(neva_fixtures.tokenizer_model).vocab_size()
    assert neva_tokenizer.old_vocab_size == old
    assert neva_tokenizer.added == {token: old + i for i, token in enumerate(NEVA_SPECIAL_TOKENS)}
    assert neva_tokenizer.vocab_size == old + 8 and neva_tokenizer.already_present == {}

    proto = load_model_proto(neva_tokenizer.tokenizer_model)
    for token, index in neva_tokenizer.added.items():
        piece = proto.pieces[index]
        assert (piece.piece, piece.type, piece.score) == (token, USER_DEFINED, 0.0)
    original = load_model_proto(neva_fixtures.tokenizer_model)
    assert list(proto.pieces)[:old] == list(original.pieces)  # existing pieces untouched

    record = json.loads((neva_tokenizer.out_dir / "extension.json").read_text())
    assert record["added"] == neva_tokenizer.added and record["vocab_size"] == old + 8
    assert record["source"]["vocab_size"] == old and len(record["source"]["sha256"]) == 64


def test_user_defined_tokens_are_matched_inside_text(neva_tokenizer: TokenizerExtension) -> None:
    ids = processor(neva_tokenizer.tokenizer_model).encode("hello <extra_id_3> world")
    assert neva_tokenizer.added["<extra_id_3>"] in ids


def test_control_tokens_are_never_matched_in_text(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    result = extend_tokenizer(neva_fixtures.tokenizer_model, tmp_path / "control", piece_type="control")
    proto = load_model_proto(result.tokenizer_model)
    assert {proto.pieces[i].type for i in result.added.values()} == {CONTROL}
    sp = processor(result.tokenizer_model)
    assert result.added["<extra_id_3>"] not in sp.encode("hello <extra_id_3> world")
    assert sp.piece_to_id("<extra_id_3>") == result.added["<extra_id_3>"]
    hf = hf_tokenizer(result.out_dir)
    for text in AGREEMENT_TEXTS:
        assert hf(text, add_special_tokens=False).input_ids == sp.encode(text), text


@pytest.mark.parametrize("text", AGREEMENT_TEXTS)
def test_hugging_face_files_encode_like_sentencepiece(neva_tokenizer: TokenizerExtension, text: str) -> None:
    sp = processor(neva_tokenizer.tokenizer_model)
    hf = hf_tokenizer(neva_tokenizer.out_dir)
    assert hf(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert hf(text).input_ids == sp.encode(text, add_bos=True)  # BOS added, no EOS, as LLaMA does
    assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_hugging_face_tokenizer_knows_the_new_tokens(neva_tokenizer: TokenizerExtension) -> None:
    hf = hf_tokenizer(neva_tokenizer.out_dir)
    assert len(hf) == neva_tokenizer.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    for token, index in neva_tokenizer.added.items():
        assert hf.convert_tokens_to_ids(token) == index
    config = json.loads((neva_tokenizer.out_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False


def test_text_that_is_exactly_one_token_is_the_documented_difference(neva_tokenizer: TokenizerExtension) -> None:
    sp = processor(neva_tokenizer.tokenizer_model)
    hf = hf_tokenizer(neva_tokenizer.out_dir)
    token_id = neva_tokenizer.added["<extra_id_3>"]
    assert sp.encode("<extra_id_3>") == [sp.piece_to_id("\u2581"), token_id]
    assert hf("<extra_id_3>", add_special_tokens=False).input_ids == [token_id]


def test_rerun_into_same_folder_writes_nothing(neva_fixtures: Fixtures, neva_tokenizer: TokenizerExtension) -> None:
    before = {p: p.stat().st_mtime_ns for p in neva_tokenizer.out_dir.iterdir()}
    again = extend_tokenizer(neva_fixtures.tokenizer_model, neva_tokenizer.out_dir)
    assert again.reused and again.added == neva_tokenizer.added
    assert {p: p.stat().st_mtime_ns for p in neva_tokenizer.out_dir.iterdir()} == before


def test_extending_an_extended_model_changes_nothing(neva_tokenizer: TokenizerExtension, tmp_path: Path) -> None:
    again = extend_tokenizer(neva_tokenizer.tokenizer_model, tmp_path / "again")
    assert again.added == {} and again.already_present == neva_tokenizer.added
    assert again.vocab_size == neva_tokenizer.vocab_size
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (again.out_dir / name).read_bytes() == (neva_tokenizer.out_dir / name).read_bytes(), name


def test_same_input_gives_identical_output(neva_fixtures: Fixtures, neva_tokenizer: TokenizerExtension,
                                           tmp_path: Path) -> None:
    second = extend_tokenizer(neva_fixtures.tokenizer_model, tmp_path / "second")
    for path in neva_tokenizer.out_dir.iterdir():
        assert (second.out_dir / path.name).read_bytes() == path.read_bytes(), path.name


def test_only_missing_tokens_are_added(neva_tokenizer: TokenizerExtension, tmp_path: Path) -> None:
    result = extend_tokenizer(neva_tokenizer.tokenizer_model, tmp_path / "more", ["<extra_id_0>", "<image>"])
    assert result.already_present == {"<extra_id_0>": neva_tokenizer.added["<extra_id_0>"]}
    assert result.added == {"<image>": neva_tokenizer.vocab_size}
    assert processor(result.tokenizer_model).encode("<image>\nhi")[:2] == [
        processor(result.tokenizer_model).piece_to_id("\u2581"), neva_tokenizer.vocab_size,
    ]


@pytest.mark.parametrize(
    ("tokens", "piece_type", "message"),
    [
        (["<s>"], "user_defined", "'<s>' already exists at id 1 as a CONTROL piece"),
        (["<0x41>"], "user_defined", "'<0x41>' already exists at id 68 as a BYTE piece"),
        (["<extra_id_0>"], "control", "'<extra_id_0>' already exists at id 384 as a USER_DEFINED piece"),
        (["<a>", "<a>"], "user_defined", "listed twice"),
        (["two words"], "user_defined", "whitespace"),
        ([], "user_defined", "at least one token"),
        (["<a>"], "special", "piece type 'special'"),
    ],
)
def test_bad_requests_are_clear_errors(neva_tokenizer: TokenizerExtension, tmp_path: Path, tokens: list[str],
                                       piece_type: str, message: str) -> None:
    with pytest.raises(NevaError, match=message.replace("(", r"\(")):
        extend_tokenizer(neva_tokenizer.tokenizer_model, tmp_path / "out", tokens, piece_type)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_clash_with_a_normal_piece_names_it(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    sp = processor(neva_fixtures.tokenizer_model)
    index = sp.encode("a red circle")[-1]
    piece = sp.id_to_piece(index)
    with pytest.raises(NevaError, match=f"already exists at id {index} as a NORMAL piece"):
        extend_tokenizer(neva_fixtures.tokenizer_model, tmp_path / "out", [piece])


def test_bad_source_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match="does not exist"):
        extend_tokenizer(tmp_path / "missing.model", tmp_path / "out")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(NevaError, match="garbage.model is not a sentencepiece model"):
        extend_tokenizer(garbage, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_from_another_request_is_rebuilt(neva_fixtures: Fixtures, neva_tokenizer: TokenizerExtension,
                                               tmp_path: Path) -> None:
    out = tmp_path / "extended"
    shutil.copytree(neva_tokenizer.out_dir, out)
    again = extend_tokenizer(neva_fixtures.tokenizer_model, out, ["<other>"])
    assert not again.reused and again.added == {"<other>": 384}
    assert json.loads((out / "extension.json").read_text())["request"]["tokens"] == ["<other>"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(NevaError, match="not an extended tokenizer"):
        extend_tokenizer(neva_fixtures.tokenizer_model, tmp_path / "mine")


@pytest.mark.parametrize(("options", "reason"), [
    ({"model_type": "unigram"}, "is a UNIGRAM model; only LLaMA-style models"),
    ({"model_type": "bpe", "normalization_rule_name": "nmt_nfkc"}, "normalises text with 'nmt_nfkc'"),
])
def test_models_without_matching_hf_files_are_extended_without_them(
    tmp_path: Path, options: dict[str, str], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "other.model"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_prefix=str(model.with_suffix("")), vocab_size=120,
        num_threads=1, minloglevel=2, **options,
    )
    result = extend_tokenizer(model, tmp_path / "out")
    old = processor(model).vocab_size()
    assert result.added == {token: old + i for i, token in enumerate(NEVA_SPECIAL_TOKENS)}
    assert processor(result.tokenizer_model).encode("hello <extra_id_3> world").count(old + 3) == 1
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["extension.json", "manifest.json", "tokenizer.model"]
    assert result.hf_files_refused is not None and reason in result.hf_files_refused
    assert "written without tokenizer.json/tokenizer_config.json" in result.hf_files_refused
    assert reason in caplog.text
    assert extend_tokenizer(model, tmp_path / "out").reused


def test_failure_while_writing_leaves_no_output(neva_fixtures: Fixtures, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import neva_core.tokenizer as tokenizer_module

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer_module, "write_hf_files", fail)
    with pytest.raises(OSError, match="disk full"):
        extend_tokenizer(neva_fixtures.tokenizer_model, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == [".out.lock"]  # no output, no temporary


def test_extension_records_the_roles_of_its_tokens(neva_fixtures: Fixtures, neva_tokenizer: TokenizerExtension,
                                                   tmp_path: Path) -> None:
    record = json.loads((neva_tokenizer.out_dir / "extension.json").read_text())
    assert record["roles"] == neva_tokenizer.roles == dict(NEVA_TOKEN_ROLES)
    sp = processor(neva_tokenizer.tokenizer_model)
    assert sp.piece_to_id(record["roles"]["image_patch"]) == 387  # 384 pieces, then <extra_id_0..7>
    # Only roles whose token the tokenizer has are recorded.
    fresh = extend_tokenizer(neva_fixtures.tokenizer_model, tmp_path / "fresh", ["<extra_id_3>", "<image>"])
    assert fresh.roles == {"image_patch": "<extra_id_3>"}
    more = extend_tokenizer(neva_tokenizer.tokenizer_model, tmp_path / "more", ["<image>"])
    assert more.roles == dict(NEVA_TOKEN_ROLES)


def test_cli_extend_prints_ids_then_nothing_changed(neva_fixtures: Fixtures, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "neva-tokenizer"
    assert cli.main(["tokenizer", "extend", "--in", str(neva_fixtures.tokenizer_model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "created token <extra_id_0> at id 384" in printed and "created token <extra_id_7> at id 391" in printed
    assert "vocab size: 384 -> 392" in printed

    assert cli.main(["tokenizer", "extend", "--in", str(out / "tokenizer.model"), "--out", str(tmp_path / "b")]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert cli.main(["tokenizer", "extend", "--in", str(neva_fixtures.tokenizer_model), "--out", str(out)]) == 0
    assert "nothing written" in capsys.readouterr().out

    args = ["tokenizer", "extend", "--in", str(neva_fixtures.tokenizer_model), "--out", str(tmp_path / "c")]
    assert cli.main([*args, "--tokens", "<s>"]) == 2
    assert "'<s>' already exists at id 1 as a CONTROL piece" in capsys.readouterr().err
    assert cli.main([*args, "--tokens", "<x>", "<y>", "--control"]) == 0
    assert sp_pb2.ModelProto.SentencePiece.Type.Name(
        load_model_proto(tmp_path / "c" / "tokenizer.model").pieces[385].type
    ) == "CONTROL"


def test_cli_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tokenizer", "extend", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--in", "--out", "--tokens", "--control", "32008"):
        assert option in help_text
