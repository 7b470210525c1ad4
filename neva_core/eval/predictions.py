"""Prediction files in Megatron's JSONL formats: one JSON object per line, the first line per sample_id wins.

The formats are those of Megatron's examples/multimodal/run_text_generation.py, so either side's scorer
reads the other's files:

    coco     {"sample_id": <COCO image id>, "caption": str}
    mmmu     {"sample_id": str, "prediction": str, "question_type": str, "all_choices": [...], "index2ans": {...}}
    textvqa  {"sample_id": ..., "answer": str, "gt_answer": [10 str]}

Megatron's evaluate_*.py scripts skip later lines of a sample_id already seen; so do we, and say how many.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "coco": ("sample_id", "caption"),
    "mmmu": ("sample_id", "prediction", "question_type"),
    "textvqa": ("sample_id", "answer", "gt_answer"),
}


@dataclass(frozen=True)
class Predictions:
    path: Path
    records: list[dict[str, Any]]  # first record per sample_id, in file order
    lines: int  # non-empty lines read
    duplicates_ignored: int


def read_predictions(path: Path, task: str) -> Predictions:
    """The records of a JSONL prediction file, checked for the fields `task` needs."""
    path = Path(path)
    if not path.is_file():
        raise NevaError(f"prediction file {path} does not exist")
    required = REQUIRED_FIELDS[task]
    records: dict[Any, dict[str, Any]] = {}
    lines = duplicates = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            lines += 1
            record = _parse_line(path, number, line)
            missing = [name for name in required if name not in record]
            if missing:
                raise NevaError(
                    f"{path}:{number}: the record lacks {missing}; a {task} prediction line needs {list(required)}"
                )
            key = _hashable(path, number, record["sample_id"])
            if key in records:
                duplicates += 1
                continue
            records[key] = record
    if not records:
        raise NevaError(f"{path} holds no predictions; generate some first (`neva eval generate`)")
    return Predictions(path=path, records=list(records.values()), lines=lines, duplicates_ignored=duplicates)


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise NevaError(f"{path}:{number} is not valid JSON ({exc}); each line must be one JSON object") from exc
    if not isinstance(record, dict):
        raise NevaError(f"{path}:{number} is a JSON {type(record).__name__}, not an object")
    return record


def _hashable(path: Path, number: int, sample_id: Any) -> Any:
    if isinstance(sample_id, (str, int)) and not isinstance(sample_id, bool):
        return sample_id
    raise NevaError(f"{path}:{number}: sample_id must be a string or an integer, got {sample_id!r}")


def expect_type(path: Path, sample_id: Any, field: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    """`value` if it is a `kind`, else a NevaError naming the file, sample and field."""
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise NevaError(f"{path}: sample {sample_id!r} has {field}={value!r}; it must be a {names}")
    return value


def prediction_record(task: str, sample_id: Any, generated: str, *, references: list[str] | None = None,
                      metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JSONL line in Megatron's format for a generated answer (what `neva eval generate` writes)."""
    if task == "coco":
        return {"sample_id": sample_id, "caption": generated}
    if task == "textvqa":
        return {"sample_id": sample_id, "answer": generated, "gt_answer": list(references or [])}
    if task == "mmmu":
        metadata = metadata or {}
        record = {"sample_id": sample_id, "prediction": generated, "question_type": metadata["question_type"]}
        if metadata["question_type"] == "multiple-choice":  # Megatron adds the options for these only
            record |= {"all_choices": metadata["all_choices"], "index2ans": metadata["index2ans"]}
        return record
    raise NevaError(f"unknown task {task!r}; choose one of {tuple(REQUIRED_FIELDS)}")
