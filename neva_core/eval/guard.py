"""The nightly regression guard: each run's scores are recorded next to the previous runs', and a model
is promoted only when it is no worse than the promoted one.

    WORKDIR/eval/history.jsonl     one line per run: model, scores, the baseline it was judged against, the
                                   regressions found and the decision (rewritten atomically, under a lock)
    WORKDIR/promoted/model.json    the promoted model: its folder, digest, scores and run (replaced atomically)
    WORKDIR/promoted/model-<digest>/  the promoted model's own hard-linked copy ("model" in model.json; the
                                   folder it was evaluated in is "source"), safe from the pruning of old runs
    WORKDIR/eval/<run_id>/         the run's prediction files, when `evaluate_and_guard` generated them

A run is judged against the promoted model's scores, not the last run's, so a slow slide of small drops
cannot pass night after night. Metrics are compared in absolute points (the scorers' x100 figures):
    regression  some metric dropped by more than its tolerance: the promoted model stays, the run is marked
    promoted    no metric dropped at all (better or equal everywhere): the run's model becomes the promoted one
    kept        drops within tolerance only: not a regression, but the promoted model stays (it is better)
The first run, with nothing promoted yet, is promoted. Recording the same run id again returns the recorded
decision (and completes the promotion if a crash came between the history and the pointer).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError
from neva_core.io import atomic_file, commit_output, file_lock, lock_path, prune_outputs, write_json_atomic

HISTORY = Path("eval") / "history.jsonl"
PROMOTED = Path("promoted") / "model.json"
PROMOTED_COPY = "promoted/model-{}"  # + the digest's first 12 hex digits: an output name prune_outputs knows
HEADLINE_METRICS = {"coco": ("CIDEr", "BLEU-4", "ROUGE-L"), "mmmu": ("accuracy",), "textvqa": ("accuracy",)}
REGRESSION, PROMOTED_DECISION, KEPT = "regression", "promoted", "kept"


@dataclass(frozen=True)
class GuardDecision:
    run_id: str
    model: str
    model_digest: str
    scores: dict[str, float]  # "task/metric" -> points
    decision: str  # regression | promoted | kept
    baseline_run_id: str | None  # the promoted run this one was judged against
    regressions: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> baseline, score, drop
    recorded_at: float = 0.0

    @property
    def is_regression(self) -> bool:
        return self.decision == REGRESSION


def headline_scores(task: str, scores: Mapping[str, Any]) -> dict[str, float]:
    """The guarded metrics of one `neva eval score` result, named "task/metric"."""
    if task not in HEADLINE_METRICS:
        raise NevaError(f"unknown task {task!r}; choose one of {', '.join(HEADLINE_METRICS)}")
    missing = [m for m in HEADLINE_METRICS[task] if m not in scores]
    if missing:
        raise NevaError(f"the {task} scores lack {missing}; pass what `neva eval score --task {task}` prints")
    return {f"{task}/{metric}": float(scores[metric]) for metric in HEADLINE_METRICS[task]}


def read_history(workdir: Path | str) -> list[dict[str, Any]]:
    path = Path(workdir) / HISTORY
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise NevaError(f"{path}:{number} is not valid JSON ({exc}); restore the file from a backup") from None
    return records


def recorded_run(workdir: Path | str, run_id: str | None) -> dict[str, Any] | None:
    """Run `run_id`'s line of the history, or None."""
    return next((r for r in read_history(workdir) if r["run_id"] == run_id), None) if run_id else None


def read_promoted(workdir: Path | str) -> dict[str, Any] | None:
    """The promoted model's pointer ({"model", "model_digest", "scores", "run_id", ...}), or None."""
    path = Path(workdir) / PROMOTED
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NevaError(f"{path} is not valid JSON ({exc}); restore it from {Path(workdir) / HISTORY}") from None


def judge(scores: Mapping[str, float], baseline: Mapping[str, float] | None,
          tolerance: Mapping[str, float] | float = 0.0) -> tuple[str, dict[str, dict[str, float]]]:
    """(decision, regressions) of `scores` against the promoted model's `baseline` scores.

    `tolerance`: absolute points per metric ("task/metric" or "metric"), or one figure for all.
    """
    if baseline is None:
        return PROMOTED_DECISION, {}
    missing = sorted(set(baseline) - set(scores))
    if missing:
        raise NevaError(f"this run has no score for {missing}, which the promoted model was judged on; "
                        "evaluate the same tasks every run")
    regressions, dropped = {}, False
    for metric, previous in sorted(baseline.items()):
        drop = previous - scores[metric]
        dropped |= drop > 0
        allowed = _tolerance(tolerance, metric)
        if drop > allowed:
            regressions[metric] = {"baseline": previous, "score": scores[metric], "drop": drop, "tolerance": allowed}
    if regressions:
        return REGRESSION, regressions
    return (KEPT if dropped else PROMOTED_DECISION), {}


def _tolerance(tolerance: Mapping[str, float] | float, metric: str) -> float:
    if isinstance(tolerance, (int, float)):
        value = float(tolerance)
    else:
        value = float(tolerance.get(metric, tolerance.get(metric.split("/", 1)[-1], 0.0)))
    if value < 0:
        raise NevaError(f"the tolerance of {metric} must be at least 0 points, got {value}")
    return value


def record_run(workdir: Path | str, run_id: str, model_dir: Path | str, scores: Mapping[str, float], *,
               tolerance: Mapping[str, float] | float = 0.0) -> GuardDecision:
    """Judge a run's scores against the promoted model, append them to the history and promote if due."""
    from neva_core.eval.generate import model_digest
    from neva_core.model.trained import resolve_trained_folder

    workdir = Path(workdir)
    model = resolve_trained_folder(model_dir).resolve()  # a run's OUT is recorded as its final/ folder
    digest = model_digest(model)
    scores = {k: float(v) for k, v in scores.items()}
    with file_lock(lock_path(workdir / HISTORY), "the evaluation history"):
        history = read_history(workdir)
        earlier = next((r for r in history if r["run_id"] == run_id), None)
        if earlier is not None:
            if earlier["model_digest"] != digest or earlier["scores"] != scores:
                raise NevaError(f"run {run_id!r} is already in {workdir / HISTORY} with another model or other "
                                "scores; give this run its own id")
            decision = GuardDecision(**earlier)
        else:
            promoted = read_promoted(workdir)
            verdict, regressions = judge(scores, None if promoted is None else promoted["scores"], tolerance)
            decision = GuardDecision(run_id=run_id, model=str(model), model_digest=digest, scores=scores,
                                     decision=verdict, baseline_run_id=None if promoted is None else promoted["run_id"],
                                     regressions=regressions, recorded_at=time.time())
            with atomic_file(workdir / HISTORY, "w") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in [*history, asdict(decision)])
        if decision.decision == PROMOTED_DECISION and (read_promoted(workdir) or {}).get("run_id") != run_id:
            kept = _keep_promoted_copy(workdir, model, digest)
            write_json_atomic(workdir / PROMOTED, {"run_id": run_id, "model": str(kept), "source": decision.model,
                                                   "model_digest": digest, "scores": scores,
                                                   "promoted_at": time.time()})
            prune_outputs(kept, keep=1)  # the copy of the model promoted before
    return decision


def _keep_promoted_copy(workdir: Path, model: Path, digest: str) -> Path:
    """WORKDIR/promoted/model-<digest>/: the promoted model's files hard-linked (copied across filesystems),
    so pruning old training runs never deletes the promoted model."""
    from neva_core.eval.generate import model_digest
    from neva_core.model.trained import link_or_copy_tree

    def same_model(folder: Path) -> Path | None:
        return folder if model_digest(folder) == digest else None

    def build(tmp: Path) -> Path:
        link_or_copy_tree(model, tmp)
        return workdir / PROMOTED_COPY.format(digest[:12])

    return commit_output(workdir / PROMOTED_COPY.format(digest[:12]), reuse=same_model, build=build)


def evaluate_benchmarks(run_dir: Path | str, model_dir: Path | str, benchmarks: Mapping[str, Path], *,
                        batch: int = 8, limit: int | None = None,
                        max_new_tokens: int | None = None) -> dict[str, dict[str, Any]]:
    """Generate and score each benchmark ({task: folder}) into `run_dir`: {task: its scores}.

    Writes RUN_DIR/<task>.jsonl (the predictions) and RUN_DIR/<task>.scores.json. Generation resumes from
    the prediction files already there, so a nightly job killed midway is rerun as is.
    """
    from neva_core.eval import score
    from neva_core.eval.benchmarks import scoring_references
    from neva_core.eval.generate import Answerer, generate_predictions

    if not benchmarks:
        raise NevaError("name at least one benchmark to evaluate ({task: data folder})")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    answerer = Answerer(model_dir)
    results: dict[str, dict[str, Any]] = {}
    for task, data_dir in sorted(benchmarks.items()):
        pred = prediction_path(run_dir, task)
        generate_predictions(model_dir, task, data_dir, pred, batch=batch, limit=limit,
                             max_new_tokens=max_new_tokens, answerer=answerer)
        results[task] = score(task, pred, **scoring_references(task, Path(data_dir)))
        write_json_atomic(run_dir / f"{task}.scores.json", results[task])
    return results


def prediction_path(run_dir: Path, task: str) -> Path:
    return Path(run_dir) / f"{task}.jsonl"


def run_folder(workdir: Path | str, run_id: str) -> Path:
    """WORKDIR/eval/<run_id>/, for a run id that is one plain folder name (a flow run's id or name)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_id):
        raise NevaError(f"run id {run_id!r} must be letters, digits, '.', '_' or '-' (it names a folder under "
                        f"{Path(workdir) / 'eval'})")
    return Path(workdir) / "eval" / run_id


def evaluate_and_guard(workdir: Path | str, run_id: str, model_dir: Path | str, benchmarks: Mapping[str, Path], *,
                       tolerance: Mapping[str, float] | float = 0.0, batch: int = 8, limit: int | None = None,
                       max_new_tokens: int | None = None) -> GuardDecision:
    """`evaluate_benchmarks` into WORKDIR/eval/<run_id>/, then `record_run` of the headline scores."""
    results = evaluate_benchmarks(run_folder(workdir, run_id), model_dir, benchmarks, batch=batch, limit=limit,
                                  max_new_tokens=max_new_tokens)
    scores: dict[str, float] = {}
    for task, result in results.items():
        scores |= headline_scores(task, result)
    return record_run(workdir, run_id, model_dir, scores, tolerance=tolerance)


def describe_regression(decision: GuardDecision, workdir: Path | str) -> str:
    """What a regression is, for the failed run's message: each metric's drop and the model that stays."""
    promoted = read_promoted(workdir) or {}
    kept_model = promoted.get("model", "the promoted model")
    drops = "; ".join(f"{metric} {r['score']:.2f} against {r['baseline']:.2f} (a drop of {r['drop']:.2f} points, "
                      f"tolerance {r['tolerance']:.2f})" for metric, r in sorted(decision.regressions.items()))
    source = f" (from {promoted['source']})" if promoted.get("source") else ""
    return (f"evaluation run {decision.run_id!r}: the model {decision.model} scores below the promoted model of run "
            f"{decision.baseline_run_id!r}: {drops}. {kept_model}{source} stays the promoted model; the scores are "
            f"recorded in {Path(workdir) / HISTORY}")


def check_recorded_decision(workdir: Path | str, run_id: str, model_digest: str, scores: Mapping[str, float],
                            decision: str, tolerance: Mapping[str, float] | float = 0.0) -> None:
    """NevaError unless run `run_id`'s recorded decision still holds: its history line is there with these
    scores, and judging them against today's promoted model gives the same decision (a promoted run's model
    is still the promoted one). A cached evaluation is only reused when this passes."""
    recorded = recorded_run(workdir, run_id)
    if recorded is None or recorded["model_digest"] != model_digest or recorded["scores"] != dict(scores):
        raise NevaError(f"run {run_id!r} is not in {Path(workdir) / HISTORY} with these scores")
    promoted = read_promoted(workdir)
    if decision == PROMOTED_DECISION:
        if promoted is None or promoted["model_digest"] != model_digest:
            raise NevaError(f"the model of run {run_id!r} is no longer the promoted one")
        return
    verdict, _ = judge(scores, None if promoted is None else promoted["scores"], tolerance)
    if verdict != decision:
        raise NevaError(f"run {run_id!r} was {decision!r} against the model promoted then; today it would be "
                        f"{verdict!r}")
