"""Prompt templates: a record's conversation -> input ids and labels, with the reference trainers' masks.

One small builder per template lays a conversation out as segments: text that is trained or not, and
token ids (BOS, EOS, the image's n copies of the image token). Ids are then built turn by turn
(prismatic-style: each run of text with one label state tokenised on its own) and checked against the
tokenisation of the whole prompt. Where they differ, a mask boundary falls inside a token and the
labels cannot be exact: the sample raises `SampleMismatch` and is skipped and counted (`SkipCounter`),
never trained silently at loss 0 as LLaVA's `tokenization mismatch` rows are.

The layouts, as text (`<s>`/`</s>` are the BOS/EOS ids, `<image>` the n image tokens; [trained]):

    plain      <s><image>[{caption}\n]                                           (LLaVA pretraining)
    vicuna_v1  <s>{SYSTEM} USER: <image>\n{q1} ASSISTANT:[ {a1}</s>]USER: {q2} ASSISTANT:[ {a2}</s>]
    llama_2    <s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n<image>\n{q1} [/INST][ {a1} </s>]<s>[INST] {q2} [/INST][ {a2} </s>]
    mistral    <s>[INST] <image>\n{q1} [/INST][ {a1}</s>][INST] {q2} [/INST][ {a2}</s>]

Tokenisation rule: text at the start or after any special id (BOS, EOS, the image) is tokenised as a
new text, with sentencepiece's dummy prefix space: LLaVA's `tokenizer_image_token` encodes each chunk
around the image so, as do its legacy tokenizer after `</s>`, Meta's Llama-2 chat code per round and
mistral-common per message; Hugging Face fast LLaMA tokenizers do the same after BOS/EOS. So the ids after
an image start with '▁' (LLaVA's 29871) and, in vicuna_v1, a later round starts '▁USER' (LLaVA-1.5's
non-legacy tokenizer writes 'USER'). `<image>` is moved to the front of its turn followed by a newline,
as LLaVA's `preprocess_multimodal` does. mistral is Mistral-Instruct's own layout (the ids of
mistral-common's v1 tokenizer). llama_2 is NeMo NeVA's layout, except that it starts with BOS (NeMo's
`lstrip` of the separator drops it) and `[INST]` after a later BOS is '▁[INST]' as in Meta's chat code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neva_core.data.records import GPT, HUMAN, IMAGE_TAG
from neva_core.data.text_tokenizer import TextTokenizer
from neva_core.errors import NevaError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# SampleMismatch reasons.
TOKENIZATION_MISMATCH = "tokenization_mismatch"
BAD_CONVERSATION = "bad_conversation"
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"


class SampleMismatch(NevaError):
    """A sample whose ids and labels cannot be built exactly; the loader skips and counts it."""

    def __init__(self, sample_id: str | None, reason: str, detail: str) -> None:
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"sample {sample_id or '<unnamed>'}: {reason}: {detail}")


class _BadConversation(ValueError):
    """A conversation the templates cannot lay out; becomes SampleMismatch(BAD_CONVERSATION)."""


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    image_count: int


# ---------------------------------------------------------------------------------------------------------
# Segments


@dataclass(frozen=True)
class Text:
    text: str
    trained: bool = False


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]
    trained: bool = False


Segment = Text | Tokens


@dataclass(frozen=True)
class Round:
    question: str
    answer: str | None  # None: the generation prompt, which ends where the answer starts
    has_image: bool = False


@dataclass(frozen=True)
class _Context:
    tokenizer: TextTokenizer
    image_tokens: int
    template: str

    @property
    def bos(self) -> list[Tokens]:
        bos_id = self.tokenizer.bos_id
        return [] if bos_id is None else [Tokens((bos_id,))]

    @property
    def eos(self) -> Tokens:
        if self.tokenizer.eos_id is None:
            raise NevaError(
                f"template {self.template!r} ends each answer with EOS, but the tokenizer in "
                f"{self.tokenizer.folder} has none; choose a template that fits the model"
            )
        return Tokens((self.tokenizer.eos_id,), trained=True)

    def image(self) -> Tokens:
        return Tokens((self.tokenizer.image_token_id,) * self.image_tokens)

    def human(self, turn: Round) -> list[Segment]:
        if not turn.has_image:
            return [Text(turn.question)]
        return [self.image(), Text("\n" + turn.question)]


# ---------------------------------------------------------------------------------------------------------
# One builder per template


def _plain(rounds: Sequence[Round], ctx: _Context) -> list[Segment]:
    if len(rounds) != 1 or not rounds[0].has_image:
        raise _BadConversation("plain (pretraining) needs one human turn with <image> and one answer")
    segments: list[Segment] = [*ctx.bos, ctx.image()]
    if rounds[0].answer is not None:
        segments.append(Text(rounds[0].answer + "\n", trained=True))
    return segments


def _vicuna_v1(rounds: Sequence[Round], ctx: _Context) -> list[Segment]:
    segments: list[Segment] = [*ctx.bos, Text(VICUNA_SYSTEM + " ")]
    for turn in rounds:
        segments += [Text("USER: "), *ctx.human(turn), Text(" ASSISTANT:")]
        if turn.answer is not None:
            segments += [Text(" " + turn.answer, trained=True), ctx.eos]
    return segments


def _llama_2(rounds: Sequence[Round], ctx: _Context) -> list[Segment]:
    segments: list[Segment] = []
    for position, turn in enumerate(rounds):
        system = f"<<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n" if position == 0 else ""
        segments += [*ctx.bos, Text("[INST] " + system), *ctx.human(turn), Text(" [/INST]")]
        if turn.answer is not None:
            segments += [Text(" " + turn.answer + " ", trained=True), ctx.eos]
    return segments


def _mistral(rounds: Sequence[Round], ctx: _Context) -> list[Segment]:
    segments: list[Segment] = [*ctx.bos]
    for position, turn in enumerate(rounds):
        segments += [Text("[INST] "), *ctx.human(turn), Text(" [/INST]")]
        if turn.answer is not None:
            segments += [Text(" " + turn.answer, trained=True), ctx.eos]
    return segments


TEMPLATES: Mapping[str, Callable[[Sequence[Round], _Context], list[Segment]]] = {
    "plain": _plain,
    "vicuna_v1": _vicuna_v1,
    "llama_2": _llama_2,
    "mistral": _mistral,
}


def _builder(template: str) -> Callable[[Sequence[Round], _Context], list[Segment]]:
    if template not in TEMPLATES:
        raise NevaError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


# ---------------------------------------------------------------------------------------------------------
# Conversations -> rounds


def parse_rounds(conversations: Any) -> list[Round]:
    """LLaVA turns ({"from": "human"/"gpt", "value": ...}) as question/answer rounds.

    A leading gpt turn is dropped (as LLaVA does), so is a last human turn without an answer (it trains
    nothing). `<image>` may appear once, in a human turn; it is moved to the front of the turn.
    Raises _BadConversation (a ValueError) otherwise.
    """
    if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
        raise _BadConversation("conversations must be a list of {from, value} objects")
    turns = list(conversations)
    if turns and turns[0].get("from") == GPT:
        turns = turns[1:]
    if len(turns) % 2:
        turns = turns[:-1]
    if not turns:
        raise _BadConversation("no human turn followed by a gpt answer")
    rounds, images = [], 0
    for position in range(0, len(turns), 2):
        human, gpt = turns[position], turns[position + 1]
        if human.get("from") != HUMAN or gpt.get("from") != GPT:
            raise _BadConversation(f"turns {position} and {position + 1} are not a human turn and a gpt answer")
        question, answer = human.get("value"), gpt.get("value")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise _BadConversation(f"turn {position} or {position + 1} has no string value")
        if IMAGE_TAG in answer:
            raise _BadConversation(f"the gpt turn {position + 1} contains {IMAGE_TAG}")
        tags = question.count(IMAGE_TAG)
        images += tags
        if images > 1:
            raise _BadConversation(f"more than one {IMAGE_TAG}: one image per sample is supported")
        if tags:
            question = question.replace(IMAGE_TAG, "").strip()
        rounds.append(Round(question, answer, has_image=bool(tags)))
    return rounds


# ---------------------------------------------------------------------------------------------------------
# Segments -> ids


def _merge(segments: Sequence[Segment], *, by_label: bool) -> list[Segment]:
    """Join adjacent texts: those with the same label state (by_label) or all of them (the whole prompt)."""
    merged: list[Segment] = []
    for segment in segments:
        last = merged[-1] if merged else None
        if (isinstance(segment, Text) and isinstance(last, Text)
                and (not by_label or last.trained == segment.trained)):
            merged[-1] = Text(last.text + segment.text, last.trained)
        else:
            merged.append(segment)
    return merged


def _tokenise(segments: Sequence[Segment], tokenizer: TextTokenizer) -> list[list[int]]:
    """The ids of each segment; text at the start or after special ids is tokenised as a new text."""
    pieces: list[list[int]] = []
    previous: Segment | None = None
    for segment in segments:
        if isinstance(segment, Tokens):
            pieces.append(list(segment.ids))
        elif previous is None or isinstance(previous, Tokens):
            pieces.append(tokenizer.encode(segment.text))
        else:
            pieces.append(tokenizer.encode_continuation(segment.text))
        previous = segment
    return pieces


def _check_text_ids(segments: Sequence[Segment], pieces: Sequence[list[int]], tokenizer: TextTokenizer,
                    sample_id: str | None) -> None:
    """Text must not produce the image, BOS or EOS ids (a literal `<extra_id_3>` in a caption would)."""
    reserved = {tokenizer.image_token_id, tokenizer.bos_id, tokenizer.eos_id} - {None}
    for segment, ids in zip(segments, pieces):
        if isinstance(segment, Text) and reserved.intersection(ids):
            found = sorted(reserved.intersection(ids))
            raise SampleMismatch(sample_id, SPECIAL_TOKEN_IN_TEXT,
                                 f"the text {segment.text[:80]!r} tokenises to the reserved id(s) {found}")


def _mismatch_detail(turn_ids: list[int], whole_ids: list[int], tokenizer: TextTokenizer) -> str:
    at = next((i for i, (a, b) in enumerate(zip(turn_ids, whole_ids)) if a != b), min(len(turn_ids), len(whole_ids)))
    context = tokenizer.decode(whole_ids[max(0, at - 8): at + 8])
    return (f"turn-by-turn ids ({len(turn_ids)}) differ from the whole prompt's ({len(whole_ids)}) at position "
            f"{at}, near {context!r}: a label boundary falls inside a token")


def _encode_segments(segments: Sequence[Segment], tokenizer: TextTokenizer,
                     sample_id: str | None) -> tuple[list[int], list[int]]:
    turns = _merge(segments, by_label=True)
    pieces = _tokenise(turns, tokenizer)
    _check_text_ids(turns, pieces, tokenizer, sample_id)
    input_ids = [i for ids in pieces for i in ids]
    whole_ids = [i for ids in _tokenise(_merge(segments, by_label=False), tokenizer) for i in ids]
    if input_ids != whole_ids:
        raise SampleMismatch(sample_id, TOKENIZATION_MISMATCH, _mismatch_detail(input_ids, whole_ids, tokenizer))
    labels = [i if segment.trained else IGNORE_INDEX for segment, ids in zip(turns, pieces) for i in ids]
    return input_ids, labels


def _context(template: str, tokenizer: TextTokenizer, image_tokens: int) -> _Context:
    if image_tokens < 1:
        raise NevaError(f"image_tokens must be at least 1 (the image's patch count), got {image_tokens}")
    return _Context(tokenizer, image_tokens, template)


def encode_conversation(template: str, conversations: list[dict[str, Any]], tokenizer: TextTokenizer,
                        image_tokens: int, *, sample_id: str | None = None) -> EncodedSample:
    """input_ids and labels (IGNORE_INDEX where not trained) of one record under `template`.

    Raises SampleMismatch (skip the sample) for a malformed conversation or when the turn-by-turn ids
    disagree with the whole prompt's tokenisation; NevaError for a template that does not fit the tokenizer.
    """
    builder, ctx = _builder(template), _context(template, tokenizer, image_tokens)
    try:
        rounds = parse_rounds(conversations)
        segments = builder(rounds, ctx)
    except _BadConversation as exc:
        raise SampleMismatch(sample_id, BAD_CONVERSATION, str(exc)) from None
    input_ids, labels = _encode_segments(segments, tokenizer, sample_id)
    return EncodedSample(input_ids, labels, image_count=sum(r.has_image for r in rounds))


def build_generation_prompt(template: str, question: str, tokenizer: TextTokenizer, image_tokens: int,
                            *, has_image: bool = True) -> list[int]:
    """The prompt ids a model trained with `template` sees, ending where its answer starts."""
    builder, ctx = _builder(template), _context(template, tokenizer, image_tokens)
    question = question.replace(IMAGE_TAG, "").strip() if has_image else question
    try:
        segments = builder([Round(question, None, has_image=has_image)], ctx)
    except _BadConversation as exc:
        raise NevaError(f"template {template!r} cannot build this prompt: {exc}") from None
    input_ids, _ = _encode_segments(segments, tokenizer, sample_id="generation prompt")
    return input_ids


# ---------------------------------------------------------------------------------------------------------
# Skipped samples


@dataclass
class SkipCounter:
    """Counts samples skipped for SampleMismatch and fails the run when too large a share is skipped.

    `check()` raises once at least `min_seen` samples were seen and more than `max_fraction` of them were
    skipped; `check(final=True)` (end of a run or epoch) applies the fraction whatever the count. The
    state is plain JSON (`state_dict`), so it can be saved with the loader's per-rank state.
    """

    max_fraction: float = 0.001
    min_seen: int = 1000
    seen: int = 0
    skipped: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # the first few "id: reason: detail"
    max_examples: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0:
            raise NevaError(f"max_fraction must be between 0 and 1, got {self.max_fraction}")

    def accept(self) -> None:
        self.seen += 1

    def skip(self, error: SampleMismatch) -> None:
        self.seen += 1
        self.skipped += 1
        self.by_reason[error.reason] = self.by_reason.get(error.reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))
        log.warning("skipped %s", error)
        self.check()

    def encode(self, template: str, conversations: list[dict[str, Any]], tokenizer: TextTokenizer,
               image_tokens: int, *, sample_id: str | None = None) -> EncodedSample | None:
        """encode_conversation, counting the sample as accepted, or skipped (None) on SampleMismatch."""
        try:
            sample = encode_conversation(template, conversations, tokenizer, image_tokens, sample_id=sample_id)
        except SampleMismatch as error:
            self.skip(error)
            return None
        self.accept()
        return sample

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def check(self, *, final: bool = False) -> None:
        if (final or self.seen >= self.min_seen) and self.fraction > self.max_fraction:
            raise NevaError(
                f"{self.skipped} of {self.seen} samples ({self.fraction:.2%}) could not be tokenised exactly, "
                f"more than the allowed {self.max_fraction:.2%}; by reason: {self.by_reason}; first: "
                f"{'; '.join(self.examples[:5])}. Check that the template fits the tokenizer and the data."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "by_reason": dict(self.by_reason),
                "examples": list(self.examples)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen, self.skipped = int(state["seen"]), int(state["skipped"])
        self.by_reason, self.examples = dict(state["by_reason"]), list(state["examples"])


# ---------------------------------------------------------------------------------------------------------
# Hugging Face chat templates


def _literal(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja_turns(user: str, assistant: str, generation: str) -> str:
    """A chat template: each message's text and image are read into `ns`, then `user`/`assistant` render it."""
    read = (
        "{%- set ns = namespace(text='', image=false) -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set ns.image = true -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    return (
        "{%- for message in messages -%}" + read
        + "{%- if message['role'] == 'user' -%}" + user
        + "{%- elif message['role'] == 'assistant' -%}" + assistant
        + "{%- else -%}{{ raise_exception('only user and assistant messages are supported') }}{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}" + generation + "{%- endif -%}"
    )


def chat_template(template: str, tokenizer: TextTokenizer) -> str:
    """The Jinja chat template that renders `template`'s prompt for a Hugging Face tokenizer and processor.

    The tokenizer adds the first BOS; BOS/EOS later on are written as `bos_token`/`eos_token` (a tokenizer
    that parses special tokens in text starts a new text after them, as our ids do). The image is written
    once as the image token (the processor repeats it n times); the text after it gets an explicit space
    for a sentencepiece-style tokenizer, standing for the dummy prefix our ids have there.
    """
    _builder(template)
    image = _literal(tokenizer.role_token("image_patch"))
    space = _literal(" " if tokenizer.adds_prefix_space else "")
    question = ("{%- if ns.image -%}{{ " + image + " + " + space + " + '\\n' + (ns.text | trim) }}"
                "{%- else -%}{{ ns.text }}{%- endif -%}")
    first = "loop.index0 == 0"
    if template == "plain":
        if tokenizer.adds_prefix_space:
            raise NevaError(
                f"the plain (pretraining) prompt starts with the image, which the Hugging Face form of the "
                f"sentencepiece tokenizer in {tokenizer.folder} cannot produce from text (it puts its dummy space "
                "first); export a model finetuned with vicuna_v1, llama_2 or mistral for chat use"
            )
        return _jinja_turns(user="{%- if ns.image -%}{{ " + image + " }}{%- endif -%}",
                            assistant="{{ " + space + " + ns.text + '\\n' }}", generation="")
    if template == "vicuna_v1":
        return _jinja_turns(
            user="{%- if " + first + " -%}{{ " + _literal(VICUNA_SYSTEM + " ") + " }}{%- endif -%}"
                 "{{ 'USER: ' }}" + question + "{{ ' ' }}",
            assistant="{{ 'ASSISTANT: ' + ns.text + eos_token }}",
            generation="{{ 'ASSISTANT:' }}",
        )
    if template == "llama_2":
        system = _literal(f"<<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n")
        return _jinja_turns(
            user="{%- if " + first + " -%}{{ '[INST] ' + " + system + " }}"
                 "{%- else -%}{{ bos_token + '[INST] ' }}{%- endif -%}" + question + "{{ ' [/INST]' }}",
            assistant="{{ ' ' + ns.text + ' ' + eos_token }}",
            generation="",
        )
    return _jinja_turns(  # mistral
        user="{{ '[INST] ' }}" + question + "{{ ' [/INST]' }}",
        assistant="{{ ' ' + ns.text + eos_token }}",
        generation="",
    )
