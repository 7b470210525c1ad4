"""The DeepSpeed config (the JSON `deepspeed.initialize` takes) of a TrainConfig.

The learning rate follows DeepSpeed's WarmupCosineLR with linear warmup. DeepSpeed steps the
scheduler after each optimizer step, starting from iteration -1 (lr 0), so optimizer step s = 0, 1, ...
runs at f(s - 1), with W warmup steps and T = --max-steps:

    f(i) = 0                                                            i < 0
    f(i) = lr * i / W                                                   0 <= i < W
    f(i) = min_lr + (lr - min_lr) * (1 + cos(pi * min(1, (i - W + 1) / (T - W)))) / 2

The first two steps run at lr 0; the lr after the last step is min_lr.
"""

from __future__ import annotations

from typing import Any

from neva_core.train.config import BatchPlan, TrainConfig

# Our loop logs; DeepSpeed's own per-step prints would only duplicate it.
_QUIET_STEPS = 1 << 30


def _zero_section(stage: int) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Gather full weights for a save, so a checkpoint also holds the plain module state.
        section["stage3_gather_16bit_weights_on_model_save"] = True
    return section


def deepspeed_config(config: TrainConfig, plan: BatchPlan, *, torch_adam: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for `config` on the world described by `plan`.

    `plan.dp` must be the mpu's data-parallel size (world / tp), which DeepSpeed checks
    train_batch_size against. torch_adam: use torch's AdamW rather than DeepSpeed's fused
    kernels (on CPU, where FusedAdam would need a long JIT build).
    """
    ds: dict[str, Any] = {
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.dp,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": config.clip_grad,
        "steps_per_print": _QUIET_STEPS,
        "zero_optimization": _zero_section(config.zero),
        "bf16": {"enabled": config.dtype == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.lr,
                "betas": list(config.betas),
                "eps": 1e-8,
                "weight_decay": config.weight_decay,
                "torch_adam": torch_adam,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": config.max_steps,
                "warmup_num_steps": config.resolved_warmup_steps,
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": config.min_lr / config.lr,
            },
        },
    }
    if config.dtype == "bf16":
        # Without this, ZeRO-1/2 sum gradients over micro batches in bf16 (facts §11).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds
