"""TextVQA accuracy as the official evaluator computes it (EvalAI / MMF `TextVQAAccuracyEvaluator`).

Every answer (predicted and annotated) is normalised as EvalAI's answer processor does: lower case, commas
and question marks dropped, punctuation removed or turned into spaces, periods removed unless a digit
follows, number words as digits, articles dropped, contractions restored. A prediction then scores the mean
over the 10 leave-one-out subsets of the annotators of min(1, matches / 3): 0, 0.3, 0.6, 0.9 or 1 for
0, 1, 2, 3 or 4+ matching annotators. (Megatron's own script skips the leave-one-out, which scores higher.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError
from neva_core.eval.predictions import expect_type, read_predictions

ANNOTATORS = 10

# EvalAI's tables (facebookresearch/mmf, mmf/utils/m4c_evaluators.py, EvalAIAnswerProcessor), as data.
NUMBER_WORDS = dict(zip(
    "none zero one two three four five six seven eight nine ten".split(),
    "0 0 1 2 3 4 5 6 7 8 9 10".split(),
))
ARTICLES = frozenset({"a", "an", "the"})
# Removed when written next to a space, otherwise replaced by a space ("tic-tac" -> "tic tac").
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# EvalAI passes re.UNICODE (32) where re.sub takes its count: only the first 32 periods are removed.
_PERIOD_LIMIT = 32
_PERIOD = re.compile(r"\.(?!\d)")
# Apostrophe-less spellings -> the spelling annotators' answers are compared in. Keys EvalAI writes with a
# capital letter ("Im", "Ive", "Id've") never match its lower-cased words; they are kept for fidelity.
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've|
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|
I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|
mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|
shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd|
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd|
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|
thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|
wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|
whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|
who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|
wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|
y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", "").split("|") if pair.strip()
)


def normalize_answer(answer: str) -> str:
    """An answer as EvalAI compares it: "The Two Dogs!" -> "2 dogs", "isnt it?" -> "isn't it"."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    return _digits_and_articles(text)


def _strip_punctuation(text: str) -> str:
    # EvalAI also removes every mark when a digit-comma-digit group is present, but the commas are gone by
    # now (the first step drops them), so that rule never fires.
    out = text
    for mark in PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def answer_accuracy(prediction: str, annotations: list[str]) -> float:
    """The official soft accuracy of one prediction against its 10 annotators' answers."""
    if len(annotations) != ANNOTATORS:
        raise NevaError(f"TextVQA scores against {ANNOTATORS} annotator answers, got {len(annotations)}")
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in annotations]
    if predicted not in answers:
        return 0.0
    total = 0.0
    for left_out in range(ANNOTATORS):
        matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == predicted)
        total += min(1, float(matches) / 3)
    return total / ANNOTATORS


def score_textvqa(pred_path: Path) -> dict[str, Any]:
    """`neva eval score --task textvqa`: accuracy (x100) over the first prediction of each sample_id."""
    predictions = read_predictions(pred_path, "textvqa")
    scores = []
    for record in predictions.records:
        sample_id = record["sample_id"]
        answer = expect_type(predictions.path, sample_id, "answer", record["answer"], str)
        annotations = expect_type(predictions.path, sample_id, "gt_answer", record["gt_answer"], list)
        if len(annotations) != ANNOTATORS or not all(isinstance(a, str) for a in annotations):
            raise NevaError(
                f"{predictions.path}: sample {sample_id!r} has gt_answer={annotations!r}; TextVQA needs the "
                f"{ANNOTATORS} annotator answers (strings) of TextVQA_0.5.1_val.json"
            )
        scores.append(answer_accuracy(answer, annotations))
    return {
        "task": "textvqa",
        "accuracy": 100 * sum(scores) / len(scores),
        "samples": len(scores),
        "duplicates_ignored": predictions.duplicates_ignored,
        "scorer": "EvalAI answer normalisation + mean over 10 leave-one-out subsets of min(1, matches/3)",
    }
