"""The training task: `neva train` as a subprocess that owns its process group, its lines in the task's
log, a progress artifact as it trains and the loss curve, final metrics and output links at the end.

A killed or crashed trainer is retried, and the retry resumes from the newest committed checkpoint (the
trainer does that by itself when rerun on the same OUT). Bad input (the trainer's exit status 2) fails at
once: a retry would fail the same way.
"""

from __future__ import annotations

import re
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from neva_core.errors import NevaError
from neva_core.io import MANIFEST_NAME, sha256_file, write_json_atomic
from neva_core.model.trained import read_trained_config
from neva_core.process import run_command
from neva_core.train.config import TrainConfig
from neva_core.train.k8s import PyTorchJobSettings, training_job
from tasks.artifacts import TrainingProgress, artifact_key, loss_curve_artifact, metrics_table_artifact, \
    output_link_artifacts
from tasks.caching import StageCache, check_same_manifest
from tasks.kubernetes import run_pytorchjob_logged
from tasks.process import run_logger

EXIT_BAD_INPUT = 2  # `neva train` refused its input before starting any process
JOB_POLL_SECONDS = 5.0  # how often a PyTorchJob's conditions are read
# Lines of the trainer's rank 0 (neva_core.train.metrics and loop) that tell how far it is.
_STEP_LINE = re.compile(r"\bstep (?P<step>\d+) loss ")
_RESUMED_LINE = re.compile(r"\bresuming from step (?P<step>\d+)")
_FINISHED_LINE = re.compile(r"\b(?:finished|already finished) at step (?P<step>\d+)")


class TrainerFailed(NevaError):
    """The trainer died or exited non-zero for a reason a rerun may not have (a kill, a crash)."""


class TrainingInputRefused(NevaError):
    """The trainer refused its input (exit status 2): a retry would fail the same way."""


def retry_unless_bad_input(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry a killed or crashed trainer (the retry resumes), never refused input."""
    return not isinstance(state.data, TrainingInputRefused)


@dataclass
class TrainCache(StageCache):
    """StageCache keyed by the whole TrainConfig: its input paths by fingerprint, its OUT by name only
    (OUT is the result: fingerprinting it would change the key once it is written)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        config: TrainConfig = inputs["config"]
        keyed = {**config.model_dump(), "out": str(config.out)}
        # Where it runs counts too: a PyTorchJob's nodes and processes make another topology.
        kubernetes = inputs.get("kubernetes")
        return super().compute_key(task_ctx, {"config": keyed, "kubernetes": kubernetes}, flow_parameters, **kwargs)


def final_complete(result: dict[str, Any]) -> None:
    """OUT/final is a complete trained-model folder (manifest and sizes), the one this result describes."""
    folder, _, _ = read_trained_config(result["final"])
    check_same_manifest(folder, result["manifest_sha256"], "trained model")


class ProgressFromLines:
    """Updates a progress artifact from the trainer's step lines; returns each line unchanged to the log."""

    def __init__(self, progress: TrainingProgress | None, log: Callable[[str], None]) -> None:
        self.progress, self.log, self.step = progress, log, 0

    def __call__(self, line: str) -> None:
        self.log(line)
        for pattern, what in ((_STEP_LINE, "step"), (_RESUMED_LINE, "resumed at step"),
                              (_FINISHED_LINE, "finished at step")):
            if (match := pattern.search(line)) is not None:
                self.step = int(match["step"])
                if self.progress is not None:
                    self.progress.update(self.step, f"{what} {self.step} of {self.progress.total_steps}")
                return


def train_command(config_file: Path) -> list[str]:
    return [sys.executable, "-m", "neva_core.cli", "train", "--config", str(config_file)]


def run_trainer(config: TrainConfig, on_line: Callable[[str], None],
                kubernetes: PyTorchJobSettings | None = None) -> int:
    """`neva train` on `config` (passed as a config file), each output line to `on_line`; its exit status.
    With `kubernetes`, a PyTorchJob on the cluster runs it (run_on_kubernetes)."""
    if kubernetes is not None:
        return run_on_kubernetes(config, kubernetes, on_line)
    with tempfile.TemporaryDirectory(prefix="neva-train-") as scratch:
        config_file = Path(scratch) / "train.json"
        config_file.write_text(config.model_dump_json())
        return run_command(train_command(config_file), on_line)


def run_on_kubernetes(config: TrainConfig, settings: PyTorchJobSettings, on_line: Callable[[str], None]) -> int:
    """The run as a Kubeflow PyTorchJob whose pods read the TrainConfig from OUT's sibling `<OUT>.train.json`
    on the claim; the master's lines go to `on_line`. A failed job is a TrainerFailed (the retry's new job
    resumes from the last committed checkpoint); a cancelled run deletes the job (run_pytorchjob)."""
    config_file = config.out.with_name(f"{config.out.name}.train.json")
    # A new name per attempt: a failed job is kept for inspection until its TTL.
    name = re.sub(r"[^a-z0-9-]+", "-", f"neva-{config.out.name}".lower())[:48].strip("-")
    job = training_job(config, settings, config_file, f"{name}-{uuid.uuid4().hex[:6]}")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_file, config.model_dump(mode="json"))
    try:
        run_pytorchjob_logged(job, poll_seconds=JOB_POLL_SECONDS, on_line=on_line)
    except NevaError as exc:
        raise TrainerFailed(f"{exc}; a retry starts a new job that resumes from the last committed checkpoint") from None
    return 0


def final_metrics(config: TrainConfig) -> dict[str, Any]:
    """What the finished run's OUT tells: final step, best val loss and its step, last samples/s."""
    import csv

    folder, _, document = read_trained_config(config.out)
    provenance = document.get("provenance", {})
    samples_per_s = None
    metrics_file = config.out / "metrics.csv"
    if metrics_file.is_file():
        with open(metrics_file, newline="") as stream:
            rates = [row["samples_per_s"] for row in csv.DictReader(stream) if row.get("samples_per_s")]
        samples_per_s = float(rates[-1]) if rates else None
    return {
        "out": str(config.out), "final": str(folder), "step": int(provenance.get("steps", config.max_steps)),
        "best_val_loss": provenance.get("best_val_loss"), "best_step": provenance.get("best_val_step"),
        "samples_per_s": samples_per_s, "manifest_sha256": sha256_file(folder / MANIFEST_NAME),
    }


def publish_results(config: TrainConfig, result: dict[str, Any]) -> None:
    key = artifact_key("neva", config.stage)
    loss_png = config.out / "loss.png"
    if loss_png.is_file():
        loss_curve_artifact(loss_png.read_bytes(), key=artifact_key(key, "loss"),
                            description=f"{config.stage} loss (train and val), {config.out}")
    best = result["best_val_loss"]
    metrics_table_artifact({
        "steps": result["step"],
        "best val loss": "n/a" if best is None else round(best, 5),
        "best val step": "n/a" if result["best_step"] is None else result["best_step"],
        "samples/s (last interval)": "n/a" if result["samples_per_s"] is None else round(result["samples_per_s"], 2),
    }, key=artifact_key(key, "metrics"), description=f"{config.stage}: final metrics")
    output_link_artifacts({"run": config.out, "model": Path(result["final"]), "metrics": config.out / "metrics.csv"},
                          key_prefix=artifact_key(key, "output"))


@task(
    name="train",
    cache_policy=TrainCache(stage="train", outputs_ok=final_complete),
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_bad_input,
    persist_result=True,
)
def train_task(config: TrainConfig, kubernetes: PyTorchJobSettings | None = None) -> dict[str, Any]:
    """Run `neva train` on `config` (resuming what an earlier attempt committed), here or as a PyTorchJob on
    the cluster (`kubernetes`); the finished run's metrics."""
    in_prefect = TaskRunContext.get() is not None
    progress = TrainingProgress(config.max_steps, key=artifact_key("neva", config.stage, "progress"),
                                description=f"{config.stage}: steps done") if in_prefect else None
    status = run_trainer(config, ProgressFromLines(progress, run_logger().info), kubernetes)
    if status == EXIT_BAD_INPUT:
        raise TrainingInputRefused(f"neva train refused the {config.stage} input (exit status 2); its message is "
                                   "in the log above. Fix the configuration or the inputs and run again")
    if status != 0:
        raise TrainerFailed(f"neva train ({config.stage}, {config.out}) ended with status {status}; a retry "
                            "resumes from its last committed checkpoint")
    result = final_metrics(config)
    if in_prefect:
        publish_results(config, result)
    return result

