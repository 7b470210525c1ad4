"""Prompt templates: golden ids and masks from the literal reference prompts, on the fixture tokenizer and on
Mistral-7B's real sentencepiece model; mismatching samples skipped and counted; HF chat templates agree."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from neva_core.data.templates import (
    BAD_CONVERSATION,
    IGNORE_INDEX,
    SPECIAL_TOKEN_IN_TEXT,
    TEMPLATES,
    TOKENIZATION_MISMATCH,
    SampleMismatch,
    SkipCounter,
    build_generation_prompt,
    chat_template,
    encode_conversation,
)
from neva_core.data.text_tokenizer import TextTokenizer, load_text_tokenizer
from neva_core.errors import NevaError
from neva_core.tokenizer import EXTENSION_FILE, MODEL_FILE, TokenizerExtension, extend_tokenizer, load_model_proto

N = 5  # image tokens per image in these tests
# The reference system prompts, written out (LLaVA's conv_vicuna_v1, LLaVA/NeMo's conv_llava_llama_2).
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

IMAGE_MULTI_TURN = [
    {"from": "human", "value": "What colour is the shape?\n<image>"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And its shape?"},
    {"from": "gpt", "value": "A circle, drawn in the middle."},
]
TEXT_ONLY = [
    {"from": "human", "value": "How many sides does a triangle have?"},
    {"from": "gpt", "value": "three"},
]
CAPTION = [
    {"from": "human", "value": "Describe the image concisely.\n<image>"},
    {"from": "gpt", "value": "a red circle"},
]

# The literal reference prompts: <s>/</s> are BOS/EOS, <image> the image, [[...]] the trained spans.
GOLDEN = {
    ("plain", "caption"): "<s><image>[[a red circle\n]]",
    ("vicuna_v1", "image_multi_turn"):
        f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT:[[ red</s>]]"
        "USER: And its shape? ASSISTANT:[[ A circle, drawn in the middle.</s>]]",
    ("vicuna_v1", "text_only"):
        f"<s>{VICUNA_SYSTEM} USER: How many sides does a triangle have? ASSISTANT:[[ three</s>]]",
    ("llama_2", "image_multi_turn"):
        f"<s>[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat colour is the shape? [/INST][[ red </s>]]"
        "<s>[INST] And its shape? [/INST][[ A circle, drawn in the middle. </s>]]",
    ("llama_2", "text_only"):
        f"<s>[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\nHow many sides does a triangle have? [/INST][[ three </s>]]",
    ("mistral", "image_multi_turn"):
        "<s>[INST] <image>\nWhat colour is the shape? [/INST][[ red</s>]]"
        "[INST] And its shape? [/INST][[ A circle, drawn in the middle.</s>]]",
    ("mistral", "text_only"): "<s>[INST] How many sides does a triangle have? [/INST][[ three</s>]]",
}
RECORDS = {"image_multi_turn": IMAGE_MULTI_TURN, "text_only": TEXT_ONLY, "caption": CAPTION}
ANSWERS = {"image_multi_turn": ["red", "A circle, drawn in the middle."], "text_only": ["three"],
           "caption": ["a red circle\n"]}


def mistral_model() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def mistral_extended(tmp_path_factory: pytest.TempPathFactory) -> TokenizerExtension:
    """Mistral-7B v0.1's sentencepiece model (shipped by mistral-common), extended with NeVA's tokens."""
    return extend_tokenizer(mistral_model(), tmp_path_factory.mktemp("mistral") / "extended")


@pytest.fixture(scope="module", params=["fixture", "mistral"])
def tokenizer_dir(request: pytest.FixtureRequest, neva_tokenizer: TokenizerExtension,
                  mistral_extended: TokenizerExtension) -> Path:
    return neva_tokenizer.out_dir if request.param == "fixture" else mistral_extended.out_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> TextTokenizer:
    return load_text_tokenizer(tokenizer_dir)


def literal_ids(prompt: str, folder: Path, image_tokens: int = N) -> list[int]:
    """A literal prompt tokenised as the reference trainers do, with sentencepiece itself.

    The text is cut at <image>, <s> and </s> (LLaVA's tokenizer_image_token cuts at the image; its legacy
    tokenizer, Meta's chat code and mistral-common encode the text after BOS/EOS on its own); each chunk is
    encoded as a text of its own, the cuts become the image/BOS/EOS ids.
    """
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / MODEL_FILE))
    special = {"<image>": [processor.piece_to_id("<extra_id_3>")] * image_tokens,
               "<s>": [processor.bos_id()], "</s>": [processor.eos_id()]}
    ids: list[int] = []
    for chunk in re.split(r"(<image>|</s>|<s>)", prompt):
        ids += special[chunk] if chunk in special else processor.encode(chunk) if chunk else []
    return ids


def golden_ids_and_labels(marked: str, folder: Path) -> tuple[list[int], list[int]]:
    """The ids of the literal prompt and its labels: the tokens inside [[...]] trained, the rest ignored."""
    plain = marked.replace("[[", "").replace("]]", "")
    ids = literal_ids(plain, folder)
    labels = [IGNORE_INDEX] * len(ids)
    for match in re.finditer(r"\[\[(.*?)\]\]", marked, flags=re.S):
        before = marked[: match.start()].replace("[[", "").replace("]]", "")
        start = len(literal_ids(before, folder))
        end = len(literal_ids(before + match.group(1), folder))
        assert ids[:end] == literal_ids(before + match.group(1), folder)  # the span is a token boundary
        labels[start:end] = ids[start:end]
    return ids, labels


def trained_spans(labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


@pytest.mark.parametrize("template,record", sorted(GOLDEN))
def test_golden_ids_and_masks(template: str, record: str, tokenizer: TextTokenizer, tokenizer_dir: Path) -> None:
    expected_ids, expected_labels = golden_ids_and_labels(GOLDEN[template, record], tokenizer_dir)
    sample = encode_conversation(template, RECORDS[record], tokenizer, N, sample_id=record)
    assert sample.input_ids == expected_ids
    assert sample.labels == expected_labels
    assert sample.image_count == (record != "text_only")
    assert sample.input_ids.count(tokenizer.image_token_id) == N * sample.image_count
    # The trained spans are exactly the answers, each followed by EOS where the template trains it.
    spans = trained_spans(sample.labels)
    assert len(spans) == len(ANSWERS[record])
    for span, answer in zip(spans, ANSWERS[record]):
        if template == "plain":
            assert tokenizer.eos_id not in span and tokenizer.decode(span) == answer
        else:
            assert span[-1] == tokenizer.eos_id and tokenizer.eos_id not in span[:-1]
            assert tokenizer.decode(span[:-1]).strip() == answer


def test_real_tokenizer_quirks_are_pinned(mistral_extended: TokenizerExtension) -> None:
    """The tokens LLaVA's length arithmetic trips over, on the real model: '▁' after the image, and the
    answer's space merged into its first word."""
    tokenizer = load_text_tokenizer(mistral_extended.out_dir)
    sample = encode_conversation("vicuna_v1", IMAGE_MULTI_TURN, tokenizer, N)
    after_image = sample.input_ids.index(tokenizer.image_token_id) + N
    assert sample.input_ids[after_image: after_image + 3] == [28705, 13, 3195]  # '▁', '\n', 'What'
    first_answer = trained_spans(sample.labels)[0]
    assert first_answer == [2760, 2]  # '▁red', '</s>' (not '▁', 'red')
    second_user = sample.input_ids.index(2) + 1
    assert sample.input_ids[second_user: second_user + 3] == tokenizer.encode("USER:")  # '▁USER' after '</s>'


def test_mistral_matches_mistral_common(mistral_extended: TokenizerExtension) -> None:
    """Text-only mistral prompts equal the ids of Mistral's own v1 instruct tokenizer."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(str(mistral_model()))
    ours = load_text_tokenizer(mistral_extended.out_dir)
    q1, a1, q2, a2 = (turn["value"] for turn in [*TEXT_ONLY, *IMAGE_MULTI_TURN[2:]])
    history = [UserMessage(content=q1), AssistantMessage(content=a1), UserMessage(content=q2)]
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=history)).tokens
    sample = encode_conversation("mistral", [*TEXT_ONLY, *IMAGE_MULTI_TURN[2:]], ours, N)
    assert sample.input_ids[: len(expected)] == expected
    assert sample.input_ids[len(expected):] == ours.encode(a2) + [ours.eos_id]
    first = reference.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=q1)])).tokens
    assert build_generation_prompt("mistral", q1, ours, N, has_image=False) == first


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generation_prompt_is_the_trained_prefix(template: str, tokenizer: TextTokenizer) -> None:
    record = CAPTION if template == "plain" else IMAGE_MULTI_TURN[:2]
    sample = encode_conversation(template, record, tokenizer, N)
    prompt = build_generation_prompt(template, record[0]["value"], tokenizer, N)
    answer_start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert prompt == sample.input_ids[:answer_start]


@functools.cache
def hf_tokenizer(folder: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    # Special tokens typed by the chat template must be parsed, as an exported LLaVA tokenizer does.
    return AutoTokenizer.from_pretrained(folder, split_special_tokens=False)


def hf_messages(record: list[dict[str, str]]) -> list[dict]:
    messages = []
    for turn in record:
        text = turn["value"].replace("<image>", "")
        content = [{"type": "image"}, {"type": "text", "text": text}] if "<image>" in turn["value"] else \
            [{"type": "text", "text": text}]
        messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
    return messages


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_template_reproduces_the_ids(template: str, tokenizer: TextTokenizer, tokenizer_dir: Path) -> None:
    if template == "plain":  # the pretraining layout starts with the image: no text gives it with a dummy prefix
        with pytest.raises(NevaError, match="plain .* starts with the image"):
            chat_template(template, tokenizer)
        return
    hf = hf_tokenizer(tokenizer_dir)
    jinja = chat_template(template, tokenizer)
    image_token = tokenizer.role_token("image_patch")

    def hf_ids(messages: list[dict], generation: bool) -> list[int]:
        text = hf.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=generation)
        return hf(text.replace(image_token, image_token * N)).input_ids  # the processor's image expansion

    for record in (IMAGE_MULTI_TURN, TEXT_ONLY):
        assert hf_ids(hf_messages(record), False) == encode_conversation(template, record, tokenizer, N).input_ids
        question = hf_messages(record[:1])
        has_image = "<image>" in record[0]["value"]
        expected = build_generation_prompt(template, record[0]["value"], tokenizer, N, has_image=has_image)
        assert hf_ids(question, True) == expected


# ---------------------------------------------------------------------------------------------------------
# Skipped samples


@pytest.fixture(scope="module")
def boundary_tokenizer(neva_tokenizer: TokenizerExtension, tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    """The fixture tokenizer plus a user-defined piece ':▁Yes' that spans vicuna's mask boundary
    ('ASSISTANT:' | ' Yes...'): such a sample cannot be labelled exactly."""
    folder = tmp_path_factory.mktemp("boundary")
    proto = load_model_proto(neva_tokenizer.tokenizer_model)
    proto.pieces.add(piece=":\u2581Yes", score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    (folder / MODEL_FILE).write_bytes(proto.SerializeToString())
    shutil.copyfile(neva_tokenizer.out_dir / EXTENSION_FILE, folder / EXTENSION_FILE)
    return load_text_tokenizer(folder)


def yes_no_record(answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": answer}]


def test_mismatching_sample_is_skipped_and_counted(boundary_tokenizer: TextTokenizer) -> None:
    with pytest.raises(SampleMismatch) as caught:
        encode_conversation("vicuna_v1", yes_no_record("Yes, it is."), boundary_tokenizer, N, sample_id="000042")
    assert caught.value.sample_id == "000042" and caught.value.reason == TOKENIZATION_MISMATCH
    assert "000042" in str(caught.value) and "inside a token" in str(caught.value)

    counter = SkipCounter(max_fraction=0.5, min_seen=4)
    answers = ["No.", "Yes, it is.", "No, it is blue.", "It is red."]
    samples = [counter.encode("vicuna_v1", yes_no_record(a), boundary_tokenizer, N, sample_id=f"s{i}")
               for i, a in enumerate(answers)]
    assert [s is None for s in samples] == [False, True, False, False]
    assert (counter.seen, counter.skipped, counter.by_reason) == (4, 1, {TOKENIZATION_MISMATCH: 1})
    assert counter.examples[0].startswith("sample s1: tokenization_mismatch")
    # The same answer under a template whose boundary is elsewhere is fine.
    assert encode_conversation("mistral", yes_no_record("Yes, it is."), boundary_tokenizer, N).labels

    restored = SkipCounter(max_fraction=0.5, min_seen=4)
    restored.load_state_dict(json.loads(json.dumps(counter.state_dict())))
    assert restored.state_dict() == counter.state_dict()


def test_too_many_skips_fail_the_run(boundary_tokenizer: TextTokenizer) -> None:
    counter = SkipCounter(max_fraction=0.25, min_seen=3)
    counter.encode("vicuna_v1", yes_no_record("Yes."), boundary_tokenizer, N, sample_id="a")  # not yet judged
    counter.encode("vicuna_v1", yes_no_record("No."), boundary_tokenizer, N, sample_id="b")
    with pytest.raises(NevaError, match=r"2 of 3 samples .* more than the allowed 25.00%.*sample a"):
        counter.encode("vicuna_v1", yes_no_record("Yes!"), boundary_tokenizer, N, sample_id="c")
    small = SkipCounter(max_fraction=0.25, min_seen=1000)
    small.encode("vicuna_v1", yes_no_record("Yes."), boundary_tokenizer, N, sample_id="a")
    small.check()  # too few samples to judge mid-run
    with pytest.raises(NevaError, match="1 of 1 samples"):
        small.check(final=True)


def test_bad_records_are_skipped_with_a_reason(tokenizer: TextTokenizer) -> None:
    bad = {
        "image_token_text": [{"from": "human", "value": "Say <extra_id_3>"}, {"from": "gpt", "value": "ok"}],
        "two_images": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "ok"}],
        "gpt_image": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}],
        "not_alternating": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
        "no_answer": [{"from": "human", "value": "<image>\nhi"}],
    }
    for sample_id, record in bad.items():
        with pytest.raises(SampleMismatch) as caught:
            encode_conversation("vicuna_v1", record, tokenizer, N, sample_id=sample_id)
        expected = SPECIAL_TOKEN_IN_TEXT if sample_id == "image_token_text" else BAD_CONVERSATION
        assert (caught.value.sample_id, caught.value.reason) == (sample_id, expected)
    for record in (TEXT_ONLY, IMAGE_MULTI_TURN):  # pretraining takes one image and one caption
        with pytest.raises(SampleMismatch, match="plain"):
            encode_conversation("plain", record, tokenizer, N)
    # A leading gpt turn and a last unanswered human turn are dropped, as LLaVA does.
    padded = [{"from": "gpt", "value": "Hello!"}, *TEXT_ONLY, {"from": "human", "value": "Thanks"}]
    assert encode_conversation("vicuna_v1", padded, tokenizer, N) == encode_conversation("vicuna_v1", TEXT_ONLY,
                                                                                         tokenizer, N)


def test_configuration_errors(tokenizer: TextTokenizer) -> None:
    with pytest.raises(NevaError, match="unknown prompt template 'llava'"):
        encode_conversation("llava", TEXT_ONLY, tokenizer, N)
    with pytest.raises(NevaError, match="image_tokens must be at least 1"):
        encode_conversation("plain", CAPTION, tokenizer, 0)
    with pytest.raises(NevaError, match="max_fraction"):
        SkipCounter(max_fraction=2.0)
