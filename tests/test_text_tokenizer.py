"""The runtime tokenizer: sentencepiece and tokenizer.json folders, token roles, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece

from neva_core.data.templates import IGNORE_INDEX, build_generation_prompt, encode_conversation
from neva_core.data.text_tokenizer import HFTextTokenizer, SentencePieceTextTokenizer, load_text_tokenizer
from neva_core.errors import NevaError
from neva_core.fixtures.datasets import tokenizer_corpus
from neva_core.tokenizer import (
    EXTENSION_FILE,
    HF_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    MODEL_FILE,
    NEVA_TOKEN_ROLES,
    TokenizerExtension,
)

TEXTS = ["a red circle.\nDescribe the image concisely.", "  two  spaces", "USER: <extra_id_3> ok", ""]
QWEN_IMAGE = "<|image_pad|>"


def copy_folder(source: Path, dest: Path, *names: str) -> Path:
    dest.mkdir()
    for name in names:
        shutil.copyfile(source / name, dest / name)
    return dest


def test_sentencepiece_folder(neva_tokenizer: TokenizerExtension) -> None:
    tokenizer = load_text_tokenizer(neva_tokenizer.out_dir)
    assert isinstance(tokenizer, SentencePieceTextTokenizer)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(neva_tokenizer.tokenizer_model))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, neva_tokenizer.vocab_size)
    assert tokenizer.pad_id == reference.unk_id()  # LLaMA has no pad piece; LLaVA pads with unk
    assert {role: tokenizer.role_id(role) for role in NEVA_TOKEN_ROLES} == {
        role: neva_tokenizer.added[token] for role, token in NEVA_TOKEN_ROLES.items()}
    assert tokenizer.image_token_id == neva_tokenizer.added["<extra_id_3>"]
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(reference.encode(text))
        if text:  # the dummy prefix, spelled out (sentencepiece adds none to an empty text)
            assert tokenizer.encode_continuation(" " + text) == tokenizer.encode(text)
    assert tokenizer.adds_prefix_space


def test_roles_come_from_extension_json(neva_tokenizer: TokenizerExtension, tmp_path: Path) -> None:
    folder = copy_folder(neva_tokenizer.out_dir, tmp_path / "tok", MODEL_FILE, EXTENSION_FILE)
    record = json.loads((folder / EXTENSION_FILE).read_text())
    (folder / EXTENSION_FILE).write_text(json.dumps({**record, "roles": {"image_patch": "<extra_id_5>"}}))
    assert load_text_tokenizer(folder).image_token_id == neva_tokenizer.added["<extra_id_5>"]
    with pytest.raises(NevaError, match="token role 'bos' is not defined"):
        load_text_tokenizer(folder).role_id("bos")

    (folder / EXTENSION_FILE).write_text(json.dumps({**record, "roles": {"image_patch": "<image_patch>"}}))
    with pytest.raises(NevaError, match=rf"{folder} has no '<image_patch>', the image_patch token"):
        load_text_tokenizer(folder).image_token_id  # noqa: B018
    (folder / EXTENSION_FILE).write_text(json.dumps({**record, "roles": ["<extra_id_3>"]}))
    with pytest.raises(NevaError, match="\"roles\" must map role names to token strings"):
        load_text_tokenizer(folder)


def test_unextended_tokenizer_names_the_missing_token(neva_fixtures, tmp_path: Path) -> None:  # noqa: ANN001
    folder = tmp_path / "plain"
    folder.mkdir()
    shutil.copyfile(neva_fixtures.tokenizer_model, folder / MODEL_FILE)
    tokenizer = load_text_tokenizer(folder)
    assert tokenizer.encode("a red circle")  # text still works
    with pytest.raises(NevaError, match=r"has no '<extra_id_3>', the image_patch token; extend it"):
        encode_conversation("vicuna_v1", [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}],
                            tokenizer, 4)


def test_tokenizer_json_folder_of_a_sentencepiece_model(neva_tokenizer: TokenizerExtension, tmp_path: Path) -> None:
    """Without tokenizer.model the HF file is read: same ids, but no turn-by-turn prompts (dummy prefix)."""
    folder = copy_folder(neva_tokenizer.out_dir, tmp_path / "hf", HF_TOKENIZER_FILE, HF_CONFIG_FILE, EXTENSION_FILE)
    tokenizer = load_text_tokenizer(folder)
    assert isinstance(tokenizer, HFTextTokenizer)
    reference = load_text_tokenizer(neva_tokenizer.out_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, reference.vocab_size)
    assert tokenizer.image_token_id == reference.image_token_id
    for text in TEXTS[:2]:
        assert tokenizer.encode(text) == reference.encode(text)
    with pytest.raises(NevaError, match=rf"{folder / HF_TOKENIZER_FILE} adds a prefix space .* tokenizer.model"):
        tokenizer.encode_continuation(" red")


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2-style folder: byte-level BPE tokenizer.json, no BOS, EOS <|im_end|>, roles in extension.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_end|>", QWEN_IMAGE]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    folder = tmp_path_factory.mktemp("qwen-like")
    tokenizer.save(str(folder / HF_TOKENIZER_FILE))
    (folder / HF_CONFIG_FILE).write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                     "pad_token": "<|endoftext|>"}))
    (folder / EXTENSION_FILE).write_text(json.dumps({"roles": {"image_patch": QWEN_IMAGE}}))
    return folder


def test_byte_level_folder_without_bos(byte_level_dir: Path) -> None:
    tokenizer = load_text_tokenizer(byte_level_dir)
    assert tokenizer.bos_id is None and tokenizer.eos_id == tokenizer.token_id("<|im_end|>")
    assert tokenizer.pad_id == tokenizer.token_id("<|endoftext|>")
    assert tokenizer.image_token_id == tokenizer.token_id(QWEN_IMAGE) and not tokenizer.adds_prefix_space
    record = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    sample = encode_conversation("vicuna_v1", record, tokenizer, 3)
    assert sample.input_ids[0] != tokenizer.image_token_id and tokenizer.decode(sample.input_ids).startswith("A chat")
    trained = [label for label in sample.labels if label != IGNORE_INDEX]
    assert trained == tokenizer.encode(" red") + [tokenizer.eos_id]
    assert build_generation_prompt("plain", "", tokenizer, 3) == [tokenizer.image_token_id] * 3  # no BOS to add
    with pytest.raises(NevaError, match="has no token '<s>'"):
        tokenizer.token_id("<s>")


def test_missing_and_broken_folders(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match="holds no tokenizer"):
        load_text_tokenizer(tmp_path)
    (tmp_path / HF_TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(NevaError, match="is not a Hugging Face tokenizer file"):
        load_text_tokenizer(tmp_path)


def test_byte_level_chat_templates_reproduce_the_ids(byte_level_dir: Path) -> None:
    """Without a dummy prefix every template, plain included, renders to our ids through transformers."""
    from transformers import PreTrainedTokenizerFast

    from neva_core.data.templates import TEMPLATES, chat_template

    ours = load_text_tokenizer(byte_level_dir)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(byte_level_dir / HF_TOKENIZER_FILE), eos_token="<|im_end|>",
                                 split_special_tokens=False)
    record = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": "red"}]
    for template in TEMPLATES:
        text = hf.apply_chat_template(messages, chat_template=chat_template(template, ours), tokenize=False)
        assert hf(text.replace(QWEN_IMAGE, QWEN_IMAGE * 3)).input_ids == \
            encode_conversation(template, record, ours, 3).input_ids, template
