"""The training loop of `neva train`: one process per rank, started by train/launch.py.

    python -m neva_core.train.loop CONFIG_JSON      (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set)

Read top to bottom: groups, inputs, resume discovery, model, engine, loaders, then the steps (with the
validation loss every --val-every steps and zero-shot generation every --eval-every). Each
optimizer step draws its gradient-accumulation micro batches first, so the loss can be token-weighted
over the whole global batch: every micro batch contributes (sum of token losses) / (supervised tokens
of the global batch), the count summed over the data-parallel ranks before any backward.
Parallel and DeepSpeed set-up live in train/parallel.py and train/setup.py, checkpoints in
train/checkpointing.py, metrics in train/metrics.py, zero-shot evaluation in train/zero_shot.py.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from neva_core.errors import NevaError
from neva_core.fingerprint import code_version
from neva_core.model.llm import training_attention_mask
from neva_core.train.checkpointing import (
    DEEPSPEED_TAG,
    Checkpoint,
    TorchCollective,
    capture_rank_state,
    discover_checkpoint,
    restore_rank_state,
    save_checkpoint,
)
from neva_core.train.config import TrainConfig
from neva_core.train.metrics import Metrics, peak_flops, step_flops
from neva_core.train.parallel import ModelParallelUnit, init_parallel_groups
from neva_core.train.preflight import check_inputs
from neva_core.train.setup import TORCH_DTYPES, build_engine, build_loaders, build_model, finished_steps, write_final
from neva_core.train.zero_shot import ZeroShotEval

log = logging.getLogger("neva_core.train")

IGNORE_INDEX = -100
# torchrun gives its workers 30 s between SIGTERM and SIGKILL; a save must fit in that, or the last stands.
SIGTERM_GRACE_S = 25
# The --save-minutes timer: wall time that never steps back (a test replaces it to run without sleeping).
save_clock = time.monotonic
EXIT_STOPPED = 128 + signal.SIGTERM
EXIT_KILLED = 128 + signal.SIGKILL


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = TrainConfig.model_validate_json(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    die_with_launcher()
    # Rank 0 logs; the others speak only when they fail.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        # energon's loaders always ask for pinned memory; without a GPU torch warns at every loader start.
        warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator", category=UserWarning)
    try:
        return train(config)
    except NevaError as exc:
        print(f"neva train: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2


def die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so killing the launcher's process group would
    leave the workers running: have the kernel kill this worker when its launcher dies (Linux)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(EXIT_KILLED)


def train(config: TrainConfig) -> int:
    import deepspeed

    # 1. processes, groups, and the inputs (checked again on every rank: cheap, and nothing is trusted)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    mpu = init_parallel_groups(config.tp)
    comm = TorchCollective()
    plan = config.plan(comm.world_size)
    inputs = check_inputs(config)

    # 2. a finished run is left alone; otherwise resume from the newest committed checkpoint, if any
    done = finished_steps(config.out)
    if done is not None and done >= config.max_steps:
        if done > config.max_steps:
            raise NevaError(f"{config.out} finished at step {done}, past --max-steps {config.max_steps}; "
                            "raise --max-steps to extend it, or choose a new --out")
        log.info("%s already finished at step %d; nothing to do", config.out, done)
        return 0
    ckpt = discover_checkpoint(config.out, comm)
    if ckpt is not None:
        check_resumable(config, ckpt, comm.world_size)

    # 3. the model on this rank, the engine, and this DP rank's data
    model = build_model(config, inputs, mpu)
    engine = build_engine(model, config, plan, mpu)
    train_loader, val_loader = build_loaders(config, inputs, mpu)
    step, samples, best = 0, 0, None  # best: (val loss, step)
    if ckpt is not None:
        engine.load_checkpoint(str(ckpt.path), tag=DEEPSPEED_TAG, load_module_strict=False)
        state = ckpt.rank_state(comm.rank)
        train_loader.load_state_dict(restore_rank_state(state))
        counters = state["counters"]
        step, samples, best = counters["step"], counters["samples"], counters["best"]
        log.info("resuming from step %d", step)
    else:
        log.info("starting %s at step 0: %s on %d ranks (tp %d x dp %d), %d micro batches of %d per step",
                 config.out, config.stage, comm.world_size, plan.tp, plan.dp, plan.grad_accum, plan.micro_batch)
    metrics = Metrics(config.out, step) if comm.rank == 0 else None
    zero_shot = ZeroShotEval(config, model, inputs.tokenizer, mpu, resumed_step=step) if config.eval_every else None
    stop = StopRequest()
    device, dtype = engine.device, TORCH_DTYPES[config.dtype]
    flops_of = step_flops_estimator(model, config)
    peak = peak_flops()

    def save(val_loss: float | None) -> Checkpoint:
        rank_state = capture_rank_state(train_loader.state_dict(), step=step, samples=samples, best=best)
        return save_checkpoint(
            config.out, step,
            lambda folder: engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False,
                                                  exclude_frozen_parameters=True),
            comm, rank_state=rank_state, val_loss=val_loss, keep_best=config.keep_best,
            meta={"step": step, "samples": samples, "best": best, "config": config.model_dump(mode="json"),
                  "code_version": code_version()},
        )

    # 4. the steps
    batches = iter(train_loader)
    last_save_time, interval_start = save_clock(), time.perf_counter()
    interval = {"samples": 0, "tokens": 0, "flops": 0.0}
    engine.train()
    while step < config.max_steps:
        step_start = time.perf_counter()
        micro = [next(batches) for _ in range(plan.grad_accum)]
        # Supervised tokens (what the loss averages over), real tokens and images of the global batch.
        counts = dp_sum(torch.tensor([[int((b.labels[:, 1:] != IGNORE_INDEX).sum()), int(b.attention_mask.sum()),
                                       int(b.has_image.sum())] for b in micro], dtype=torch.float64).sum(0), mpu)
        supervised = counts[0].item()
        lr = engine.optimizer.param_groups[0]["lr"]  # what this step runs at
        loss_sum = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(micro):
            part, _ = engine(batch.input_ids.to(device), batch.images.to(device, dtype), batch.labels.to(device),
                             model_mask(batch.attention_mask, device))
            # DeepSpeed averages gradients over the DP ranks: scale by dp so the result is the global mean.
            engine.backward(part * (plan.dp / supervised), scale_wrt_gas=False)
            loss_sum += part.detach().double().cpu()
            if index == len(micro) - 1:
                loss = dp_sum(loss_sum, mpu).item() / supervised
                if not math.isfinite(loss):
                    raise NevaError(
                        f"step {step + 1}: the loss is {loss}; stopping before the update (nothing of this "
                        f"step is saved: a rerun resumes from the last checkpoint). Samples: "
                        f"{[sid for b in micro for sid in b.sample_ids][:8]}; lower --lr or check the data"
                    )
                grad_norm = measured_grad_norm(engine, mpu) if config.zero == 0 else None
            engine.step()
        step += 1
        samples += plan.global_batch
        step_time = time.perf_counter() - step_start
        interval["samples"] += plan.global_batch
        interval["tokens"] += int(counts[1].item())
        interval["flops"] += flops_of(int(counts[1].item()), int(counts[2].item()))

        val_loss = None
        if val_loader is not None and step % config.val_every == 0:
            val_loss = evaluate(engine, val_loader, mpu, dtype)
            if best is None or val_loss < best[0]:
                best = [val_loss, step]
        zero_shot_scores = None  # {metrics column: score} on rank 0
        if zero_shot is not None and step % config.eval_every == 0:
            eval_start = time.perf_counter()
            zero_shot_scores = zero_shot.run(step)
            interval_start += time.perf_counter() - eval_start  # samples/s stays the training's
        if step % config.log_every == 0 or val_loss is not None or zero_shot_scores is not None \
                or step == config.max_steps:
            elapsed = time.perf_counter() - interval_start
            if metrics is not None:
                metrics.record(step, loss=loss, val_loss=val_loss, lr=lr,
                               grad_norm=grad_norm_of(engine) if grad_norm is None else grad_norm,
                               samples_per_s=interval["samples"] / elapsed,
                               tokens_per_s=interval["tokens"] / elapsed, step_time_s=step_time,
                               mfu=None if peak is None else interval["flops"] / elapsed / (peak * comm.world_size),
                               **(zero_shot_scores or {}))
            interval_start = time.perf_counter()
            interval = {"samples": 0, "tokens": 0, "flops": 0.0}

        # Rank 0's clock decides, and agreed() hands its decision to every rank: clocks differ between hosts.
        minutes_due = comm.rank == 0 and config.save_minutes is not None and \
            save_clock() - last_save_time >= config.save_minutes * 60
        stopping, minutes_due = stop.agreed(minutes_due)
        if (config.save_every and step % config.save_every == 0) or step == config.max_steps or stopping \
                or minutes_due:
            save(val_loss)
            last_save_time = save_clock()
            if metrics is not None:
                metrics.plot()
        if stopping:
            log.info("stopped by SIGTERM after saving step %d; rerun the same command to resume", step)
            train_loader.close()
            return EXIT_STOPPED
    stop.disarm()

    # 5. the trained model
    write_final(config, inputs, model, mpu, provenance={
        "trained_by": "neva train", "stage": config.stage, "steps": step, "samples": samples,
        "best_val_loss": None if best is None else best[0], "best_val_step": None if best is None else best[1],
        "zero_shot": None if zero_shot is None else zero_shot.latest(),
        "config": config.model_dump(mode="json"), "code_version": code_version()})
    comm.barrier()
    train_loader.close()
    if val_loader is not None:
        val_loader.close()
    if metrics is not None:
        metrics.plot()
        metrics.close()
    log.info("finished at step %d; the trained model is %s", step, config.out / "final")
    return 0


def dp_sum(values: torch.Tensor, mpu: ModelParallelUnit) -> torch.Tensor:
    """`values` summed over this rank's data-parallel group (fp64 on the CPU: gloo and exact counts)."""
    values = values.detach().double().cpu().clone()
    if mpu.layout.dp > 1:
        dist.all_reduce(values, group=mpu.dp_group)
    return values


def model_mask(attention_mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The loader's (right-padded) mask as the model takes it: None keeps attention on the fused causal path."""
    mask = training_attention_mask(attention_mask)
    return None if mask is None else mask.to(device)


def evaluate(engine: Any, loader: Any, mpu: ModelParallelUnit, dtype: torch.dtype) -> float:
    """Token-weighted loss over the fixed validation batches, summed over the DP ranks."""
    totals = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for batch in loader:
            loss_sum, count = engine(batch.input_ids.to(engine.device), batch.images.to(engine.device, dtype),
                                     batch.labels.to(engine.device), model_mask(batch.attention_mask, engine.device))
            totals += torch.stack([loss_sum.double().cpu(), count.double().cpu()])
    engine.train()
    totals = dp_sum(totals, mpu)
    return (totals[0] / totals[1]).item()


def measured_grad_norm(engine: Any, mpu: ModelParallelUnit) -> float:
    """The global gradient norm before the update, TP shards counted once. Without ZeRO, DeepSpeed clips
    but does not keep the norm: measure it with its own function at an infinite limit (grads times 1.0)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    return float(clip_grad_norm_(trainable, max_norm=math.inf, mpu=mpu).item())


def grad_norm_of(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def step_flops_estimator(model: Any, config: TrainConfig) -> Any:
    tp = config.tp
    llm_params = sum(p.numel() for p in model.llm.parameters()) * tp
    vision_params = sum(p.numel() for p in model.vision.parameters())
    projector_params = sum(p.numel() for p in model.projector.parameters())
    trains_llm = config.stage == "finetune"

    def flops(tokens: int, images: int) -> float:
        return step_flops(llm_params, trains_llm, vision_params, projector_params, tokens, images, model.image_tokens)

    return flops


def check_resumable(config: TrainConfig, ckpt: Checkpoint, world_size: int) -> None:
    """Refuse a resume whose result would differ from the saved run's (topology or options)."""
    saved_world = ckpt.manifest.get("world_size")
    if saved_world != world_size:
        raise NevaError(f"cannot resume {ckpt.path}: it was saved by {saved_world} processes, this run has "
                        f"{world_size}; an exact resume needs the same topology: relaunch with the saved one, or "
                        "choose a new --out")
    config.check_resume(ckpt.manifest["run"]["config"])
    if ckpt.step > config.max_steps:
        raise NevaError(f"{ckpt.path} is past --max-steps {config.max_steps}; raise --max-steps or choose a new --out")


class StopRequest:
    """SIGTERM asks for a save at the end of the step; the ranks agree on it, and a save that overruns the
    grace period ends the process (the last committed checkpoint then stands)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGALRM, lambda *_: os._exit(EXIT_STOPPED))
        signal.alarm(SIGTERM_GRACE_S)

    def agreed(self, save_due: bool) -> tuple[bool, bool]:
        """(any rank asked to stop, rank 0's save timer is due): a collective every rank calls after every
        step, so that all of them take the same branch."""
        flags = torch.tensor([float(self.requested), float(save_due)])
        if dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def disarm(self) -> None:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
