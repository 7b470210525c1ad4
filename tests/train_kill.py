"""A training worker that SIGKILLs its whole process group at a chosen point (NEVA_TEST_KILL=POINT:STEP):

    mid-step:S      inside optimizer step S, after its first micro batch's backward (a save came before)
    in-save:S       inside DeepSpeed's save_checkpoint of step S, after its first file is written
    before-commit:S after every file of step S is written and hashed, before the manifest and the rename

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


if __name__ == "__main__":
    point, _, at = os.environ["NEVA_TEST_KILL"].partition(":")
    arm(point, int(at))
    sys.exit(loop.main())
