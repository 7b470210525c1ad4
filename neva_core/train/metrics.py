"""Rank 0's training metrics: plain log lines, OUT/metrics.csv, TensorBoard (OUT/tensorboard/) and OUT/loss.png.

TensorBoard tags: train/<column>, val/loss, and zero_shot/<task>_<metric> (e.g. zero_shot/coco_cider).

On resume from step N the CSV keeps its rows up to N (later ones were never committed) and TensorBoard
purges the events after N, so a resumed run's curves are those of an uninterrupted one.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import torch

from neva_core.train.zero_shot import COLUMNS as ZERO_SHOT_COLUMNS

log = logging.getLogger("neva_core.train")

# The zero-shot scores (--eval-every) get a column per task, filled at the evaluated steps.
COLUMNS = ("step", "loss", "val_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "mfu",
           *ZERO_SHOT_COLUMNS.values())
TENSORBOARD_TAGS = {"val_loss": "val/loss"} | {column: f"zero_shot/{column}" for column in ZERO_SHOT_COLUMNS.values()}

# Peak dense bf16 FLOP/s of common accelerators, for the MFU estimate (NEVA_PEAK_TFLOPS overrides it).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops() -> float | None:
    """This device's peak FLOP/s, or None where unknown (CPU): the MFU column is then left empty."""
    if os.environ.get("NEVA_PEAK_TFLOPS"):
        return float(os.environ["NEVA_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def step_flops(llm_params: int, llm_trained: bool, vision_params: int, projector_params: int,
               tokens: int, images: int, image_tokens: int) -> float:
    """FLOPs of one optimizer step by the usual estimate: 2 per parameter and token forward, 2 more backward
    for the activation gradients through the LLM, and 2 more for weight gradients of what is trained; the
    frozen vision tower runs forward only. Attention's sequence-quadratic term is left out."""
    llm = tokens * llm_params * (6 if llm_trained else 4)
    projector = images * image_tokens * projector_params * 6
    vision = images * image_tokens * vision_params * 2
    return float(llm + projector + vision)


class Metrics:
    """Rank 0's sink; other ranks never make one."""

    def __init__(self, out: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        self.csv_path = out / "metrics.csv"
        self.png_path = out / "loss.png"
        self.rows = self._kept_rows(resumed_step)
        self._rewrite_csv()
        self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1)

    def _kept_rows(self, resumed_step: int) -> list[dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with open(self.csv_path, newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["step"]) <= resumed_step]

    def _rewrite_csv(self) -> None:
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def record(self, step: int, **values: float | None) -> None:
        row = {"step": str(step)} | {key: "" if value is None else f"{value:.6g}" for key, value in values.items()}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)
        for key, value in values.items():
            if value is not None:
                self.tensorboard.add_scalar(TENSORBOARD_TAGS.get(key, f"train/{key}"), value, step)
        log.info("step %d %s", step, " ".join(f"{key} {row[key]}" for key in COLUMNS[1:] if row.get(key)))

    def plot(self) -> None:
        """Train and val loss against step, into OUT/loss.png."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        for key, label in (("loss", "train"), ("val_loss", "val")):
            points = [(int(row["step"]), float(row[key])) for row in self.rows if row.get(key)]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, label=label, marker="o" if key == "val_loss" else None)
        axes.set_xlabel("step")
        axes.set_ylabel("loss (token-weighted)")
        axes.legend()
        figure.tight_layout()
        tmp = self.png_path.with_name(".loss.tmp.png")
        figure.savefig(tmp)
        plt.close(figure)
        os.replace(tmp, self.png_path)
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()

