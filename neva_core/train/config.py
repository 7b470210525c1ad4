"""`TrainConfig`: every option of `neva train`, validated before any process starts.

The same model is the YAML preset format (keys are the long flags without dashes), the CLI's parsed
flags and the flow's parameter. Cross-field checks raise NevaError naming the flags involved; the
derived parallel sizes come from `plan(world_size)`, which the launcher calls with the world it will
start and every rank calls again with the world it joined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from neva_core.errors import NevaError

# Template names as the templates module defines them (CONTRACT: TEMPLATES).
TemplateName = Literal["plain", "vicuna_v1", "llama_2", "mistral"]
DEFAULT_WARMUP_RATIO = 0.03
# DeepSpeed's WarmupCosineLR clamps shorter warmups to 2 steps and refuses 0.
MIN_WARMUP_STEPS = 2
# Options a resumed run may change: where things are and are written, how often it saves, validates, logs
# and evaluates (zero-shot generation only reads the weights), how the processes are started, and how long
# it runs (a finished run can be extended). The data and model folders are checked by their manifests, not
# their paths; the world size by the checkpoint's.
RESUME_NEUTRAL = frozenset({
    "shards", "llm", "vision", "tokenizer", "out", "init", "max_steps", "save_every", "save_minutes",
    "val_every", "val_batches", "keep_best", "log_every", "nproc", "nnodes", "node_rank", "master_addr",
    "master_port", "hostfile", "ssh", "activation_checkpointing", "eval_every", "eval_task", "eval_data",
    "eval_limit", "eval_max_new_tokens",
})


def flag(field: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + field.replace("_", "-")


def _meta(metavar: str) -> dict[str, str]:
    return {"metavar": metavar}


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is made: micro_batch x grad_accum x dp samples per optimizer step."""

    world_size: int
    tp: int
    dp: int
    micro_batch: int
    grad_accum: int
    global_batch: int


class TrainConfig(BaseModel):
    """One training run: data, checkpoints, stage, optimisation, parallelism, checkpoints and logging."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # inputs and output
    shards: Path = Field(description="webdataset shards folder written by `neva shard` (train and val splits)",
                         json_schema_extra=_meta("DIR"))
    llm: Path = Field(description="native LLM checkpoint folder (`neva convert` / `neva repartition`)",
                      json_schema_extra=_meta("DIR"))
    vision: Path = Field(description="CLIP vision tower folder (HF CLIPVisionModel or CLIPModel)",
                         json_schema_extra=_meta("DIR"))
    tokenizer: Path = Field(description="tokenizer folder written by `neva tokenizer extend`",
                            json_schema_extra=_meta("DIR"))
    out: Path = Field(description="run folder: checkpoints/, final/, metrics.csv; rerunning resumes from it",
                      json_schema_extra=_meta("DIR"))
    init: Path | None = Field(None, description="a finished run's OUT (its final/ model) or an imported LLaVA "
                              "projector to start from (finetune: its projector, and its LLM if it trained one)",
                              json_schema_extra=_meta("DIR"))
    # what is trained, on what
    stage: Literal["pretrain", "finetune"] = Field(
        description="pretrain trains the projector only; finetune trains the projector and the LLM")
    template: TemplateName = Field(description="prompt template of the conversations")
    projector: Literal["linear", "mlp2x_gelu"] = Field("linear", description="vision-to-LLM projector")
    image_aspect: Literal["square", "pad"] = Field(
        "square", description="square: resize and centre-crop; pad: pad to a square with the mean colour first")
    max_length: int = Field(2048, ge=1, description="tokens per sample after the image tokens are spliced in",
                            json_schema_extra=_meta("L"))
    # optimisation
    max_steps: int = Field(ge=1, description="optimizer steps of the whole run", json_schema_extra=_meta("N"))
    micro_batch: int = Field(ge=1, description="samples per forward pass on each data-parallel rank",
                             json_schema_extra=_meta("B"))
    global_batch: int = Field(ge=1, description="samples per optimizer step over all ranks "
                              "(= micro batch x gradient accumulation x data-parallel size)",
                              json_schema_extra=_meta("G"))
    lr: float = Field(gt=0, description="peak learning rate", json_schema_extra=_meta("LR"))
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine decay",
                          json_schema_extra=_meta("LR"))
    warmup_steps: int | None = Field(None, ge=MIN_WARMUP_STEPS, description="linear warmup steps "
                                     "(at least 2, as DeepSpeed's WarmupCosineLR needs)",
                                     json_schema_extra=_meta("N"))
    warmup_ratio: float | None = Field(None, gt=0, lt=1, description="linear warmup as a share of --max-steps, "
                                       f"rounded up, at least 2 steps (default {DEFAULT_WARMUP_RATIO} when "
                                       "neither warmup option is given)", json_schema_extra=_meta("R"))
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay", json_schema_extra=_meta("WD"))
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    clip_grad: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0: no clipping)",
                             json_schema_extra=_meta("NORM"))
    seed: int = Field(1234, ge=0, description="seed of the model init, data order and dropout",
                      json_schema_extra=_meta("S"))
    dtype: Literal["fp32", "bf16"] = Field(
        "bf16", description="bf16: bf16 weights and activations with fp32 master weights and fp32 gradient "
        "accumulation (needs --zero 1 or more); fp32: everything in fp32 (bit-exact resume on CPU)")
    # parallelism
    tp: int = Field(1, ge=1, description="tensor-parallel size (must match the --llm checkpoint's)",
                    json_schema_extra=_meta("N"))
    zero: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage over the data-parallel ranks")
    activation_checkpointing: bool = Field(False, description="recompute each LLM layer's activations in backward")
    nproc: int = Field(1, ge=1, description="processes on this node (one per GPU)", json_schema_extra=_meta("N"))
    nnodes: int = Field(1, ge=1, description="nodes, each running its own `neva train` (with --node-rank)",
                        json_schema_extra=_meta("N"))
    node_rank: int = Field(0, ge=0, description="this node's index, 0 .. --nnodes - 1", json_schema_extra=_meta("I"))
    master_addr: str | None = Field(None, min_length=1, description="address of node 0 (needed with --nnodes "
                                    "above 1; one node uses this host, --hostfile its first host)",
                                    json_schema_extra=_meta("ADDR"))
    master_port: int = Field(29500, ge=1, le=65535, description="rendezvous port on node 0",
                             json_schema_extra=_meta("PORT"))
    hostfile: Path | None = Field(None, description="DeepSpeed hostfile ('host slots=N' lines): start every node "
                                  "from here over pdsh/ssh; each host runs its slots processes",
                                  json_schema_extra=_meta("FILE"))
    ssh: bool = Field(True, description="with --hostfile: --no-ssh starts only this host's processes "
                      "(--node-rank: its line in the hostfile, from 0); run the same command on every host")
    # checkpoints, validation, logging
    save_every: int = Field(100, ge=0, description="save a checkpoint every N steps (0: only at the end)",
                            json_schema_extra=_meta("N"))
    save_minutes: float | None = Field(None, gt=0, description="also save when this many minutes have passed "
                                       "since the last save", json_schema_extra=_meta("T"))
    val_every: int = Field(0, ge=0, description="validation loss every N steps on the val split (0: never)",
                           json_schema_extra=_meta("N"))
    val_batches: int = Field(50, ge=1, description="micro batches per validation (the same ones every time)",
                             json_schema_extra=_meta("N"))
    keep_best: int = Field(1, ge=0, description="keep the K best checkpoints by val loss besides the newest",
                           json_schema_extra=_meta("K"))
    log_every: int = Field(10, ge=1, description="log metrics every N steps", json_schema_extra=_meta("N"))
    # zero-shot evaluation (train/zero_shot.py)
    eval_every: int = Field(0, ge=0, description="zero-shot generation every N steps on the first --eval-limit "
                            "samples of --eval-data, scored by the task's official scorer and logged with the val "
                            "loss (0: never)", json_schema_extra=_meta("N"))
    eval_task: Literal["coco", "mmmu", "textvqa"] | None = Field(
        None, description="the --eval-every benchmark: coco (scored by CIDEr), mmmu or textvqa (by accuracy)")
    eval_data: Path | None = Field(None, description="the benchmark folder in its public layout, as "
                                   "`neva eval generate --data` reads it", json_schema_extra=_meta("DIR"))
    eval_limit: int = Field(100, ge=1, description="samples per zero-shot evaluation (the benchmark's first K)",
                            json_schema_extra=_meta("K"))
    eval_max_new_tokens: int | None = Field(None, ge=1, description="longest zero-shot answer in tokens "
                                            "(default: the task's, as `neva eval generate`: coco 40, mmmu 24, "
                                            "textvqa 16)", json_schema_extra=_meta("N"))

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        self._check_schedule()
        self._check_nodes()
        if self.eval_every and (self.eval_task is None or self.eval_data is None):
            raise NevaError(f"--eval-every {self.eval_every} needs --eval-task coco|mmmu|textvqa and --eval-data DIR "
                            "(the benchmark folder, e.g. from `neva eval fixtures`); or pass --eval-every 0")
        if self.dtype == "bf16" and self.zero == 0:
            raise NevaError(
                "--dtype bf16 needs --zero 1 or more: DeepSpeed accumulates gradients in fp32 only under ZeRO "
                "(at one data-parallel rank ZeRO-1 costs nothing); or use --dtype fp32"
            )
        if self.hostfile is None:
            self.plan(self.nnodes * self.nproc)
        return self

    def _check_schedule(self) -> None:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise NevaError("give either --warmup-steps or --warmup-ratio, not both")
        if self.min_lr > self.lr:
            raise NevaError(f"--min-lr {self.min_lr} is above --lr {self.lr}; the cosine decays from --lr to --min-lr")
        if self.resolved_warmup_steps >= self.max_steps:
            source = ("--warmup-steps" if self.warmup_steps is not None else "--warmup-ratio"
                      if self.warmup_ratio is not None else f"the default --warmup-ratio {DEFAULT_WARMUP_RATIO}")
            raise NevaError(
                f"{source} gives {self.resolved_warmup_steps} warmup steps, not fewer than --max-steps "
                f"{self.max_steps}: nothing is left for the cosine decay; lower the warmup or raise --max-steps"
            )
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise NevaError(f"--betas {self.betas[0]} {self.betas[1]}: each AdamW beta must be in [0, 1)")

    def _check_nodes(self) -> None:
        if self.hostfile is not None:
            if self.nnodes > 1:
                raise NevaError("--hostfile lists the nodes: drop --nnodes (or drop --hostfile and run one "
                                "`neva train --nnodes N --node-rank I --master-addr A` per node)")
            if self.node_rank > 0 and self.ssh:
                raise NevaError("--node-rank with --hostfile needs --no-ssh (one command per host); without "
                                "--no-ssh the hostfile's first host starts every node over ssh")
            return
        if not self.ssh:
            raise NevaError("--no-ssh needs --hostfile (the list of hosts whose line --node-rank picks)")
        if self.node_rank >= self.nnodes:
            raise NevaError(f"--node-rank {self.node_rank} is not below --nnodes {self.nnodes}; node ranks are "
                            f"0 .. {self.nnodes - 1}")
        if self.nnodes > 1 and self.master_addr is None:
            raise NevaError(f"--nnodes {self.nnodes} needs --master-addr: the address of node 0, the same on "
                            "every node")

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        ratio = DEFAULT_WARMUP_RATIO if self.warmup_ratio is None else self.warmup_ratio
        # Rounded up as the Hugging Face Trainer (LLaVA's) does.
        return max(MIN_WARMUP_STEPS, math.ceil(ratio * self.max_steps))

    def plan(self, world_size: int) -> BatchPlan:
        """The data-parallel size and gradient accumulation of `world_size` processes, or a NevaError naming why not."""
        if world_size % self.tp:
            raise NevaError(
                f"--tp {self.tp} does not divide the world size {world_size} ({self._world_factors(world_size)}); "
                f"the world must be tensor-parallel {self.tp} x data-parallel N"
            )
        dp = world_size // self.tp
        per_step = self.micro_batch * dp
        if self.global_batch % per_step:
            lower = max(per_step, self.global_batch // per_step * per_step)
            raise NevaError(
                f"--global-batch {self.global_batch} is not micro-batch {self.micro_batch} x gradient-accumulation "
                f"x data-parallel {dp}: it must be a multiple of {per_step} (e.g. {lower} or {lower + per_step}); "
                f"data-parallel {dp} = world {world_size} / --tp {self.tp}"
            )
        return BatchPlan(world_size=world_size, tp=self.tp, dp=dp, micro_batch=self.micro_batch,
                         grad_accum=self.global_batch // per_step, global_batch=self.global_batch)

    def _world_factors(self, world_size: int) -> str:
        if self.hostfile is not None:
            return f"the slots of --hostfile {self.hostfile}"
        if world_size == self.nnodes * self.nproc:
            return f"--nnodes {self.nnodes} x --nproc {self.nproc}"
        return "from the launcher's environment"

    def check_resume(self, saved: Mapping[str, Any]) -> None:
        """Refuse to resume a checkpoint trained with other result-affecting options (`saved`: its config's
        `model_dump(mode="json")`), naming every changed flag."""
        current = self.model_dump(mode="json")
        changed = [f"{flag(name)} {saved.get(name)!r} -> {value!r}" for name, value in current.items()
                   if name not in RESUME_NEUTRAL and saved.get(name) != value]
        if changed:
            raise NevaError(
                f"cannot resume {self.out}: its checkpoints were trained with other options ({'; '.join(changed)}); "
                "rerun with the original options, or choose a new --out"
            )

    def check_max_length(self, image_tokens: int) -> None:
        """Refuse a --max-length that cannot hold one image's tokens and some text."""
        if self.max_length <= image_tokens:
            raise NevaError(
                f"--max-length {self.max_length} cannot hold the {image_tokens} image tokens of the vision tower "
                f"plus any text; use at least {image_tokens + 64}"
            )


def _field_error(error: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    where = sources.get(field, flag(field))
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown option; the keys are the long flags without dashes (e.g. micro_batch)"
    if error["type"] == "missing":
        return f"{flag(field)} is required"
    given = error.get("input")
    return f"{where} {given!r}: {error['msg']}" if isinstance(given, (str, int, float)) else f"{where}: {error['msg']}"


def make_train_config(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> TrainConfig:
    """TrainConfig from plain values, with type errors turned into a NevaError naming each flag (or file key)."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        messages = [_field_error(error, sources or {}) for error in exc.errors()]
        raise NevaError("; ".join(messages)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The keys of a YAML preset, with dashes accepted for underscores (micro-batch = micro_batch)."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise NevaError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise NevaError(f"--config {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise NevaError(f"--config {path} must be a mapping of option: value, got {type(loaded).__name__}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def load_train_config(config_file: Path | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """TrainConfig from an optional YAML file with `overrides` (e.g. the flags given) on top."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        values = read_config_file(config_file)
        sources = {key: f"{key} in {config_file}" for key in values}
    for key, value in overrides.items():
        values[key] = value
        sources[key] = flag(key)
    return make_train_config(values, sources)
