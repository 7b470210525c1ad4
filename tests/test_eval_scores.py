"""The scorers against the official ones: COCOEvalCap itself, and MMMU / EvalAI rules on hand-made cases."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from neva_core.errors import NevaError
from neva_core.eval import coco, mmmu, score, textvqa
from neva_core.eval.mmmu import eval_multi_choice, eval_open, parse_multi_choice_response, parse_open_response

# ----------------------------------------------------------------------------------------------------- COCO
COCO_GT = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}],
    "annotations": [
        {"image_id": 1, "id": 1, "caption": "A red circle on a grey background."},
        {"image_id": 1, "id": 2, "caption": "a red round shape"},
        {"image_id": 1, "id": 3, "caption": "A RED CIRCLE."},
        {"image_id": 2, "id": 4, "caption": "A blue square, drawn on grey."},
        {"image_id": 2, "id": 5, "caption": "a blue square"},
        {"image_id": 2, "id": 6, "caption": "blue box in the middle of the picture"},
        {"image_id": 3, "id": 7, "caption": "a green triangle"},
        {"image_id": 3, "id": 8, "caption": "A green triangle pointing up."},
        {"image_id": 4, "id": 9, "caption": "a yellow circle"},
    ],
}
# Image 4 has no prediction (not scored); the second line for image 1 is a duplicate (ignored).
COCO_PRED = [
    {"sample_id": 2, "caption": "A blue square..."},
    {"sample_id": 1, "caption": "A red circle."},
    {"sample_id": 1, "caption": "ignored duplicate"},
    {"sample_id": 3, "caption": "a green shape pointing up"},
]
# pycocoevalcap 1.2's COCOEvalCap on the files above (the value the test below recomputes).
COCO_CIDER = 360.480226516002


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cocoevalcap_reference(gt_path: Path, pred_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Megatron's evaluate_coco.py flow through COCOEvalCap.evaluate(), with METEOR and SPICE stubbed out
    (both need Java downloads); everything else is pycocoevalcap's and pycocotools' own code."""
    from pycocoevalcap import eval as cocoeval
    from pycocotools.coco import COCO

    class Skipped:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "skipped"

    monkeypatch.setattr(cocoeval, "Meteor", Skipped)
    monkeypatch.setattr(cocoeval, "Spice", Skipped)
    results: dict = {}
    for line in pred_path.read_text().splitlines():
        record = json.loads(line)
        results.setdefault(record["sample_id"], {"image_id": record["sample_id"],
                                                 "caption": record["caption"].rstrip(".").lower()})
    ground_truth = COCO(str(gt_path))
    result = ground_truth.loadRes(list(results.values()))
    evaluator = cocoeval.COCOEvalCap(ground_truth, result)
    evaluator.params["image_id"] = result.getImgIds()
    evaluator.evaluate()
    return {name: 100 * float(value) for name, value in evaluator.eval.items()}


@pytest.fixture(scope="module")
def coco_scores(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Ours and COCOEvalCap's scores of the same files (three JVM starts in all)."""
    folder = tmp_path_factory.mktemp("coco")
    gt_path = folder / "gt.json"
    gt_path.write_text(json.dumps(COCO_GT))
    pred_path = _write_jsonl(folder / "pred.jsonl", COCO_PRED)
    ours = coco.score_coco(pred_path, gt_path)
    with pytest.MonkeyPatch.context() as monkeypatch:
        theirs = _cocoevalcap_reference(gt_path, pred_path, monkeypatch)
    return ours, theirs


def test_coco_scores_equal_cocoevalcap(coco_scores: tuple[dict, dict]) -> None:
    ours, theirs = coco_scores
    assert ours["CIDEr"] == pytest.approx(theirs["CIDEr"], rel=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(theirs["ROUGE_L"], rel=1e-12)
    for n in range(1, 5):
        assert ours[f"BLEU-{n}"] == pytest.approx(theirs[f"Bleu_{n}"], rel=1e-12)


def test_coco_cider_pinned_on_known_set(coco_scores: tuple[dict, dict]) -> None:
    ours, _ = coco_scores
    assert ours["CIDEr"] == pytest.approx(COCO_CIDER, abs=1e-9)
    assert ours["images_scored"] == 3 and ours["duplicates_ignored"] == 1


def test_coco_caption_cleaning_is_megatrons() -> None:
    assert coco.clean_caption("A Red Circle...") == "a red circle"
    assert coco.clean_caption("A cat. On a mat.") == "a cat. on a mat"


def test_coco_without_java_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gt.json").write_text(json.dumps(COCO_GT))
    pred = _write_jsonl(tmp_path / "pred.jsonl", COCO_PRED[:1])
    monkeypatch.setattr(coco.shutil, "which", lambda name: None)
    with pytest.raises(NevaError, match="needs Java"):
        coco.score_coco(pred, tmp_path / "gt.json")


def test_coco_prediction_for_unknown_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "gt.json").write_text(json.dumps(COCO_GT))
    pred = _write_jsonl(tmp_path / "pred.jsonl", [{"sample_id": 99, "caption": "a dog"}])
    with pytest.raises(NevaError, match="99 is not an image id"):
        score("coco", pred, gt=tmp_path / "gt.json")


# ----------------------------------------------------------------------------------------------------- MMMU
CHOICES = ["A", "B", "C", "D"]
OPTIONS = {"A": "red circle", "B": "blue circle", "C": "green square", "D": "yellow triangle"}


def _never(choices: list[str]) -> str:
    raise AssertionError("no random fallback expected")


@pytest.mark.parametrize(("response", "expected"), [
    ("(B)", "B"),
    ("B", "B"),
    ("B.", "B"),                                  # edge punctuation stripped
    ("The answer is (C), not A", "C"),            # "(X)" beats a bare " A "
    ("(A) or rather (C)", "C"),                   # several marks: the last one wins
    ("I think A is wrong and D is right", "D"),   # bare letters: the last one wins
    ("The shape in the picture is a blue circle", "B"),             # > 5 words: option text
    ("It is not a red circle, it is a green square", "C"),          # option texts: the last one wins
    ("Answer: (D) yellow triangle", "D"),
])
def test_mmmu_multiple_choice_rules(response: str, expected: str) -> None:
    assert parse_multi_choice_response(response, CHOICES, OPTIONS, _never) == expected


@pytest.mark.parametrize("response", [
    "blue circle",      # option text, but only 2 words
    "ABC",              # no standalone letter
    "B.?",              # marks are stripped one after the other: "." is not at the end when its turn comes
    "B)",               # "X)" is Megatron's extension, not official
])
def test_mmmu_unparsable_answers_fall_back(response: str) -> None:
    drawn = []
    parse_multi_choice_response(response, CHOICES, OPTIONS, lambda c: drawn.append(c) or "A")
    assert drawn == [CHOICES]


def test_mmmu_megatron_variant_accepts_bare_paren() -> None:
    assert parse_multi_choice_response("B)", CHOICES, OPTIONS, _never, bare_paren=True) == "B"
    assert mmmu.extract_tagged_answer(r"so \boxed{C} it is") == "C"
    assert mmmu.extract_tagged_answer(r"\answer{A} \boxed{C}") == "A"


@pytest.mark.parametrize(("response", "expected"), [
    ("The answer is 3.14159.", [3.14]),                             # the shortest tail; floats rounded to 2
    ("so the total is 1,000 dollars", ["1,000 dollars", 1000.0, 0.0]),  # the simple regex also finds "000"
    ("x = 5\ny = 7", [7.0]),                                        # "=" counts in the last sentence only
    ("the value is 1.5e3", [1500.0, 1.0, 3.0]),
    ("Paris", ["paris"]),
])
def test_mmmu_open_answer_parsing(response: str, expected: list) -> None:
    assert sorted(parse_open_response(response), key=repr) == sorted(expected, key=repr)


def test_mmmu_open_and_choice_judging() -> None:
    assert eval_open("1000", parse_open_response("so the total is 1,000 dollars"))
    assert eval_open("3.14", parse_open_response("The answer is 3.14159."))
    assert not eval_open("5", parse_open_response("x = 5\ny = 7"))
    assert eval_open(["Paris", "paris, france"], parse_open_response("It is Paris"))
    assert not eval_open("c", parse_open_response("cat"))  # one-letter answers are padded: " c", "c "
    assert eval_multi_choice("B", "B") and eval_multi_choice(["A", "B"], "B") and not eval_multi_choice("A", "B")


MMMU_ANSWERS = {
    "validation_Art_1": {"question_type": "multiple-choice", "ground_truth": "B"},
    "validation_Art_2": {"question_type": "multiple-choice", "ground_truth": "A"},
    "validation_Art_3": {"question_type": "multiple-choice", "ground_truth": "C"},
    "validation_Math_1": {"question_type": "open", "ground_truth": "1000"},
    "validation_Math_2": {"question_type": "multiple-choice", "ground_truth": "A"},
    "validation_Math_3": {"question_type": "multiple-choice", "ground_truth": "B"},
}


def _mmmu_record(sample_id: str, prediction: str) -> dict:
    record = {"sample_id": sample_id, "prediction": prediction,
              "question_type": MMMU_ANSWERS[sample_id]["question_type"]}
    if record["question_type"] == "multiple-choice":
        record |= {"all_choices": CHOICES, "index2ans": OPTIONS}
    return record


MMMU_PREDICTIONS = [
    ("validation_Art_1", "(B)"),                   # correct
    ("validation_Art_2", "no idea"),               # fallback draw 0
    ("validation_Math_1", "so the total is 1,000 dollars"),   # correct
    ("validation_Art_3", r"\boxed{C}"),            # official: fallback draw 1; Megatron: C
    ("validation_Math_2", "B)"),                   # official: fallback draw 2; Megatron: B
    ("validation_Art_1", "(D)"),                   # duplicate: ignored
    ("validation_Math_3", "hmm"),                  # fallback draw 3
]
# random.seed(42); [random.choice("ABCD") for _ in range(4)] -> A, A, C, B, as in a fresh official process.
SEED_42_DRAWS = ["A", "A", "C", "B"]


@pytest.fixture()
def mmmu_files(tmp_path: Path) -> tuple[Path, Path]:
    answers = tmp_path / "answer_dict_val.json"
    answers.write_text(json.dumps(MMMU_ANSWERS))
    pred = _write_jsonl(tmp_path / "pred.jsonl", [_mmmu_record(i, p) for i, p in MMMU_PREDICTIONS])
    return pred, answers


def test_mmmu_official_score_and_fallback_order(mmmu_files: tuple[Path, Path]) -> None:
    result = score("mmmu", *mmmu_files[:1], answers=mmmu_files[1])
    draws = result["random_fallbacks"]["draws"]
    assert [d["sample_id"] for d in draws] == ["validation_Art_2", "validation_Art_3", "validation_Math_2",
                                               "validation_Math_3"]
    assert [d["choice"] for d in draws] == SEED_42_DRAWS
    # Art_1 right, Art_2 drew A (right), Art_3 drew A (wrong); Math_1 right, Math_2 drew C (wrong), Math_3 B (right)
    assert result["categories"]["Art"] == {"num": 3, "correct": 2, "accuracy": pytest.approx(200 / 3),
                                           "accuracy_reported": 66.7}
    assert result["categories"]["Math"]["correct"] == 2
    assert result["correct"] == 4 and result["samples"] == 6 and result["duplicates_ignored"] == 1
    assert result["accuracy"] == pytest.approx(400 / 6)
    assert set(result["domains"]) == {"Art and Design", "Science"}


def test_mmmu_fallbacks_follow_the_file_order(mmmu_files: tuple[Path, Path], tmp_path: Path) -> None:
    reordered = _write_jsonl(tmp_path / "reordered.jsonl",
                             [_mmmu_record(i, p) for i, p in reversed(MMMU_PREDICTIONS[:5])])
    draws = score("mmmu", reordered, answers=mmmu_files[1])["random_fallbacks"]["draws"]
    assert [(d["sample_id"], d["choice"]) for d in draws] == [
        ("validation_Math_2", "A"), ("validation_Art_3", "A"), ("validation_Art_2", "C")]


def test_mmmu_megatron_mode(mmmu_files: tuple[Path, Path]) -> None:
    result = score("mmmu", mmmu_files[0], answers=mmmu_files[1], mode="megatron")
    draws = result["random_fallbacks"]["draws"]
    assert [(d["sample_id"], d["choice"]) for d in draws] == [("validation_Art_2", "A"), ("validation_Math_3", "A")]
    # Art: 1, 2 (A), 3 (C) right; Math: 1 right, 2 (B) wrong, 3 (A) wrong
    assert (result["correct"], result["samples"]) == (4, 6)


def test_mmmu_rejects_mismatched_answers(mmmu_files: tuple[Path, Path], tmp_path: Path) -> None:
    pred = _write_jsonl(tmp_path / "bad.jsonl", [{**_mmmu_record("validation_Math_1", "5"),
                                                   "sample_id": "validation_Math_9"}])
    with pytest.raises(NevaError, match="not in"):
        score("mmmu", pred, answers=mmmu_files[1])


# -------------------------------------------------------------------------------------------------- TextVQA
@pytest.mark.parametrize(("raw", "normalised"), [
    ("Coca-Cola!", "coca cola"),          # punctuation inside a word becomes a space
    ("tic - tac", "tic tac"),             # next to a space it is removed
    ("Dr. Pepper", "dr pepper"),          # periods go, unless a digit follows
    ("3.50", "3.50"),
    ("1,000", "1000"),
    ("Two", "2"),                         # number words
    ("none", "0"),
    ("The Beatles", "beatles"),           # articles
    ("an apple a day", "apple day"),
    ("dont", "don't"),                    # contractions
    ("isnt it?", "isn't it"),
    ("the man's hat", "man 's hat"),
    ("Yes\n", "yes"),
])
def test_textvqa_normalisation(raw: str, normalised: str) -> None:
    assert textvqa.normalize_answer(raw) == normalised


def test_textvqa_only_the_first_32_periods_go() -> None:
    # EvalAI passes re.UNICODE (32) as re.sub's count
    assert textvqa.normalize_answer("a" + "." * 40) == "a" + "." * 8


@pytest.mark.parametrize(("matches", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_textvqa_leave_one_out_accuracy(matches: int, accuracy: float) -> None:
    annotations = ["Two"] * matches + ["three"] * (10 - matches)
    assert textvqa.answer_accuracy("2.", annotations) == pytest.approx(accuracy)


def test_textvqa_score_file(tmp_path: Path) -> None:
    pred = _write_jsonl(tmp_path / "pred.jsonl", [
        {"sample_id": 1, "answer": "Nokia", "gt_answer": ["nokia"] * 10},
        {"sample_id": 2, "answer": "the red one", "gt_answer": ["red one"] * 2 + ["red"] * 8},
        {"sample_id": 2, "answer": "red", "gt_answer": ["red"] * 10},   # duplicate: ignored
        {"sample_id": 3, "answer": "blue", "gt_answer": ["red"] * 10},
    ])
    result = score("textvqa", pred)
    assert result["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert result["samples"] == 3 and result["duplicates_ignored"] == 1


def test_textvqa_needs_ten_annotators(tmp_path: Path) -> None:
    pred = _write_jsonl(tmp_path / "pred.jsonl", [{"sample_id": 1, "answer": "a", "gt_answer": ["a"] * 3}])
    with pytest.raises(NevaError, match="10 annotator answers"):
        score("textvqa", pred)


def test_seed_42_draws_are_pythons() -> None:
    """The pinned draws above are what a fresh `random.seed(42)` process gives."""
    rng = random.Random(42)
    assert [rng.choice(CHOICES) for _ in SEED_42_DRAWS] == SEED_42_DRAWS
