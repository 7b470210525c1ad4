"""The demo's pipeline configuration: the real flow, pointed at synthetic fixtures instead of the Hub,
training with the tiny presets (configs/tiny-pretrain.yaml, configs/tiny-finetune.yaml).

The fixtures' captions are determined by the image ("a red circle"), so a model that learned them answers
the held-out records' questions with their captions: the demo's accuracy check (neva_core.eval.heldout).
"""

from __future__ import annotations

from pathlib import Path

from neva_core.config import DatasetConfig, ModelConfig, PipelineConfig, TrainGroup, preset_params
from neva_core.fixtures import Fixtures, make_fixtures

DEMO_IMAGES = 2048  # what the tiny presets learn from (a quarter more are held out)
DEMO_TP = 1
# At most 50 pretrain steps: the deployment check (`prefect deployment run neva/pretrain --param demo=true`)
# trains this stage, and it must stay short. The projector still aligns enough for the finetune to reach 90%.
DEMO_PRETRAIN_STEPS = 50
DEMO_FINETUNE_STEPS = 2400


def demo_fixtures(workdir: Path, *, images: int = DEMO_IMAGES, seed: int = 0, make: bool = True) -> Fixtures:
    root = workdir.resolve() / "fixtures" / f"seed{seed}-images{images}"
    return make_fixtures(root, seed=seed, images=images) if make else Fixtures.at(root)


def demo_config(workdir: Path, *, images: int = DEMO_IMAGES, seed: int = 0, tp: int = DEMO_TP,
                pretrain_steps: int = DEMO_PRETRAIN_STEPS, finetune_steps: int = DEMO_FINETUNE_STEPS,
                make: bool = True) -> PipelineConfig:
    """Build (or reuse) the fixtures under `workdir/fixtures/seed<S>-images<N>` and a config that reads them
    as local sources (`make=False`: only the paths, for naming a run). Other --images or --seed values get
    their own fixtures folder, so a rerun with them against an existing demo folder computes the stages they
    change. Pretraining learns from the captions; finetuning too, through its conversation template (the
    held-out check asks the same kind of question)."""
    workdir = workdir.resolve()
    fixtures = demo_fixtures(workdir, images=images, seed=seed, make=make)
    dataset = DatasetConfig(
        name="synthetic-pretrain",
        json_source=str(fixtures.pretrain_json),
        images_source=str(fixtures.pretrain_zip),
        maxcount=64,  # several shards even from a few hundred images
        val_fraction=0.1,
    )
    finetune_dataset = dataset.model_copy(update={"name": "synthetic-captions"})
    model = ModelConfig(llm_source=str(fixtures.llm_dir), vision_source=str(fixtures.vision_dir), tp=tp, dtype="fp32")
    pretrain_save = max(1, pretrain_steps // 2)
    finetune = preset_params("tiny-finetune", max_steps=finetune_steps, nproc=tp)  # validation at least at the end
    train = TrainGroup(
        pretrain=preset_params("tiny-pretrain", max_steps=pretrain_steps, save_every=pretrain_save,
                               val_every=pretrain_save, nproc=tp),
        finetune=finetune.model_copy(update={"val_every": min(finetune.val_every, finetune_steps),
                                             "save_every": min(finetune.save_every, finetune_steps)}),
    )
    return PipelineConfig(workdir=workdir, dataset=dataset, finetune_dataset=finetune_dataset, model=model,
                          train=train)
