"""Zero-shot evaluation during training (`--eval-every N`): the model being trained answers the first
`--eval-limit` samples of a benchmark, and the task's official scorer (neva_core.eval.score) scores them.

It is `neva eval generate` on the live model: the same benchmark readers, Megatron's prompt of the task
through the run's template, greedy decoding with a KV cache, in groups of `--micro-batch` consecutive
samples; so the answers at step N are those `neva eval generate --batch B --limit K` gives on the weights
of step N.

Ranks: the groups are dealt out to the data-parallel groups in turn (group g to DP rank g mod dp). Every
TP rank of a DP group runs the forward (the LLM is sharded); TP rank 0 keeps the answers, and global rank
0 gathers them, writes OUT/eval/step-N/ (predictions.jsonl in Megatron's format, scores.json), scores
and logs. The weights are only read, in eval mode, under no_grad; the RNG states and every module's mode
are put back afterwards and the loaders are never touched, so a run with it trains exactly as one without.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from neva_core.data.text_tokenizer import TextTokenizer
from neva_core.errors import NevaError
from neva_core.eval import score
from neva_core.eval.benchmarks import EvalSample, count_benchmark, read_benchmark, scoring_references
from neva_core.eval.generate import DEFAULT_MAX_NEW_TOKENS, Answerer, sample_groups
from neva_core.eval.predictions import prediction_record
from neva_core.io import atomic_dir, is_temp_name, write_json_atomic
from neva_core.model.neva import NevaModel
from neva_core.train.config import TrainConfig
from neva_core.train.parallel import ModelParallelUnit

log = logging.getLogger("neva_core.train")

EVAL_DIR = "eval"  # OUT/eval/step-N/
PREDICTIONS_NAME = "predictions.jsonl"
SCORES_NAME = "scores.json"
# The score each task is judged by (a key of neva_core.eval.score's result), and its metrics.csv column.
HEADLINE = {"coco": "CIDEr", "mmmu": "accuracy", "textvqa": "accuracy"}
COLUMNS = {task: f"{task}_{metric.lower()}" for task, metric in HEADLINE.items()}
_STEP_NAME = re.compile(r"step-(\d+)")


def check_eval_inputs(config: TrainConfig) -> None:
    """Refuse, before any step, a --eval-data folder that lacks the task's files or samples (and COCO
    scoring without Java), so that a run never fails at its first evaluation hours in."""
    if not config.eval_every:
        return
    task, data = config.eval_task, config.eval_data
    assert task is not None and data is not None  # TrainConfig refuses --eval-every without them
    where = f"--eval-data {data} (--eval-task {task})"
    if not data.is_dir():
        raise NevaError(f"{where} does not exist; pass the benchmark folder (e.g. from `neva eval fixtures`)")
    try:
        scoring_references(task, data)
        if count_benchmark(task, data) == 0:
            raise NevaError("it holds no samples")
        next(read_benchmark(task, data))  # the image source too: its first image is opened
    except NevaError as exc:
        raise NevaError(f"{where}: {exc}") from None
    if task == "coco" and shutil.which("java") is None:
        raise NevaError("--eval-task coco scores with pycocoevalcap's PTB tokenizer, which needs Java, and `java` "
                        "is not on PATH: install a JRE (e.g. openjdk-17-jre-headless), or choose another --eval-task")


class ZeroShotEval:
    """Every rank makes one; `run(step)` is a collective every rank calls at the same steps."""

    def __init__(self, config: TrainConfig, model: NevaModel, tokenizer: TextTokenizer, mpu: ModelParallelUnit,
                 resumed_step: int) -> None:
        assert config.eval_task is not None and config.eval_data is not None
        self.task, self.data = config.eval_task, config.eval_data
        self.max_new_tokens = config.eval_max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.task]
        self.batch = config.micro_batch
        self.limit = min(config.eval_limit, count_benchmark(self.task, self.data))
        self.layout = mpu.layout
        self.folder = config.out / EVAL_DIR
        self.answerer = Answerer.for_model(model, tokenizer, config.vision, config.template)
        if self.layout.rank == 0:
            self._drop_uncommitted(resumed_step)
            log.info("zero-shot %s every %d steps on the first %d samples of %s", self.task, config.eval_every,
                     self.limit, self.data)

    def _drop_uncommitted(self, resumed_step: int) -> None:
        """Evaluations of steps after the resumed checkpoint (a killed run's), and temporaries: redone."""
        if not self.folder.is_dir():
            return
        for entry in self.folder.iterdir():
            found = _STEP_NAME.fullmatch(entry.name)
            if is_temp_name(entry) or (found and int(found[1]) > resumed_step):
                shutil.rmtree(entry, ignore_errors=True)

    def run(self, step: int) -> dict[str, float]:
        """Generate, gather, write and score: {metrics column: score} on rank 0, {} on the others."""
        started = time.perf_counter()
        samples = list(islice(read_benchmark(self.task, self.data), self.limit))
        groups = list(sample_groups(samples, self.batch))
        mine = range(self.layout.dp_rank, len(groups), self.layout.dp)
        with _untouched(self.answerer.model), torch.no_grad():
            answers = {g: self.answerer.answer(self.task, groups[g], self.max_new_tokens) for g in mine}
        answers = self._gathered(answers if self.layout.tp_rank == 0 else {})
        if self.layout.rank != 0:
            return {}
        texts = [text for g in range(len(groups)) for text in answers[g]]
        scores = self._write_and_score(step, samples, texts)
        headline = float(scores[HEADLINE[self.task]])
        log.info("step %d zero-shot %s %s %.4g on %d samples (%.1f s)", step, self.task, HEADLINE[self.task],
                 headline, len(samples), time.perf_counter() - started)
        return {COLUMNS[self.task]: headline}

    def _gathered(self, answers: dict[int, list[str]]) -> dict[int, list[str]]:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return answers
        parts: list[Any] | None = [None] * dist.get_world_size() if self.layout.rank == 0 else None
        dist.gather_object(answers, parts, dst=0)
        return {g: texts for part in parts or [] for g, texts in part.items()}

    def _write_and_score(self, step: int, samples: list[EvalSample], texts: list[str]) -> dict[str, Any]:
        final = self.folder / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)  # a step evaluated again after a resume from before it
        with atomic_dir(final) as tmp:
            predictions = tmp / PREDICTIONS_NAME
            lines = [prediction_record(self.task, s.sample_id, text, references=s.references, metadata=s.metadata)
                     for s, text in zip(samples, texts)]
            predictions.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
            scores = score(self.task, predictions, **scoring_references(self.task, self.data))
            write_json_atomic(tmp / SCORES_NAME, {
                "step": step, "task": self.task, "data": str(self.data), "samples": len(samples),
                "batch": self.batch, "max_new_tokens": self.max_new_tokens, "metric": HEADLINE[self.task],
                "score": scores[HEADLINE[self.task]], "scores": scores})
        return scores

    def latest(self) -> dict[str, Any] | None:
        """The newest evaluation's summary (for OUT/final's provenance), on rank 0; None elsewhere or if none."""
        if self.layout.rank != 0 or not self.folder.is_dir():
            return None
        steps = sorted(int(found[1]) for entry in self.folder.iterdir()
                       if (found := _STEP_NAME.fullmatch(entry.name)) and (entry / SCORES_NAME).is_file())
        if not steps:
            return None
        document = json.loads((self.folder / f"step-{steps[-1]}" / SCORES_NAME).read_text())
        return {key: document[key] for key in ("step", "task", "data", "samples", "metric", "score")} | {
            "predictions": f"{EVAL_DIR}/step-{steps[-1]}/{PREDICTIONS_NAME}"}


@contextmanager
def _untouched(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every module's mode and the python, numpy and torch RNG states as before."""
    modes = [(module, module.training) for module in model.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training
            random.setstate(python_state)
            np.random.set_state(numpy_state)
