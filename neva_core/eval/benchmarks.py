"""Readers for the benchmarks' public layouts, each yielding `EvalSample`s in Megatron's evaluation order.

    coco     the Karpathy test ground truth in COCO format (coco_karpathy_test_gt.json) plus the val2014
             images, as a folder or as val2014.zip; images in the ground truth's order, each with its
             reference captions. Entries without file_name are COCO_val2014_<id:012d>.jpg.
    mmmu     the Hugging Face dataset MMMU/MMMU on disk: a `save_to_disk` folder (datasets.load_from_disk) or
             the repository's parquet files (<Subject>/validation-*.parquet), images embedded; the split's
             rows whose id starts with "val" (as Megatron filters), subjects in name order.
    textvqa  TextVQA_0.5.1_val.json plus its images (train_images/<image_id>.jpg, folder or zip).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from neva_core.errors import NevaError
from neva_core.eval.coco import load_ground_truth
from neva_core.eval.prompts import mmmu_question
from neva_core.io import read_json

MMMU_IMAGE_COLUMNS = tuple(f"image_{i}" for i in range(1, 8))
COCO_IMAGE_NAME = "COCO_val2014_{:012d}.jpg"
_IMAGE_SUFFIXES = ("", ".jpg", ".png")  # Megatron's VQADataset tries the id as is, then these


@dataclass(frozen=True)
class EvalSample:
    """One benchmark question: what the model sees and what its answer is scored against."""

    sample_id: int | str
    images: list[Image.Image]
    question: str  # "" for captioning; the built MMMU prompt text; the TextVQA question
    references: list[str]  # coco: reference captions; textvqa: the 10 answers; mmmu: [answer]
    metadata: dict[str, Any] = field(default_factory=dict)


class ImageFiles:
    """Images by file name from a folder (searched below it too) or a zip (any folder inside it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._index: dict[str, str] | None = None
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as exc:
                raise NevaError(f"{self.path} is not a zip archive ({exc}); give the image folder or zip") from None
            self._index = {Path(n).name: n for n in self._zip.namelist() if not n.endswith("/")}
        elif not self.path.is_dir():
            raise NevaError(f"image source {self.path} does not exist; give the image folder or its zip")

    def open(self, name: str) -> Image.Image:
        data = self._read(name)
        if data is None:
            raise NevaError(f"image {name} is not in {self.path}")
        return _decode_image(data, f"image {name} in {self.path}")

    def find(self, names: tuple[str, ...]) -> str | None:
        return next((n for n in names if self._member(n) is not None), None)

    def _read(self, name: str) -> bytes | None:
        member = self._member(name)
        if member is None:
            return None
        if self._zip is not None:
            return self._zip.read(member)
        return Path(member).read_bytes()

    def _member(self, name: str) -> str | None:
        if self._zip is None:
            direct = self.path / name
            if direct.is_file():
                return str(direct)
            if self._index is None:  # the name lives in a sub-folder (val2014/, train_images/): index once
                self._index = {f: os.path.join(d, f) for d, _, files in os.walk(self.path) for f in files}
        return self._index.get(Path(name).name) if self._index is not None else None


# ----------------------------------------------------------------------------------------------------- COCO
def read_coco(gt_path: Path, images: Path) -> Iterator[EvalSample]:
    """The ground truth's images with their reference captions (sample_id = the COCO image id)."""
    truth = load_ground_truth(gt_path)
    files = ImageFiles(images)
    for image_id in truth.image_ids:
        name = truth.file_names.get(image_id) or COCO_IMAGE_NAME.format(image_id)
        yield EvalSample(sample_id=image_id, images=[files.open(name)], question="",
                         references=truth.references.get(image_id, []))


# ----------------------------------------------------------------------------------------------------- MMMU
def read_mmmu(path: Path, split: str = "validation") -> Iterator[EvalSample]:
    """MMMU questions of `split` with image_1 (Megatron's single-image style) and the scoring metadata."""
    for row in _mmmu_rows(Path(path), split):
        if not str(row["id"]).startswith(split[:3]):
            continue
        present = [c for c in MMMU_IMAGE_COLUMNS if row.get(c)]
        question, metadata = mmmu_question(row)
        first = row.get("image_1")
        yield EvalSample(
            sample_id=row["id"],
            images=[_decode_embedded(first, row["id"])] if first else [],
            question=question,
            references=[row["answer"]],
            metadata=metadata | {"subfield": row.get("subfield"), "image_count": len(present)},
        )


def _mmmu_rows(path: Path, split: str) -> Iterator[dict[str, Any]]:
    if not path.is_dir():
        raise NevaError(f"MMMU data {path} is not a folder; give a save_to_disk folder or the parquet files' root")
    parquet = sorted(path.rglob(f"{split}-*.parquet"))
    if parquet:
        yield from _parquet_rows(parquet)
    elif any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json", "dataset_info.json")) or \
            any(p.is_file() for p in path.glob("*/state.json")):
        yield from _disk_rows(path, split)
    else:
        raise NevaError(f"{path} holds neither {split}-*.parquet files nor a datasets save_to_disk folder")


def _parquet_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for file in files:
        yield from pq.read_table(file).to_pylist()


def _disk_rows(path: Path, split: str) -> Iterator[dict[str, Any]]:
    """Rows of a save_to_disk folder: a DatasetDict (one sub-folder per split, or per subject) or a Dataset."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        parts = [loaded[split]] if split in loaded else [loaded[k] for k in sorted(loaded)]
    else:
        parts = [loaded]
    for part in parts:
        for name, feature in part.features.items():
            if isinstance(feature, datasets.Image):  # cast_column only relabels: nothing is written to disk
                part = part.cast_column(name, datasets.Image(decode=False))
        yield from part


def _decode_embedded(value: Any, sample_id: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise NevaError(f"MMMU sample {sample_id!r}: image_1 has no embedded bytes; use the dataset with images")
    return _decode_image(data, f"MMMU sample {sample_id!r}: image_1")


def _decode_image(data: bytes, what: str) -> Image.Image:
    """The RGB image encoded in `data`; NevaError naming `what` when it cannot be decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except OSError as exc:
        raise NevaError(f"{what} cannot be decoded ({exc})") from None
    return image.convert("RGB")


def write_mmmu_answers(path: Path, split: str = "validation") -> dict[str, dict[str, Any]]:
    """MMMU's answer_dict format ({id: {question_type, ground_truth}}) from the dataset's own answers."""
    answers = {}
    for row in _mmmu_rows(Path(path), split):
        if str(row["id"]).startswith(split[:3]):
            answers[row["id"]] = {"question_type": row["question_type"], "ground_truth": row["answer"]}
    return answers


# -------------------------------------------------------------------------------------------------- TextVQA
def read_textvqa(json_path: Path, images: Path) -> Iterator[EvalSample]:
    """TextVQA questions (sample_id = question_id) with their image and the 10 annotators' answers."""
    json_path = Path(json_path)
    data = read_json(json_path, f"{json_path} does not exist (TextVQA_0.5.1_val.json)")
    records = data["data"] if isinstance(data, dict) and "data" in data else data
    files = ImageFiles(images)
    for record in records:
        missing = [k for k in ("question_id", "question", "image_id") if k not in record]
        if missing:
            raise NevaError(f"{json_path}: a question lacks {missing}; is this TextVQA_0.5.1_val.json?")
        name = files.find(tuple(f"{record['image_id']}{s}" for s in _IMAGE_SUFFIXES))
        if name is None:
            raise NevaError(f"{json_path}: the image of question {record['question_id']} "
                            f"({record['image_id']}.jpg) is not in {images}")
        yield EvalSample(sample_id=record["question_id"], images=[files.open(name)], question=record["question"],
                         references=list(record.get("answers", [])))


# ------------------------------------------------------------------------------------- a benchmark folder
COCO_GT_NAME = "coco_karpathy_test_gt.json"
COCO_IMAGE_SOURCES = ("val2014.zip", "val2014")
MMMU_ANSWERS_NAME = "answer_dict_val.json"
TEXTVQA_JSON_NAME = "TextVQA_0.5.1_val.json"
TEXTVQA_IMAGE_SOURCES = ("train_images", "train_val_images.zip", "train_images.zip")


def read_benchmark(task: str, data_dir: Path) -> Iterator[EvalSample]:
    """The samples of a benchmark folder laid out under the public names (as `neva eval fixtures` writes):

        coco     DIR/coco_karpathy_test_gt.json + DIR/val2014.zip or DIR/val2014/
        mmmu     DIR (parquet files or a save_to_disk folder)
        textvqa  DIR/TextVQA_0.5.1_val.json + DIR/train_images/ (or train_val_images.zip)
    """
    data_dir = Path(data_dir)
    if task == "coco":
        return read_coco(_required(data_dir, (COCO_GT_NAME,), task), _required(data_dir, COCO_IMAGE_SOURCES, task))
    if task == "mmmu":
        return read_mmmu(data_dir)
    if task == "textvqa":
        return read_textvqa(_required(data_dir, (TEXTVQA_JSON_NAME,), task),
                            _required(data_dir, TEXTVQA_IMAGE_SOURCES, task))
    raise NevaError(f"unknown task {task!r}; choose one of coco, mmmu, textvqa")


def count_benchmark(task: str, data_dir: Path) -> int:
    """How many samples `read_benchmark` yields, without decoding any image."""
    data_dir = Path(data_dir)
    if task == "coco":
        return len(load_ground_truth(_required(data_dir, (COCO_GT_NAME,), task)).image_ids)
    if task == "mmmu":
        return sum(1 for sample_id in _mmmu_ids(data_dir) if str(sample_id).startswith("val"))
    if task == "textvqa":
        data = json.loads(_required(data_dir, (TEXTVQA_JSON_NAME,), task).read_text(encoding="utf-8"))
        return len(data["data"] if isinstance(data, dict) and "data" in data else data)
    raise NevaError(f"unknown task {task!r}; choose one of coco, mmmu, textvqa")


def _mmmu_ids(path: Path, split: str = "validation") -> Iterator[Any]:
    parquet = sorted(path.rglob(f"{split}-*.parquet"))
    if not parquet:  # a save_to_disk folder: its rows carry the images' bytes undecoded
        yield from (row["id"] for row in _mmmu_rows(path, split))
        return
    import pyarrow.parquet as pq

    for file in parquet:
        yield from pq.read_table(file, columns=["id"]).column("id").to_pylist()


def scoring_references(task: str, data_dir: Path) -> dict[str, Path]:
    """The keyword arguments `neva_core.eval.score` needs for a benchmark folder's predictions."""
    data_dir = Path(data_dir)
    if task == "coco":
        return {"gt": _required(data_dir, (COCO_GT_NAME,), task)}
    if task == "mmmu":
        return {"answers": _required(data_dir, (MMMU_ANSWERS_NAME,), task)}
    return {}


def _required(data_dir: Path, names: tuple[str, ...], task: str) -> Path:
    for name in names:
        if (data_dir / name).exists():
            return data_dir / name
    raise NevaError(f"{data_dir} is not a {task} benchmark folder: it has none of {list(names)}")
