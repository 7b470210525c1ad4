"""A training worker that SIGKILLs its whole process group at a chosen point (NEVA_TEST_KILL=POINT:STEP):

    mid-step:S      inside optimizer step S, after its first micro batch's backward (a save came before)
    in-save:S       inside DeepSpeed's save_checkpoint of step S, after its first file is written
    before-commit:S after every file of step S is written and hashed, before the manifest and the rename

NEVA_TEST_STEP_SECONDS=S replaces the --save-minutes clock with one that advances S seconds per optimizer step,
so that a test sees time-triggered saves without sleeping.

Run as `python -m train_kill CONFIG_JSON` (directly or through torchrun), like neva_core.train.loop.
"""

from __future__ import annotations

import os
import signal
import sys

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.engine import DeepSpeedEngine

from neva_core.train import checkpointing, loop


def kill_everything() -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # the launcher's group; the other workers die with it
        os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def arm(point: str, step: int) -> None:
    if point == "mid-step":
        forward = DeepSpeedEngine.forward

        def killing_forward(self, *args, **kwargs):
            in_step = self.global_steps == step - 1 and self.micro_steps % self.gradient_accumulation_steps() == 1
            if self.module.training and in_step:
                kill_everything()
            return forward(self, *args, **kwargs)

        DeepSpeedEngine.forward = killing_forward
    elif point == "in-save":
        save = TorchCheckpointEngine.save

        def killing_save(self, state_dict, path):
            save(self, state_dict, path)
            if f".step-{step}.tmp-" in str(path):
                kill_everything()

        TorchCheckpointEngine.save = killing_save
    elif point == "before-commit":
        commit = checkpointing._commit

        def killing_commit(tmp, final, manifest):
            if final.name == f"step-{step}":
                kill_everything()
            return commit(tmp, final, manifest)

        checkpointing._commit = killing_commit
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def fake_clock(seconds_per_step: float) -> None:
    steps_done = [0]
    step = DeepSpeedEngine.step

    def counting_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        steps_done[0] = self.global_steps
        return result

    DeepSpeedEngine.step = counting_step
    loop.save_clock = lambda: steps_done[0] * seconds_per_step


if __name__ == "__main__":
    if "NEVA_TEST_KILL" in os.environ:
        point, _, at = os.environ["NEVA_TEST_KILL"].partition(":")
        arm(point, int(at))
    if "NEVA_TEST_STEP_SECONDS" in os.environ:
        fake_clock(float(os.environ["NEVA_TEST_STEP_SECONDS"]))
    sys.exit(loop.main())
