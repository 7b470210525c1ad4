"""The demo's pipeline configuration: the real flow, pointed at synthetic fixtures instead of the Hub,
training with the tiny presets (configs/tiny-pretrain.yaml, configs/tiny-finetune.yaml).

The fixtures' captions are determined by the image ("a red circle"), so a model that learned them answers
the held-out records' questions with their captions: the demo's accuracy check (neva_core.eval.heldout).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from neva_core.config import DatasetConfig, ModelConfig, PipelineConfig, TrainGroup, preset_params
from neva_core.eval.fixtures import make_eval_fixtures
from neva_core.eval.heldout import HeldoutResult, heldout_captions
from neva_core.eval.settings import EvaluationConfig
from neva_core.fingerprint import code_version, output_folder
from neva_core.fixtures import FORMAT_VERSION as FIXTURES_FORMAT
from neva_core.fixtures import Fixtures, make_fixtures
from neva_core.io import MANIFEST_NAME, write_json_atomic

DEMO_IMAGES = 2048  # what the tiny presets learn from (a quarter more are held out)
DEMO_TP = 1
# At most 50 pretrain steps: the deployment check (`prefect deployment run neva/pretrain --param demo=true`)
# trains this stage, and it must stay short. The projector still aligns enough for the finetune to reach 90%.
DEMO_PRETRAIN_STEPS = 50
DEMO_FINETUNE_STEPS = 2200  # the tiny-finetune preset's: 93.8% held out (tests/test_train_tiny_preset.py)


def demo_fixtures(workdir: Path, *, images: int = DEMO_IMAGES, seed: int = 0, make: bool = True) -> Fixtures:
    # The format version in the name: fixtures of an older format in an old demo folder stay where they are.
    root = workdir.resolve() / "fixtures" / f"seed{seed}-images{images}-v{FIXTURES_FORMAT}"
    return make_fixtures(root, seed=seed, images=images) if make else Fixtures.at(root)


def demo_config(workdir: Path, *, images: int = DEMO_IMAGES, seed: int = 0, tp: int = DEMO_TP,
                pretrain_steps: int = DEMO_PRETRAIN_STEPS, finetune_steps: int = DEMO_FINETUNE_STEPS,
                make: bool = True) -> PipelineConfig:
    """Build (or reuse) the fixtures under `workdir/fixtures/seed<S>-images<N>-v<format>` and a config that reads them
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
    # Small COCO / MMMU / TextVQA benchmarks in their public layouts, answered by the drawn shapes.
    eval_root = workdir / "fixtures" / f"eval-seed{seed}"
    if make:
        make_eval_fixtures(eval_root, seed=seed)
    evaluation = EvaluationConfig(benchmarks={task: eval_root / task for task in ("coco", "mmmu", "textvqa")},
                                  batch=24)
    return PipelineConfig(workdir=workdir, dataset=dataset, finetune_dataset=finetune_dataset, model=model,
                          train=train, evaluation=evaluation)


def demo_accuracy(export_dir: Path, fixtures: Fixtures, workdir: Path) -> HeldoutResult:
    """The held-out caption accuracy of the export (neva_core.eval.heldout), kept in WORKDIR/eval/ under a name
    made from the export's manifest, the held-out data and the code, so a rerun on the same export reuses it."""
    record = output_folder(workdir.resolve() / "eval", "heldout", export=export_dir / MANIFEST_NAME,
                           heldout=fixtures.heldout_json, images=fixtures.pretrain_zip, code=code_version())
    record = record.with_name(record.name + ".json")
    if record.is_file():
        return HeldoutResult(**json.loads(record.read_text()))
    result = heldout_captions(export_dir, fixtures.heldout_json, fixtures.pretrain_zip)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, asdict(result))
    return result
