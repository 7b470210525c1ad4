"""`neva eval generate`: a trained model's greedy answers over a benchmark, in Megatron's JSONL formats.

Each sample's prompt is Megatron's user turn for the task (neva_core.eval.prompts) built by the model's own
training template (build_generation_prompt); the template supplies its own system line, as in training, in
place of Megatron's system turn. Samples are taken in the benchmark readers' order and batched in fixed
groups of `batch` consecutive samples, so a resumed run puts the same samples together as an uninterrupted
one and decodes them identically.

Resuming: the prediction file is append-only, fsynced after every batch. Beside it, PRED.jsonl.run.json
(written atomically before the first line) names the task, the model (the digest of its manifest's file
list) and the decoding settings; a run whose settings differ is refused rather than mixed into the file.
A torn last line (a kill mid-write) is cut off; sample ids already in the file are not generated again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neva_core.data.templates import build_generation_prompt
from neva_core.data.text_tokenizer import TextTokenizer
from neva_core.errors import NevaError
from neva_core.eval import TASKS
from neva_core.eval.benchmarks import EvalSample, count_benchmark, read_benchmark
from neva_core.eval.predictions import prediction_record
from neva_core.eval.prompts import IMAGE_PLACEHOLDER, user_prompt
from neva_core.generate import ANSWER_END, greedy_generate, left_padded
from neva_core.io import file_lock, lock_path, read_manifest, write_json_atomic

if TYPE_CHECKING:
    from neva_core.model.neva import NevaModel

log = logging.getLogger(__name__)

# Answer lengths: a one-sentence caption, a short phrase, an option letter or short open answer.
DEFAULT_MAX_NEW_TOKENS = {"coco": 40, "textvqa": 16, "mmmu": 24}
RUN_SUFFIX = ".run.json"
RUN_FORMAT = "neva-eval-predictions"


@dataclass(frozen=True)
class GenerationSummary:
    path: Path
    task: str
    total: int  # samples in scope (the benchmark, or its first --limit)
    already_done: int  # found in the file at the start
    generated: int  # written by this run


def generation_aspect(template: str) -> str:
    """How images are fitted for generation, by the model's template: as `neva generate` does (LLaVA-1.5)."""
    return "square" if template == "plain" else "pad"


class Answerer:
    """A trained model with its tokenizer and image processor: batched greedy answers to EvalSamples."""

    def __init__(self, model_dir: Path | str, dtype: torch.dtype | None = None) -> None:
        from neva_core.data.preprocess import ImageProcessor
        from neva_core.data.text_tokenizer import load_text_tokenizer
        from neva_core.model.trained import TOKENIZER_DIR, VISION_DIR, load_trained_model, read_trained_config

        self.folder, settings, _ = read_trained_config(model_dir)
        self.template = settings.template
        self.aspect = generation_aspect(self.template)
        self.model = load_trained_model(self.folder, dtype=dtype).eval()
        self.tokenizer: TextTokenizer = load_text_tokenizer(self.folder / TOKENIZER_DIR)
        self.processor = ImageProcessor.from_folder(self.folder / VISION_DIR, aspect=self.aspect)
        self.model_digest = model_digest(self.folder)

    @classmethod
    def for_model(cls, model: NevaModel, tokenizer: TextTokenizer, vision_dir: Path, template: str) -> Answerer:
        """An Answerer over a model already in memory (the one being trained), with the processor of its
        vision folder; its mode is the caller's to set (answers need eval mode)."""
        from neva_core.data.preprocess import ImageProcessor

        answerer = cls.__new__(cls)
        answerer.folder, answerer.template, answerer.aspect = None, template, generation_aspect(template)
        answerer.model, answerer.tokenizer = model, tokenizer
        answerer.processor = ImageProcessor.from_folder(vision_dir, aspect=answerer.aspect)
        answerer.model_digest = None
        return answerer

    def answer(self, task: str, samples: list[EvalSample], max_new_tokens: int) -> list[str]:
        """The answers in sample order. A sample's first image is shown (Megatron's single-image style)."""
        has_image = [bool(s.images) for s in samples]
        prompts = [build_generation_prompt(self.template, _user_turn(task, s.question, shown), self.tokenizer,
                                           self.model.image_tokens, has_image=shown)
                   for s, shown in zip(samples, has_image)]
        images = self._images(samples) if any(has_image) else None
        device = self.model.llm.embedding.word_embeddings.weight.device
        input_ids, mask = left_padded(prompts, self.tokenizer.pad_id)
        with torch.no_grad():
            embeds = self.model.embed(input_ids.to(device), None if images is None else images.to(device))
        stop = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        tokens = greedy_generate(self.model.llm, prompt_embeds=embeds, attention_mask=mask.to(device), eos_id=stop,
                                 max_new_tokens=max_new_tokens)
        texts = [self.tokenizer.decode(row) for row in tokens]
        if self.template in ANSWER_END:
            texts = [text.split(ANSWER_END[self.template], 1)[0] for text in texts]
        return [text.strip() for text in texts]

    def _images(self, samples: list[EvalSample]) -> torch.Tensor:
        pixels = [self.processor(s.images[0]) if s.images else None for s in samples]
        blank = torch.zeros_like(next(p for p in pixels if p is not None))  # text-only rows have no image tokens
        return torch.stack([blank if p is None else p for p in pixels])


def _user_turn(task: str, question: str, has_image: bool) -> str:
    text = user_prompt(task, question)
    return text if has_image else text.replace(IMAGE_PLACEHOLDER, "").strip()  # a question without an image


def model_digest(folder: Path) -> str:
    """The identity of a trained-model folder: sha256 of its manifest's file list (names, sizes, hashes)."""
    files = read_manifest(folder).get("files", {})
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def generate_predictions(model_dir: Path | str, task: str, data_dir: Path | str, out: Path | str, *,
                         batch: int = 8, limit: int | None = None, max_new_tokens: int | None = None,
                         answerer: Answerer | None = None,
                         on_batch: Callable[[int, int], None] | None = None) -> GenerationSummary:
    """Append the missing predictions of `task`'s first `limit` samples (all when None) to `out`.

    `answerer` reuses a loaded model (it must be `model_dir`'s); `on_batch(done, total)` is called after
    each batch is on disk.
    """
    if task not in TASKS:
        raise NevaError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if batch < 1:
        raise NevaError(f"--batch must be at least 1, got {batch}")
    if limit is not None and limit < 1:
        raise NevaError(f"--limit must be at least 1, got {limit}")
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    out = Path(out)
    answerer = answerer or Answerer(model_dir)
    run = {"format": RUN_FORMAT, "task": task, "model_digest": answerer.model_digest,
           "template": answerer.template, "image_aspect": answerer.aspect, "max_new_tokens": max_new_tokens,
           "batch": batch}
    with file_lock(lock_path(out), str(out), wait=False) as held:
        if not held:
            raise NevaError(f"another `neva eval generate` is writing {out}; wait for it or choose another --out")
        finished, generated, total = _append_missing(answerer, task, Path(data_dir), out, run, model_dir, batch,
                                                     limit, on_batch)
    return GenerationSummary(path=out, task=task, total=total, already_done=finished - generated,
                             generated=generated)


def _append_missing(answerer: Answerer, task: str, data_dir: Path, out: Path, run: dict[str, Any],
                    model_dir: Path | str, batch: int, limit: int | None,
                    on_batch: Callable[[int, int], None] | None) -> tuple[int, int, int]:
    """(samples done, generated by this call, samples in scope), under the file's lock."""
    max_new_tokens = run["max_new_tokens"]
    _claim(out, run, model_dir)
    done = _recover(out)
    total = count_benchmark(task, data_dir)
    total = total if limit is None else min(total, limit)
    samples = islice(read_benchmark(task, data_dir), total)
    finished, generated = 0, 0
    log.info("%s: %d predictions already in %s; %d samples in scope", task, len(done), out, total)
    with open(out, "a", encoding="utf-8") as f:
        for group in sample_groups(samples, batch):
            finished += sum(1 for s in group if s.sample_id in done)
            todo = [s for s in group if s.sample_id not in done]
            if not todo:
                continue
            answers = answerer.answer(task, todo, max_new_tokens)
            f.write("".join(json.dumps(prediction_record(task, s.sample_id, text, references=s.references,
                                                         metadata=s.metadata)) + "\n"
                            for s, text in zip(todo, answers)))
            f.flush()
            os.fsync(f.fileno())
            finished, generated = finished + len(todo), generated + len(todo)
            log.info("%s: %d/%d samples", task, finished, total)
            if on_batch is not None:
                on_batch(finished, total)
    return finished, generated, total


def run_path(out: Path) -> Path:
    return out.with_name(out.name + RUN_SUFFIX)


def _claim(out: Path, run: dict[str, Any], model_dir: Path | str) -> None:
    """Record this run's settings beside a new file, or check them against an existing file's."""
    sidecar = run_path(out)
    if not sidecar.is_file():
        if out.exists() and out.stat().st_size > 0:
            raise NevaError(f"{out} exists but {sidecar.name} (which model and task wrote it) does not; "
                            "it was not written by `neva eval generate`: choose another --out or remove it")
        write_json_atomic(sidecar, run)
        out.touch()
        return
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NevaError(f"{sidecar} is not valid JSON ({exc}); remove it together with {out.name}") from None
    differing = {k: (recorded.get(k), v) for k, v in run.items() if recorded.get(k) != v}
    if differing:
        what = ", ".join(f"{k}: file has {old!r}, this run {new!r}" for k, (old, new) in differing.items())
        raise NevaError(f"{out} holds predictions of another run ({what}; model {model_dir}); "
                        "choose another --out, or remove the file and its .run.json to start again")


def _recover(out: Path) -> set[Any]:
    """Sample ids already in `out`, after cutting off a torn last line (a kill during the write)."""
    data = out.read_bytes() if out.exists() else b""
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    done: set[Any] = set()
    for number, line in enumerate(data[:keep].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["sample_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NevaError(f"{out}:{number} is not a prediction line; the file is damaged: remove it and its "
                            f"{RUN_SUFFIX} to start again") from None
    if keep < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", out, len(data) - keep)
        with open(out, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return done


def sample_groups(samples: Iterable[EvalSample], size: int) -> Iterator[list[EvalSample]]:
    """Consecutive groups of `size` samples (the last may be shorter): the batches generation decodes."""
    iterator = iter(samples)
    while group := list(islice(iterator, size)):
        yield group
