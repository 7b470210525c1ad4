"""The artifacts a run leaves in the Prefect UI: training progress, the loss curve, final metrics, links to
outputs, and every flow run's summary of its stages. Keys are stable per purpose, so the Artifacts page
shows each one's history across runs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect import Task

from neva_core.summary import StageOutcome, png_data_uri, status_of, summary_markdown

R = TypeVar("R")

def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) from free text such as a run name."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


class TrainingProgress:
    """A progress artifact of steps done out of `total_steps`, updated as a run goes."""

    def __init__(self, total_steps: int, key: str | None = None, description: str | None = None) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: a progress artifact needs at least one step")
        self.total_steps = total_steps
        self.artifact_id: UUID = create_progress_artifact(0.0, key=key, description=description)

    def update(self, step: int, description: str | None = None) -> float:
        """Record `step` steps done; returns the percentage shown."""
        percent = round(100.0 * min(max(step, 0), self.total_steps) / self.total_steps, 2)
        update_progress_artifact(self.artifact_id, percent,
                                 description=description or f"step {step} of {self.total_steps}")
        return percent


def loss_curve_artifact(png: bytes, key: str | None = None, description: str | None = None) -> UUID:
    """An image artifact of a PNG embedded as a data URI (no file server needed to see it)."""
    return create_image_artifact(png_data_uri(png), key=key, description=description)


def metrics_table_artifact(metrics: Mapping[str, float | int | str], key: str | None = None,
                           description: str | None = None) -> UUID:
    """A two-column table, one metric a row, in the order given."""
    rows = [{"metric": name, "value": value} for name, value in metrics.items()]
    return create_table_artifact(rows, key=key, description=description)


def output_link_artifacts(outputs: Mapping[str, str | Path], key_prefix: str | None = None) -> list[UUID]:
    """One link artifact per output: local paths become file:// URIs, URLs stay as they are."""
    ids = []
    for name, location in outputs.items():
        link = location.resolve().as_uri() if isinstance(location, Path) else location
        key = artifact_key(key_prefix, name) if key_prefix else None
        ids.append(create_link_artifact(link, link_text=f"{name}: {location}", key=key,
                                        description=f"output: {name}"))
    return ids


class StageLog:
    """The outcome of each stage as the flow runs it, taken from the states the flow itself sees (the
    server learns task states asynchronously, so reading them back mid-run would be stale)."""

    def __init__(self) -> None:
        self.outcomes: list[StageOutcome] = []

    def call(self, stage_task: Task[..., R], *args: Any, stage: str | None = None,
             output: Callable[[R], object] = str, **kwargs: Any) -> R:
        """Call a task, record its outcome and return its result (raising what it raised)."""
        started = time.monotonic()
        state = stage_task(*args, return_state=True, **kwargs)
        seconds = time.monotonic() - started
        try:
            result = state.result()
        except BaseException:
            self.add(stage or stage_task.name, state.name, seconds)
            raise
        self.add(stage or stage_task.name, state.name, seconds, str(output(result)))
        return result

    def add(self, stage: str, state_name: str, seconds: float, output: str = "") -> None:
        """Record a stage run some other way (a submitted task: its future's state and the time waited)."""
        self.outcomes.append(StageOutcome(stage, status_of(state_name), seconds, output))


def run_summary_artifact(outcomes: Sequence[StageOutcome], key: str | None = "neva-run-summary",
                         title: str = "Run summary") -> UUID:
    """The summary as a markdown artifact of the current flow run (written by the flow itself, so a
    fully cached run has one too)."""
    return create_markdown_artifact(summary_markdown(outcomes, title), key=key, description=title)
