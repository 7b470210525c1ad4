"""What an evaluation run shows in the Prefect UI, built without Prefect: the scores table (against the
promoted model when the guard is on), a gallery of a few samples (image, prompt, generation, references) and
the promoted model's card. Images are small JPEG data URIs, so the artifacts need no file server."""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from neva_core.eval.benchmarks import EvalSample, read_benchmark
from neva_core.eval.guard import prediction_path
from neva_core.eval.predictions import read_predictions

THUMBNAIL_PX = 128
ANSWER_FIELD = {"coco": "caption", "mmmu": "prediction", "textvqa": "answer"}


def score_rows(results: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, float] | None = None,
               regressions: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per numeric score of each task; guarded metrics also show the promoted model's score."""
    rows = []
    for task, result in sorted(results.items()):
        for metric, value in result.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}"
            row: dict[str, Any] = {"task": task, "metric": metric, "score": round(float(value), 4)}
            if baseline is not None:
                previous = baseline.get(name)
                row["promoted"] = None if previous is None else round(previous, 4)
                row["change"] = None if previous is None else round(float(value) - previous, 4)
                row["regression"] = name in (regressions or {})
            rows.append(row)
    return rows


def samples_markdown(benchmarks: Mapping[str, Path], run_dir: Path, shown: int, title: str) -> str:
    """The first `shown` samples of each benchmark: image, prompt, the model's answer, the references."""
    parts = [f"# {title}"]
    for task, data_dir in sorted(benchmarks.items()):
        answers = {r["sample_id"]: r[ANSWER_FIELD[task]]
                   for r in read_predictions(prediction_path(run_dir, task), task).records}
        parts += [f"## {task}", "", "| image | prompt | generation | reference |", "|---|---|---|---|"]
        for sample in islice(read_benchmark(task, Path(data_dir)), shown):
            image = f"![{sample.sample_id}]({jpeg_data_uri(sample.images[0])})" if sample.images else "(no image)"
            prompt = sample.question or "(caption the image)"
            parts.append(f"| {image} | {_cell(prompt)} | {_cell(str(answers.get(sample.sample_id, '')))} | "
                         f"{_cell(_references(task, sample))} |")
        parts.append("")
    return "\n".join(parts)


def promoted_markdown(pointer: Mapping[str, Any]) -> str:
    lines = [f"# Promoted model (run {pointer['run_id']})", "", f"- folder: `{pointer['model']}`",
             f"- evaluated in: `{pointer.get('source', pointer['model'])}`", f"- digest: `{pointer['model_digest']}`",
             "", "| metric | score |", "|---|---|"]
    lines += [f"| {metric} | {value:.2f} |" for metric, value in sorted(pointer["scores"].items())]
    return "\n".join(lines) + "\n"


def jpeg_data_uri(image: Image.Image, size: int = THUMBNAIL_PX) -> str:
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((size, size))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _references(task: str, sample: EvalSample) -> str:
    if task == "textvqa":  # ten annotators: each distinct answer once, with how many gave it
        return ", ".join(f"{answer} ×{count}" for answer, count in Counter(sample.references).most_common())
    if task == "mmmu":
        letter = sample.references[0]
        option = sample.metadata.get("index2ans", {}).get(letter)
        return f"{letter} ({option})" if option else letter
    return " / ".join(sample.references)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: no pipes or line breaks, and no HTML (`<image>` would vanish)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") or "(empty)"
