"""`neva train`: DeepSpeed training of NeVA (pretrain or finetune), checked before any process starts."""

from __future__ import annotations

import argparse
import os

from neva_core.train.arguments import DESCRIPTION, add_train_arguments

WORKER_MODULE = "neva_core.train.loop"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the projector (pretrain) or projector + LLM (finetune)",
                              description=DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from neva_core.train.arguments import train_config_from_args
    from neva_core.train.launch import launch_command, launch_environment, run_launcher, world_size
    from neva_core.train.preflight import check_inputs

    config = train_config_from_args(args)
    config.plan(world_size(config))
    check_inputs(config)
    argv = launch_command(config, WORKER_MODULE, [config.model_dump_json()])
    return run_launcher(argv, launch_environment(os.environ, cpu=not torch.cuda.is_available()))
