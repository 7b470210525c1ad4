"""Small offline benchmarks in the public layouts, made of the fixtures' coloured-shape images.

    coco/coco_karpathy_test_gt.json   COCO format, images listed by id only (as LAVIS's Karpathy file)
    coco/val2014.zip                  val2014/COCO_val2014_<id:012d>.jpg
    mmmu/<Subject>/validation-00000-of-00001.parquet   HF MMMU columns, images embedded (or, with
                                      mmmu_layout="disk", a datasets save_to_disk folder)
    mmmu/answer_dict_val.json         MMMU's answer dict
    textvqa/TextVQA_0.5.1_val.json    {"data": [...]} with 10 annotator answers per question
    textvqa/train_images/<image_id>.jpg
    eval_fixtures.json                index of the above, written last

Every question is answered by the drawn image ("a red circle"), in the words the fixtures' training data
uses, so a model trained on `neva fixtures` data can score above chance.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from neva_core.errors import NevaError
from neva_core.eval.benchmarks import COCO_IMAGE_NAME
from neva_core.fixtures.images import COLOURS, SHAPES, balanced_classes, caption_for, draw_shape_image, jpeg_bytes, \
    write_zip
from neva_core.io import atomic_dir, atomic_file, write_json_atomic

INDEX_NAME = "eval_fixtures.json"
FORMAT_VERSION = 1
_STREAMS = {"coco": 11, "mmmu": 12, "textvqa": 13}
_CAPTION_FORMS = ("a {colour} {shape}", "a {colour} {shape} on a grey background", "{colour} {shape}",
                  "a picture of a {colour} {shape}", "one {colour} {shape} drawn in the middle of the image")
_KIND_SUBJECTS = ("Art", "Math", "Art", "Art")  # by question kind, see _mmmu_row
_MMMU_COLUMNS = ("id", "question", "options", "explanation", *(f"image_{i}" for i in range(1, 8)), "img_type",
                 "answer", "topic_difficulty", "question_type", "subfield")


def make_eval_fixtures(out_dir: Path, *, seed: int = 0, samples: int = 24, image_size: int = 64,
                       mmmu_layout: str = "parquet") -> dict[str, Path]:
    """Write the three benchmarks into `out_dir` (reused as is when complete for these parameters)."""
    out_dir = Path(out_dir)
    params = {"format": FORMAT_VERSION, "seed": seed, "samples": samples, "image_size": image_size,
              "mmmu_layout": mmmu_layout}
    index = out_dir / INDEX_NAME
    if index.is_file() and json.loads(index.read_text()).get("params") == params:
        return {name: out_dir / path for name, path in json.loads(index.read_text())["paths"].items()}
    index.unlink(missing_ok=True)  # the folder is untrusted until the new index is written
    for name in ("coco", "mmmu", "textvqa"):  # left by an interrupted or other-parameter run
        shutil.rmtree(out_dir / name, ignore_errors=True)
    common = {"seed": seed, "samples": samples, "image_size": image_size}
    paths = {
        **make_coco_fixture(out_dir / "coco", **common),
        **make_mmmu_fixture(out_dir / "mmmu", layout=mmmu_layout, **common),
        **make_textvqa_fixture(out_dir / "textvqa", **common),
    }
    write_json_atomic(index, {"params": params, "paths": {k: str(v.relative_to(out_dir)) for k, v in paths.items()}})
    return paths


def make_coco_fixture(folder: Path, *, seed: int = 0, samples: int = 24, image_size: int = 64) -> dict[str, Path]:
    """coco_karpathy_test_gt.json (5 reference captions per image) and val2014.zip, in a new `folder`.

    Each maker writes into a temporary sibling and renames it to `folder` (which must not exist) at the end.
    """
    _make(folder, "coco", seed, samples, lambda tmp, rng: _write_coco(tmp, rng, samples, image_size))
    return {"coco_gt": folder / "coco_karpathy_test_gt.json", "coco_images": folder / "val2014.zip"}


def make_mmmu_fixture(folder: Path, *, seed: int = 0, samples: int = 24, image_size: int = 64,
                      layout: str = "parquet") -> dict[str, Path]:
    """MMMU's HF layout (parquet per subject, or save_to_disk) plus answer_dict_val.json, in a new `folder`."""
    if layout not in ("parquet", "disk"):
        raise NevaError(f"the MMMU fixture layout must be 'parquet' or 'disk', got {layout!r}")
    _make(folder, "mmmu", seed, samples, lambda tmp, rng: _write_mmmu(tmp, rng, samples, image_size, layout))
    return {"mmmu": folder, "mmmu_answers": folder / "answer_dict_val.json"}


def make_textvqa_fixture(folder: Path, *, seed: int = 0, samples: int = 24, image_size: int = 64
                         ) -> dict[str, Path]:
    """TextVQA_0.5.1_val.json and train_images/, in a new `folder`."""
    _make(folder, "textvqa", seed, samples, lambda tmp, rng: _write_textvqa(tmp, rng, samples, image_size))
    return {"textvqa_json": folder / "TextVQA_0.5.1_val.json", "textvqa_images": folder / "train_images"}


def _make(folder: Path, stream: str, seed: int, samples: int,
          write: Callable[[Path, np.random.Generator], None]) -> None:
    if samples < 4:
        raise NevaError(f"--samples must be at least 4 (one per question kind), got {samples}")
    with atomic_dir(Path(folder)) as tmp:  # refuses an existing folder
        write(tmp, np.random.default_rng([seed, _STREAMS[stream]]))


def _write_coco(folder: Path, rng: np.random.Generator, samples: int, size: int) -> None:
    images, annotations, members = [], [], []
    for index, (colour, shape) in enumerate(balanced_classes(rng, samples)):
        image_id = 391 + index * 7919  # spread out like real COCO ids
        images.append({"id": image_id})
        members.append((f"val2014/{COCO_IMAGE_NAME.format(image_id)}",
                        jpeg_bytes(draw_shape_image(rng, colour, shape, size))))
        for form in _CAPTION_FORMS:
            annotations.append({"image_id": image_id, "id": len(annotations) + 1,
                                "caption": form.format(colour=colour, shape=shape).capitalize() + "."})
    write_json_atomic(folder / "coco_karpathy_test_gt.json", {"images": images, "annotations": annotations})
    write_zip(folder / "val2014.zip", members)


def _mmmu_row(rng: np.random.Generator, kind: int, number: int, size: int, colour: str, shape: str
              ) -> dict[str, Any]:
    """Kinds: 0 colour (multiple choice, Art), 1 shape (multiple choice, Math), 2 colour (open, Art),
    3 colour of the first of two images (multiple choice, Art)."""
    image = {"bytes": jpeg_bytes(draw_shape_image(rng, colour, shape, size)), "path": None}
    row: dict[str, Any] = {c: None for c in _MMMU_COLUMNS} | {
        "explanation": "", "img_type": "['Diagrams']", "topic_difficulty": "Easy", "image_1": image}
    if kind == 1:
        options = [str(s) for s in rng.permutation(list(SHAPES) + ["star"])]
        question, answer = "Which shape is drawn in <image 1>?", shape
    elif kind == 2:
        options, question, answer = None, "<image 1> What colour is the shape?", colour
    else:
        options = [str(c) for c in rng.permutation(list(COLOURS))]
        question, answer = "What colour is the shape in <image 1>?", colour
        if kind == 3:
            other = str(rng.choice([c for c in COLOURS if c != colour]))
            row["image_2"] = {"bytes": jpeg_bytes(draw_shape_image(rng, other, shape, size)), "path": None}
            question = "<image 1> and <image 2> show two shapes. What colour is the shape in the first image?"
    subject = _KIND_SUBJECTS[kind]
    row |= {"id": f"validation_{subject}_{number}", "question": question, "subfield": f"{subject} fixtures"}
    if options is None:
        row |= {"options": "[]", "answer": answer, "question_type": "open"}
    else:
        row |= {"options": repr(options), "answer": chr(ord("A") + options.index(answer)),
                "question_type": "multiple-choice"}
    return row


def _write_mmmu(folder: Path, rng: np.random.Generator, samples: int, size: int, layout: str) -> None:
    import datasets
    import pyarrow.parquet as pq

    by_subject: dict[str, list[dict[str, Any]]] = {}
    for index, (colour, shape) in enumerate(balanced_classes(rng, samples)):
        kind = index % 4
        subject = _KIND_SUBJECTS[kind]
        rows = by_subject.setdefault(subject, [])
        rows.append(_mmmu_row(rng, kind, len(rows) + 1, size, colour, shape))
    features = datasets.Features({
        name: datasets.Image() if name.startswith("image_") else datasets.Value("string") for name in _MMMU_COLUMNS
    })
    answers = {}
    subject_sets = {}
    for subject, rows in sorted(by_subject.items()):
        subject_sets[subject] = datasets.Dataset.from_list(rows, features=features)
        answers |= {r["id"]: {"question_type": r["question_type"], "ground_truth": r["answer"]} for r in rows}
    if layout == "parquet":
        for subject, dataset in subject_sets.items():
            (folder / subject).mkdir()
            with atomic_file(folder / subject / "validation-00000-of-00001.parquet") as f:
                # the Arrow table carries the features (Image columns) in its schema metadata, as HF's files do
                pq.write_table(dataset.data.table, f)
    else:
        merged = datasets.concatenate_datasets(list(subject_sets.values()))
        datasets.DatasetDict({"validation": merged}).save_to_disk(str(folder))
    write_json_atomic(folder / "answer_dict_val.json", answers)


def _write_textvqa(folder: Path, rng: np.random.Generator, samples: int, size: int) -> None:
    (folder / "train_images").mkdir()
    records = []
    for index, (colour, shape) in enumerate(balanced_classes(rng, samples)):
        image_id = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, 8))
        with atomic_file(folder / "train_images" / f"{image_id}.jpg") as f:
            f.write(jpeg_bytes(draw_shape_image(rng, colour, shape, size)))
        agreeing = int(rng.integers(6, 11))  # the rest answer with the whole caption, or give up
        others = [caption_for(colour, shape) if rng.random() < 0.7 else "unanswerable" for _ in range(10 - agreeing)]
        question = "What colour is the shape?" if index % 2 == 0 else "Which shape is drawn in the image?"
        answer = colour if index % 2 == 0 else shape
        records.append({
            "question": question, "image_id": image_id, "image_classes": ["Shape"],
            "flickr_original_url": "", "flickr_300k_url": "", "image_width": size, "image_height": size,
            "answers": [answer] * agreeing + others, "question_tokens": question.rstrip("?").lower().split(),
            "question_id": 34602 + index, "set_name": "val",
        })
    write_json_atomic(folder / "TextVQA_0.5.1_val.json",
                      {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": records})
