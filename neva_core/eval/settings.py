"""The evaluation stage's parameters: which benchmarks, how much of them, how to decode, and the guard.

`PipelineConfig.evaluation` holds one; the flow's `evaluate` task (tasks/evaluate.py) takes it. Nothing here
imports Prefect or torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neva_core.eval.guard import HEADLINE_METRICS

Task = Literal["coco", "mmmu", "textvqa"]


class EvaluationConfig(BaseModel):
    """Benchmarks to evaluate a trained model on after export, and the nightly regression guard.

    tolerance: the drop, in points of the scorers' x100 figures, that a guarded metric may show against the
    promoted model before the run counts as a regression; one figure for every metric, or per metric keyed
    "task/metric" ("coco/CIDEr") or "metric" ("accuracy": MMMU's and TextVQA's), 0 for metrics not named.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmarks: dict[Task, Path] = Field(
        min_length=1,
        description="benchmark folders in their public layouts, by task (as `neva eval fixtures` writes them)",
    )
    limit: int | None = Field(None, ge=1, description="only each benchmark's first N samples (default: all)")
    batch: int = Field(8, ge=1, description="samples per forward pass")
    max_new_tokens: int | None = Field(None, ge=1, description="most tokens per answer (default: per task)")
    tolerance: float | dict[str, float] = Field(
        0.0, description="allowed drop in points against the promoted model: one figure, or per metric")
    guard: bool = Field(True, description="record the scores and promote only a model no worse than the promoted one")

    @field_validator("tolerance")
    @classmethod
    def _non_negative(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        figures = value.values() if isinstance(value, dict) else [value]
        if any(figure < 0 for figure in figures):
            raise ValueError(f"tolerances are allowed drops in points and must be at least 0, got {value}")
        return value

    @model_validator(mode="after")
    def _tolerances_name_guarded_metrics(self) -> EvaluationConfig:
        if not isinstance(self.tolerance, dict):
            return self
        guarded = guarded_metrics(self.benchmarks)
        known = set(guarded) | {metric.split("/", 1)[1] for metric in guarded}
        unknown = sorted(set(self.tolerance) - known)
        if unknown:
            raise ValueError(f"tolerance names {unknown}, which no benchmark here is judged on; "
                             f"use one of {sorted(known)}")
        return self


def guarded_metrics(benchmarks: dict[str, Path]) -> list[str]:
    """The "task/metric" names the guard compares for these benchmarks."""
    return [f"{task}/{metric}" for task in sorted(benchmarks) for metric in HEADLINE_METRICS[task]]
