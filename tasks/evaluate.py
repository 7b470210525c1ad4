"""The `evaluate` task: a trained model's scores on the configured benchmarks, shown as artifacts, judged by
the nightly regression guard (neva_core.eval.guard).

With the guard on, a drop beyond the tolerance fails the task (after the scores are recorded) and the
promoted model stays; a better or equal model becomes WORKDIR/promoted/model.json and a `promoted-model`
artifact.

Caching: the key is the model folder's path and content (its manifest's digest), the benchmark folders'
fingerprints, the EvaluationConfig, the workdir and the code version, not the run id, so the same model on
the same data is Cached on the next night. The cached result names the run that recorded those scores in
the history; a rerun adds no history line. The hit is only trusted while that line is still in the history
and its decision still holds against today's promoted model (a promoted model still promoted; a kept one
still within tolerance of the promoted one); otherwise the task runs again and records this run. A
regression fails the task, so it is never cached: a worse model fails every night it is evaluated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext

from neva_core.errors import NevaError
from neva_core.eval.generate import model_digest
from neva_core.eval.guard import (
    GuardDecision,
    PROMOTED_DECISION,
    check_recorded_decision,
    describe_regression,
    evaluate_benchmarks,
    headline_scores,
    prediction_path,
    read_promoted,
    record_run,
    recorded_run,
    run_folder,
)
from neva_core.eval.report import promoted_markdown, samples_markdown, score_rows
from neva_core.eval.settings import EvaluationConfig
from neva_core.model.trained import resolve_trained_folder
from tasks.caching import StageCache

log = logging.getLogger(__name__)
SAMPLES_SHOWN = 3  # per benchmark, in the samples artifact


@dataclass
class EvaluationCache(StageCache):
    """StageCache over the model's content and the benchmarks, without the run id (see the module doc)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        try:
            folder = resolve_trained_folder(inputs["model_dir"]).resolve()
            digest = model_digest(folder)
            evaluation = EvaluationConfig.model_validate(inputs["evaluation"])
        except (NevaError, ValueError) as exc:  # the task itself then fails with the full message
            log.warning("evaluate: cannot key the cache (%s); running without it", exc)
            return None
        keyed = {"model": str(folder), "model_digest": digest, "workdir": Path(inputs["workdir"]).resolve(),
                 "evaluation": evaluation.model_dump() | {"benchmarks": _resolved(evaluation)}}
        return super().compute_key(task_ctx, keyed, flow_parameters, **kwargs)


def _evaluation_still_true(result: dict[str, Any]) -> None:
    for path in result["predictions"].values():
        if not Path(path).is_file():
            raise NevaError(f"the predictions {path} are gone")
    if result["guard"]:
        check_recorded_decision(result["workdir"], result["run_id"], result["model_digest"], result["scores"],
                                result["decision"], result["tolerance"])


@task(
    name="evaluate",
    cache_policy=EvaluationCache(stage="evaluate", output_params=("workdir",), outputs_ok=_evaluation_still_true),
    persist_result=True,
)
def evaluate_task(model_dir: Path, evaluation: EvaluationConfig, workdir: Path, run_id: str) -> dict[str, Any]:
    """Generate and score every benchmark of `evaluation` into WORKDIR/eval/<run_id>/, publish the scores
    and a few samples as artifacts, and (guard on) record the run and promote or fail it."""
    evaluation = EvaluationConfig.model_validate(evaluation)
    benchmarks = _resolved(evaluation)
    for task_name, folder in benchmarks.items():
        if not folder.is_dir():
            raise NevaError(f"evaluation.benchmarks.{task_name}: {folder} is not a folder; give the {task_name} "
                            "benchmark in its public layout (`neva eval fixtures DIR` writes small ones)")
    workdir, model = Path(workdir).resolve(), resolve_trained_folder(model_dir).resolve()
    run_dir = run_folder(workdir, run_id)
    results = evaluate_benchmarks(run_dir, model, benchmarks, batch=evaluation.batch, limit=evaluation.limit,
                                  max_new_tokens=evaluation.max_new_tokens)
    scores = {name: value for task_name, result in results.items()
              for name, value in headline_scores(task_name, result).items()}
    decision = record_run(workdir, run_id, model, scores, tolerance=evaluation.tolerance) if evaluation.guard else None
    _publish(run_id, results, benchmarks, run_dir, workdir, decision)
    logger = get_run_logger()
    logger.info("scores of %s: %s", model, ", ".join(f"{k} {v:.2f}" for k, v in sorted(scores.items())))
    if decision is not None and decision.is_regression:
        raise NevaError(describe_regression(decision, workdir))
    if decision is not None:
        logger.info("%s (judged against run %s); the promoted model: %s", decision.decision, decision.baseline_run_id,
                    read_promoted(workdir)["model"])
    return {
        "run_id": run_id, "model": str(model), "model_digest": model_digest(model), "workdir": str(workdir),
        "scores": scores, "results": results,
        "predictions": {t: str(prediction_path(run_dir, t)) for t in sorted(benchmarks)},
        "guard": evaluation.guard, "tolerance": evaluation.tolerance,
        "decision": None if decision is None else decision.decision,
        "baseline_run_id": None if decision is None else decision.baseline_run_id,
        "promoted": read_promoted(workdir) if evaluation.guard else None,
    }


def _publish(run_id: str, results: dict[str, dict[str, Any]], benchmarks: dict[str, Path], run_dir: Path,
             workdir: Path, decision: GuardDecision | None) -> None:
    baseline = None
    if decision is not None:
        baseline = (recorded_run(workdir, decision.baseline_run_id) or {}).get("scores", {})
    verdict = "" if decision is None else f": {decision.decision}"
    create_table_artifact(score_rows(results, baseline, None if decision is None else decision.regressions),
                          key="evaluation-scores", description=f"evaluation scores of run {run_id}{verdict}")
    create_markdown_artifact(samples_markdown(benchmarks, run_dir, SAMPLES_SHOWN, f"Evaluation samples, run {run_id}"),
                             key="evaluation-samples", description=f"generations of run {run_id} beside the references")
    if decision is not None and decision.decision == PROMOTED_DECISION:
        create_markdown_artifact(promoted_markdown(read_promoted(workdir)), key="promoted-model",
                                 description=f"the promoted model, from run {run_id}")


def _resolved(evaluation: EvaluationConfig) -> dict[str, Path]:
    return {task_name: Path(folder).resolve() for task_name, folder in sorted(evaluation.benchmarks.items())}
