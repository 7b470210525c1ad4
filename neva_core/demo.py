"""The demo's pipeline configuration: the real flow, pointed at synthetic fixtures instead of the Hub."""

from __future__ import annotations

from pathlib import Path

from neva_core.config import DatasetConfig, ModelConfig, PipelineConfig
from neva_core.fixtures import make_fixtures


def demo_config(workdir: Path, *, images: int = 256, seed: int = 0, tp: int = 2) -> PipelineConfig:
    """Build (or reuse) the fixtures under `workdir/fixtures/seed<S>-images<N>` and a config that reads them
    as local sources. Other --images or --seed values get their own fixtures folder, so a rerun with them
    against an existing demo folder computes the stages they change."""
    workdir = workdir.resolve()
    fixtures = make_fixtures(workdir / "fixtures" / f"seed{seed}-images{images}", seed=seed, images=images)
    dataset = DatasetConfig(
        name="synthetic-pretrain",
        json_source=str(fixtures.pretrain_json),
        images_source=str(fixtures.pretrain_zip),
        maxcount=64,  # several shards even from a few hundred images
        val_fraction=0.1,
    )
    model = ModelConfig(llm_source=str(fixtures.llm_dir), vision_source=str(fixtures.vision_dir), tp=tp, dtype="fp32")
    return PipelineConfig(workdir=workdir, dataset=dataset, model=model)
