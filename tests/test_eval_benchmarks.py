"""Benchmark readers over the offline fixtures of each public layout, Megatron's prompts, and `neva eval`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from neva_core.cli import main
from neva_core.errors import NevaError
from neva_core.eval.benchmarks import read_benchmark, read_coco, read_mmmu, read_textvqa, scoring_references, \
    write_mmmu_answers
from neva_core.eval.fixtures import make_eval_fixtures
from neva_core.eval.predictions import prediction_record
from neva_core.eval.prompts import PROMPTS, mmmu_question, process_image_tag, user_prompt

SAMPLES = 8


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_eval_fixtures(tmp_path_factory.mktemp("eval-fixtures"), seed=0, samples=SAMPLES)


def _pixels(samples) -> list[tuple]:
    return [(s.sample_id, s.images[0].tobytes()) for s in samples]


def test_coco_reader_zip_and_folder_agree(bench: dict[str, Path], tmp_path: Path) -> None:
    from_zip = list(read_coco(bench["coco_gt"], bench["coco_images"]))
    gt = json.loads(bench["coco_gt"].read_text())
    assert [s.sample_id for s in from_zip] == [image["id"] for image in gt["images"]]
    assert all(len(s.references) == 5 and s.question == "" for s in from_zip)
    with zipfile.ZipFile(bench["coco_images"]) as archive:
        archive.extractall(tmp_path)  # val2014/COCO_val2014_<id>.jpg, as the public zip unpacks
    assert _pixels(read_coco(bench["coco_gt"], tmp_path)) == _pixels(from_zip)


def test_coco_reader_names_a_missing_image(bench: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"COCO_val2014_000000000391\.jpg is not in"):
        next(read_coco(bench["coco_gt"], tmp_path))


def test_mmmu_parquet_and_save_to_disk_layouts_agree(bench: dict[str, Path], tmp_path: Path) -> None:
    disk = make_eval_fixtures(tmp_path, seed=0, samples=SAMPLES, mmmu_layout="disk")
    assert (disk["mmmu"] / "dataset_dict.json").is_file()
    from_parquet = list(read_mmmu(bench["mmmu"]))
    assert len(from_parquet) == SAMPLES
    assert _pixels(read_mmmu(disk["mmmu"])) == _pixels(from_parquet)
    assert write_mmmu_answers(bench["mmmu"]) == json.loads(bench["mmmu_answers"].read_text())


def test_mmmu_prompt_and_images_as_megatron_builds_them(bench: dict[str, Path]) -> None:
    samples = {s.sample_id: s for s in read_mmmu(bench["mmmu"])}
    first = samples["validation_Art_1"]
    options = first.metadata["index2ans"]
    assert first.question == (
        "What colour is the shape in the image?\n"
        + "".join(f"({letter}) {text}\n" for letter, text in options.items())
        + "\nAnswer with the option's letter from the given choices directly."
    )
    assert first.metadata["all_choices"] == ["A", "B", "C", "D"] and first.references[0] in options
    two_images = samples["validation_Art_3"]
    assert len(two_images.images) == 1 and two_images.metadata["image_count"] == 2  # image_1 only
    assert two_images.question.startswith("The image and  show two shapes.")
    assert samples["validation_Art_2"].question == (
        "What colour is the shape?\nAnswer the question using a single word or phrase.")


@pytest.mark.parametrize(("text", "expected"), [
    ("<image 1>", "Answer the question in the image."),
    ("Look at this:<image 1>", "Look at this in the image."),
    ("See the plot. <image 1> Which curve rises?", "See the plot. Which curve rises?"),
    ("<image 1> Which curve rises?", "Which curve rises?"),
    ("<image 1> shows a curve.", "The image shows a curve."),
    ("What does <image 1> show?", "What does the image show?"),
    ("Which one?\n<image 1>", "Which one?"),
    ("Compare (<image 1>) with <image 2>", "Compare  with "),
])
def test_mmmu_image_tag_rewrites(text: str, expected: str) -> None:
    assert process_image_tag(text) == expected


def test_mmmu_open_question_and_bad_options() -> None:
    text, metadata = mmmu_question({"question": " How many? ", "question_type": "open", "options": "[]"})
    assert text == "How many?\nAnswer the question using a single word or phrase." and metadata == {
        "question_type": "open"}
    with pytest.raises(NevaError, match="not a list"):
        mmmu_question({"id": "x", "question": "q", "question_type": "multiple-choice", "options": "[oops"})


def test_textvqa_reader(bench: dict[str, Path]) -> None:
    samples = list(read_textvqa(bench["textvqa_json"], bench["textvqa_images"]))
    assert len(samples) == SAMPLES and all(len(s.references) == 10 for s in samples)
    assert samples[0].question == "What colour is the shape?" and samples[0].images[0].size == (64, 64)


def test_megatron_prompts() -> None:
    assert user_prompt("textvqa", "What is written?") == (
        "<image>\nWhat is written?\nAnswer the question using a single word, phrase, or number.")
    assert user_prompt("coco") == "<image>\nGive a brief description of this image in one sentence."
    assert PROMPTS["mmmu"].system == "Answer the questions."


def _score_cli(capsys: pytest.CaptureFixture, *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "score", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_score_cli_on_reference_answers(bench: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """Predictions that repeat the references score 100 through `neva eval score`, for every task."""
    def write(name: str, records: list[dict]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    coco = write("coco.jsonl", [prediction_record("coco", s.sample_id, s.references[0])
                                for s in read_coco(bench["coco_gt"], bench["coco_images"])])
    mmmu = write("mmmu.jsonl", [prediction_record("mmmu", s.sample_id, f"({s.references[0]})"
                                                  if s.metadata["question_type"] == "multiple-choice"
                                                  else s.references[0], metadata=s.metadata)
                                for s in read_mmmu(bench["mmmu"])])
    textvqa = write("textvqa.jsonl", [prediction_record("textvqa", s.sample_id, s.references[0],
                                                        references=s.references)
                                      for s in read_textvqa(bench["textvqa_json"], bench["textvqa_images"])])
    coco_scores = _score_cli(capsys, "--task", "coco", "--pred", coco, "--gt", str(bench["coco_gt"]))
    assert coco_scores["images_scored"] == SAMPLES and coco_scores["CIDEr"] > 100
    mmmu_scores = _score_cli(capsys, "--task", "mmmu", "--pred", mmmu, "--answers", str(bench["mmmu_answers"]))
    assert mmmu_scores["accuracy"] == 100 and mmmu_scores["random_fallbacks"]["count"] == 0
    assert set(mmmu_scores["categories"]) == {"Art", "Math"}
    assert _score_cli(capsys, "--task", "textvqa", "--pred", textvqa)["accuracy"] == pytest.approx(100)


def test_eval_score_cli_error_is_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "score", "--task", "mmmu", "--pred", str(tmp_path / "none.jsonl")]) == 2
    assert "needs --answers" in capsys.readouterr().err


def test_eval_fixtures_are_reused(bench: dict[str, Path]) -> None:
    stamp = bench["coco_gt"].stat().st_mtime_ns
    root = bench["coco_gt"].parent.parent
    assert make_eval_fixtures(root, seed=0, samples=SAMPLES) == bench
    assert bench["coco_gt"].stat().st_mtime_ns == stamp


def test_benchmark_folders_by_public_names(bench: dict[str, Path]) -> None:
    root = bench["coco_gt"].parent.parent
    assert [s.sample_id for s in read_benchmark("coco", root / "coco")] == [
        s.sample_id for s in read_coco(bench["coco_gt"], bench["coco_images"])]
    assert len(list(read_benchmark("textvqa", root / "textvqa"))) == SAMPLES
    assert scoring_references("mmmu", root / "mmmu") == {"answers": bench["mmmu_answers"]}
    with pytest.raises(NevaError, match="not a coco benchmark folder"):
        read_benchmark("coco", root / "mmmu")
