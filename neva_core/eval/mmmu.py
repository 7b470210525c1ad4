"""MMMU accuracy by the official rules (MMMU-Benchmark/MMMU, mmmu/utils/eval_utils.py), written anew.

The official flow, as Megatron ran it for its published figure: each multiple-choice prediction is parsed
to a letter by `parse_multi_choice_response` in prediction-file order (first line per sample_id), then
`main_eval_only.py` parses open answers with `parse_open_response` and judges each sample with
`eval_multi_choice` / `eval_open`, grouped by subject (the id's middle part: validation_Art_Theory_3).

A multiple-choice answer that names no option is replaced by `random.choice(all_choices)` from a generator
seeded with 42 once, when the official module is imported. The draws therefore depend on how many fell back
before: the file order is the evaluation order, and every draw is reported.

`mode="megatron"` scores as Megatron's current evaluate_mmmu.py does instead: `\\answer{}` / `\\boxed{}`
contents first, "X)" accepted as an option mark, the first choice (not a random one) as the fallback, and
accuracies rounded to 4 decimals instead of 3 when reported.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError
from neva_core.eval.predictions import expect_type, read_predictions
from neva_core.io import read_json

MODES = ("official", "megatron")
RANDOM_SEED = 42
MULTIPLE_CHOICE = "multiple-choice"

# Subject -> domain, in the official order (mmmu/utils/data_utils.py: DOMAIN_CAT2SUB_CAT).
DOMAINS: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
SUBJECTS: tuple[str, ...] = tuple(sorted(s for subjects in DOMAINS.values() for s in subjects))

_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")
_TRIVIAL_TAILS = frozenset({":", ",", ".", "!", "?", ";", "'"})
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_SENTENCE_BREAK = re.compile(r"\.\s(?=[A-Z])|\n")
_TAGGED_ANSWER = (re.compile(r"\\answer\{(.*?)\}"), re.compile(r"\\boxed\{(.*?)\}"))


# ----------------------------------------------------------------------------------------- multiple choice
def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict[str, str],
                                fallback: Callable[[list[str]], str], *, bare_paren: bool = False) -> str:
    """The option letter a free-form answer names, by the official rules.

    1. "(B)" marks, else " B " standing alone; 2. if the answer has more than 5 words, the option texts it
    contains; 3. of several candidates the one that occurs last wins; 4. no candidate: `fallback(all_choices)`.
    `bare_paren` also accepts "B)" in step 1 (Megatron's variant).
    """
    for mark in _EDGE_MARKS:  # one mark after the other, as the official loop strips them
        response = response.strip(mark)
    response = f" {response} "
    candidates = [c for c in all_choices if f"({c})" in response or (bare_paren and f"{c})" in response)]
    if candidates:
        return _last_occurring(candidates, lambda c: response.rfind(f"({c})"))
    candidates = [c for c in all_choices if f" {c} " in response]
    if candidates:
        return _last_occurring(candidates, lambda c: response.rfind(f" {c} "))
    if len(response.split()) > 5:
        lowered = response.lower()
        candidates = [index for index, ans in index2ans.items() if ans.lower() in lowered]
        if candidates:
            return _last_occurring(candidates, lambda c: lowered.rfind(index2ans[c].lower()))
    return fallback(all_choices)


def _last_occurring(candidates: list[str], position: Callable[[str], int]) -> str:
    # max() keeps the first of equal positions, as the official numpy.argmax does
    return max(candidates, key=position) if len(candidates) > 1 else candidates[0]


def extract_tagged_answer(text: str) -> str:
    """Megatron's pre-parse: the contents of \\answer{...}, else of \\boxed{...}, else the text."""
    for pattern in _TAGGED_ANSWER:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return text.replace("Answer:", "Answer: ")


# ------------------------------------------------------------------------------------------------ open answers
def parse_open_response(response: str) -> list[str | float]:
    """The candidate answers (strings and numbers rounded to 2 decimals) an open answer may state."""
    key_responses = _key_subresponses(response)
    candidates = list(key_responses)
    for text in key_responses:
        candidates += extract_numbers(text)
    normalised: list[str | float] = []
    for text in candidates:
        normalised += normalize_str(text)
    return list(dict.fromkeys(normalised))


def _key_subresponses(response: str) -> list[str]:
    """Per sentence, the shortest tail after an indicator ("the answer is 5" -> "5"); "=" in the last one."""
    response = response.strip().strip(".").lower()
    sentences = _SENTENCE_BREAK.split(response)  # lower-cased already, so only newlines split (as officially)
    tails = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_TAILS:
            tails.append(shortest)
    return tails or [response]


def extract_numbers(text: str) -> list[str]:
    """Numbers with thousands commas, then in scientific notation, then plain ones, as the official regexes."""
    return (_NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text)
            + _NUMBER_SIMPLE.findall(text))


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[str | float]:
    """A number as a float rounded to 2 decimals; other text lower-cased (one letter padded: " x", "x ")."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


# -------------------------------------------------------------------------------------------------- judging
def eval_multi_choice(gold: str | list[str], pred: str) -> bool:
    return pred in gold if isinstance(gold, list) else gold == pred


def eval_open(gold: str | list[str], preds: list[str | float]) -> bool:
    """True if a string candidate contains a normalised gold string, or a number equals a gold number."""
    golds: list[str | float] = []
    for answer in gold if isinstance(gold, list) else [gold]:
        golds += normalize_str(answer)
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


# -------------------------------------------------------------------------------------------------- scoring
@dataclass
class _Tally:
    correct: int = 0
    total: int = 0

    def add(self, correct: bool) -> None:
        self.correct += int(correct)
        self.total += 1

    def report(self, decimals: int) -> dict[str, Any]:
        fraction = self.correct / self.total if self.total else 0.0
        return {"num": self.total, "correct": self.correct, "accuracy": 100 * fraction,
                "accuracy_reported": round(100 * round(fraction, decimals), 10)}


@dataclass
class _Fallbacks:
    mode: str
    rng: random.Random = field(default_factory=lambda: random.Random(RANDOM_SEED))
    draws: list[dict[str, Any]] = field(default_factory=list)
    current: Any = None

    def __call__(self, all_choices: list[str]) -> str:
        choice = self.rng.choice(all_choices) if self.mode == "official" else all_choices[0]
        self.draws.append({"sample_id": self.current, "draw": len(self.draws), "choice": choice})
        return choice


def subject_of(sample_id: str) -> str:
    """The subject of an MMMU id, as the official script splits it: validation_Art_Theory_3 -> Art_Theory."""
    return "_".join(sample_id.split("_")[1:-1])


def load_answers(path: Path) -> dict[str, dict[str, Any]]:
    """MMMU's answer_dict_*.json: {id: {"question_type": ..., "ground_truth": letter | answer(s)}}."""
    path = Path(path)
    answers = read_json(path, f"answer file {path} does not exist (MMMU's answer_dict_val.json)")
    if not isinstance(answers, dict) or not all(
        isinstance(v, dict) and {"question_type", "ground_truth"} <= v.keys() for v in answers.values()
    ):
        raise NevaError(f"{path} is not an MMMU answer dict: expected {{id: {{question_type, ground_truth}}}}")
    return answers


def score_mmmu(pred_path: Path, answers_path: Path, mode: str = "official") -> dict[str, Any]:
    """`neva eval score --task mmmu`: accuracy (x100) overall, per subject and per domain."""
    if mode not in MODES:
        raise NevaError(f"--mode must be one of {MODES}, got {mode!r}")
    predictions = read_predictions(pred_path, "mmmu")
    answers = load_answers(answers_path)
    fallbacks = _Fallbacks(mode)
    judged: dict[str, list[bool]] = {}
    for record in predictions.records:
        sample_id = str(record["sample_id"])
        gold = _gold_for(predictions.path, answers_path, answers, sample_id, record)
        prediction = expect_type(predictions.path, sample_id, "prediction", record["prediction"], str)
        if gold["question_type"] == MULTIPLE_CHOICE:
            fallbacks.current = sample_id
            letter = _parse_choice(predictions.path, record, prediction, mode, fallbacks)
            correct = eval_multi_choice(gold["ground_truth"], letter)
        else:
            correct = eval_open(gold["ground_truth"], parse_open_response(prediction))
        judged.setdefault(subject_of(sample_id), []).append(correct)
    return _report(mode, judged, fallbacks, predictions.duplicates_ignored)


def _gold_for(pred_path: Path, answers_path: Path, answers: dict[str, Any], sample_id: str,
              record: dict[str, Any]) -> dict[str, Any]:
    if sample_id not in answers:
        raise NevaError(f"{pred_path}: sample {sample_id!r} is not in {answers_path}; score with the answer file "
                        "of the split the predictions were made on")
    if subject_of(sample_id) not in SUBJECTS:
        # the official script would silently leave such a sample out of every figure
        raise NevaError(f"{pred_path}: sample {sample_id!r} names no MMMU subject ({', '.join(SUBJECTS)})")
    gold = answers[sample_id]
    if record["question_type"] != gold["question_type"]:
        raise NevaError(f"{pred_path}: sample {sample_id!r} is {record['question_type']!r} in the predictions but "
                        f"{gold['question_type']!r} in {answers_path}")
    return gold


def _parse_choice(path: Path, record: dict[str, Any], prediction: str, mode: str, fallbacks: _Fallbacks) -> str:
    sample_id = record["sample_id"]
    choices = expect_type(path, sample_id, "all_choices", record.get("all_choices"), list)
    index2ans = expect_type(path, sample_id, "index2ans", record.get("index2ans"), dict)
    if not choices:
        raise NevaError(f"{path}: sample {sample_id!r} is multiple-choice but its all_choices is empty")
    if mode == "megatron":
        prediction = extract_tagged_answer(prediction)
    return parse_multi_choice_response(prediction, choices, index2ans, fallbacks, bare_paren=mode == "megatron")


def _report(mode: str, judged: dict[str, list[bool]], fallbacks: _Fallbacks, duplicates: int) -> dict[str, Any]:
    decimals = 3 if mode == "official" else 4
    overall, subjects, domains = _Tally(), {}, {}
    for domain, members in DOMAINS.items():
        domain_tally = _Tally()
        for subject in members:
            if subject not in judged:
                continue
            tally = _Tally()
            for correct in judged[subject]:
                tally.add(correct)
                domain_tally.add(correct)
                overall.add(correct)
            subjects[subject] = tally.report(decimals)
        if domain_tally.total:
            domains[domain] = domain_tally.report(decimals)
    report = overall.report(decimals)
    return {
        "task": "mmmu",
        "mode": mode,
        "accuracy": report["accuracy"],
        "accuracy_reported": report["accuracy_reported"],
        "correct": overall.correct,
        "samples": overall.total,
        "duplicates_ignored": duplicates,
        "categories": subjects,
        "domains": domains,
        "random_fallbacks": {
            "count": len(fallbacks.draws),
            "rule": f"random.choice(all_choices), random.seed({RANDOM_SEED}) once" if mode == "official"
            else "the first choice",
            "order": "prediction-file order, first line per sample_id",
            "draws": fallbacks.draws,
        },
    }
