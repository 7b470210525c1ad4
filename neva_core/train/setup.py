"""What the training loop is built from: the model on this rank, the DeepSpeed engine, the loaders, and
the trained-model folder written at the end. The loop itself (train/loop.py) only calls these.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from neva_core.checkpoint.layout import Provenance, read_native_config, save_native
from neva_core.model.partition import merge_tensor, tensor_names
from neva_core.data.loader import EncodedRecord, LoaderConfig, RawRecord, TemplateEncoder, TrainLoader, ValLoader
from neva_core.data.preprocess import ImageProcessor
from neva_core.data.templates import SampleMismatch, encode_conversation
from neva_core.errors import NevaError
from neva_core.io import temp_name
from neva_core.model.llm import NevaLLM
from neva_core.model.neva import NevaModel, Stage
from neva_core.model.trained import (
    LLM_DIR,
    TrainedModelConfig,
    assemble_model,
    load_trained_model,
    read_trained_config,
    save_trained_model,
)
from neva_core.model.vision import VisionTower
from neva_core.train.config import BatchPlan, TrainConfig
from neva_core.train.deepspeed_config import deepspeed_config
from neva_core.train.parallel import ModelParallelUnit
from neva_core.train.preflight import RunInputs

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Loader worker processes per rank: decoding and templating run there, so the main process only trains.
LOADER_WORKERS = 1


@dataclass(frozen=True)
class LoaderWorkerEncoder:
    """The template encoder as the loader's worker processes run it. A scheduler's SIGTERM reaches every
    process of the job, and torch's loader workers die of it, which would fail the save the trainer is
    about to make: a worker ignores SIGTERM from its first sample on (the trainer ends it on exit)."""

    encode: TemplateEncoder
    trainer_pid: int

    def __call__(self, record: RawRecord) -> EncodedRecord:
        if os.getpid() != self.trainer_pid and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return self.encode(record)


class TrainingModule(nn.Module):
    """The module DeepSpeed wraps: one micro batch in, this rank's (loss sum, supervised token count) out."""

    def __init__(self, neva: NevaModel) -> None:
        super().__init__()
        self.neva = neva

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.neva.loss_terms(input_ids, images, labels, attention_mask)


def tp_group_of(mpu: ModelParallelUnit) -> dist.ProcessGroup | None:
    """The LLM's tensor-parallel group (None at TP=1: the model then needs no collective at all)."""
    return mpu.tp_group if mpu.layout.tp > 1 else None


def model_settings(config: TrainConfig, inputs: RunInputs) -> TrainedModelConfig:
    return TrainedModelConfig(family=inputs.llm_config.family, template=config.template,
                              projector_type=config.projector, image_size=inputs.image_size,
                              patch_size=inputs.patch_size, image_token_id=inputs.tokenizer.image_token_id)


def build_model(config: TrainConfig, inputs: RunInputs, mpu: ModelParallelUnit) -> NevaModel:
    """This rank's NeVA model, its stage set: from --init (its LLM and projector) or from --llm with a
    projector drawn from --seed (the same on every rank)."""
    dtype = TORCH_DTYPES[config.dtype]
    tp_group = tp_group_of(mpu)
    if config.init is not None:
        model = load_trained_model(config.init, tp_group, dtype=dtype,
                                   activation_checkpointing=config.activation_checkpointing)
        model.image_token_id = inputs.tokenizer.image_token_id
    else:
        llm = NevaLLM.from_rank_file(config.llm, tp_group, dtype=dtype,
                                     activation_checkpointing=config.activation_checkpointing)
        vision = VisionTower.from_folder(config.vision, dtype=dtype)
        model = assemble_model(llm, vision, model_settings(config, inputs), None, dtype, seed=config.seed)
    model.set_stage(Stage(config.stage))
    return model


def build_engine(model: NevaModel, config: TrainConfig, plan: BatchPlan, mpu: ModelParallelUnit) -> Any:
    """deepspeed.initialize over the trainable parameters, with our TP x DP groups as its mpu."""
    import deepspeed

    wrapped = TrainingModule(model)
    trainable = model.trainable_parameters(Stage(config.stage))
    ds_config = deepspeed_config(config, plan, torch_adam=not torch.cuda.is_available())
    engine, _, _, _ = deepspeed.initialize(model=wrapped, model_parameters=trainable, config=ds_config, mpu=mpu)
    return engine


def loader_config(config: TrainConfig, inputs: RunInputs, mpu: ModelParallelUnit) -> LoaderConfig:
    """Batches for this rank's DP group (every TP rank of the group gets the same ones)."""
    tokenizer = inputs.tokenizer
    encode = partial(encode_conversation, config.template, tokenizer=tokenizer, image_tokens=inputs.image_tokens)
    encoder = LoaderWorkerEncoder(
        TemplateEncoder(encode, ImageProcessor.from_folder(config.vision, aspect=config.image_aspect)), os.getpid())
    layout = mpu.layout
    return LoaderConfig(shards=config.shards, encoder=encoder, batch_size=config.micro_batch,
                        max_length=config.max_length, image_token_id=tokenizer.image_token_id,
                        image_size=inputs.image_size, pad_token_id=tokenizer.pad_id, dp_rank=layout.dp_rank,
                        dp_size=layout.dp, dp_group=mpu.dp_group if layout.dp > 1 else None,
                        num_workers=LOADER_WORKERS, seed=config.seed, skip_exceptions=(SampleMismatch,))


def build_loaders(config: TrainConfig, inputs: RunInputs,
                  mpu: ModelParallelUnit) -> tuple[TrainLoader, ValLoader | None]:
    settings = loader_config(config, inputs, mpu)
    # A validation pass is a few batches: loading them in this process beats starting a worker every pass.
    val = ValLoader(dataclasses.replace(settings, num_workers=0), config.val_batches) if config.val_every else None
    train = TrainLoader(settings)
    # The workers ignore SIGTERM (LoaderWorkerEncoder), so they must be told to stop on every way out of the
    # process, a failing run too: before multiprocessing's own exit hook waits for them (hooks run last-in first).
    atexit.register(train.close)
    return train, val


# --- the trained-model folder at the end --------------------------------------------------------------


def _full_llm_tensors(llm: NevaLLM, tp_group: dist.ProcessGroup | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical full tensors of the LLM, gathered tensor by tensor over its TP group."""
    state = llm.state_dict()
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    for name in tensor_names(llm.config):
        shard = state[name].detach().contiguous()
        if tp == 1:
            yield name, merge_tensor(name, [shard], llm.config)
            continue
        shards = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(shards, shard, group=tp_group)
        yield name, merge_tensor(name, shards, llm.config)


def _source_provenance(config: TrainConfig) -> tuple[Provenance, Path]:
    """The provenance of the LLM the run started from (so an export still finds the HF config)."""
    source = config.llm
    if config.init is not None:
        source = read_trained_config(config.init)[0] / LLM_DIR
    _, meta = read_native_config(source)
    provenance = Provenance(source=dict(meta.get("source") or {}), original_vocab_size=int(meta["vocab"]["original"]),
                            hf_config=meta.get("hf_config"), history=tuple(meta.get("history") or ()),
                            parent=meta.get("parent"))
    return provenance, source


def write_final(config: TrainConfig, inputs: RunInputs, model: NevaModel, mpu: ModelParallelUnit,
                provenance: dict[str, Any]) -> None:
    """OUT/final: the trained model at the last step (collective over DP rank 0's TP group; global rank 0 writes).

    A finetuned LLM is gathered and written as native rank files for --tp; a pretrain run links the LLM
    it started from. The folder is committed by `io.commit_output` under its lock: a final/ of another
    step (a run extended with a higher --max-steps) is replaced once the new one is whole; one of this very
    run (same step and config, written by a concurrent rerun) is kept.
    """
    layout = mpu.layout
    if layout.dp_rank != 0:
        return
    writer = layout.rank == 0
    llm_tmp = temp_name(config.out / "final-llm")
    source_provenance, source_llm = _source_provenance(config)
    llm_folder = source_llm
    if Stage(config.stage).trains_llm:
        tensors = _full_llm_tensors(model.llm, tp_group_of(mpu))
        if writer:
            history = (*source_provenance.history, {"stage": "neva train", "train_stage": config.stage})
            save_native(llm_tmp, model.llm.config, tp=config.tp, dtype=config.dtype,
                        provenance=Provenance(source=source_provenance.source,
                                              original_vocab_size=source_provenance.original_vocab_size,
                                              hf_config=source_provenance.hf_config, history=history,
                                              parent=source_provenance.parent),
                        tensors=tensors, wanted={"tp": config.tp, "dtype": config.dtype})
            llm_folder = llm_tmp
        else:
            for _ in tensors:  # take part in every gather
                pass
    if not writer:
        return
    try:
        save_trained_model(config.out / "final", llm=llm_folder, projector=model.projector,
                           vision_dir=config.vision, tokenizer_dir=config.tokenizer,
                           settings=model_settings(config, inputs), dtype=config.dtype, provenance=provenance,
                           reuse=partial(same_run_final, provenance=provenance))
    finally:
        shutil.rmtree(llm_tmp, ignore_errors=True)


def same_run_final(final: Path, provenance: dict[str, Any]) -> Path | None:
    """`final` when it holds this run's model (same step, same config), else None: an older or damaged one
    is this run's own OUT and is replaced."""
    try:
        _, _, document = read_trained_config(final)
    except NevaError:
        return None
    recorded = document.get("provenance", {})
    same = all(recorded.get(key) == provenance[key] for key in ("steps", "config"))
    return final if same else None


def finished_steps(out: Path) -> int | None:
    """The step OUT/final was written at, or None when there is no complete final/ yet."""
    final = out / "final"
    if not final.is_dir():
        return None
    try:
        _, _, document = read_trained_config(final)
    except NevaError:
        return None
    steps = document.get("provenance", {}).get("steps")
    return int(steps) if steps is not None else None
