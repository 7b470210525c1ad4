"""The flags of `neva train`, made from TrainConfig's fields so the two can never drift apart.

Every flag defaults to "not given" (argparse.SUPPRESS): the config is then built as
field defaults < `--config FILE` < flags given, and a flag given on the command line is known to be
the user's own choice (the PyTorchJob environment may fill only what the flags leave open).
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from neva_core.errors import NevaError
from neva_core.train.config import TrainConfig, flag, load_train_config
from neva_core.train.launch import node_from_environment

DESCRIPTION = (
    "Train NeVA (CLIP + projector + LLM) with DeepSpeed: tensor parallelism x ZeRO data parallelism, "
    "crash-safe checkpoints in OUT/checkpoints/step-N/ and exact resume (rerun the same command). "
    "Options come from flags, or from a YAML file of the same keys (--config FILE; flags override it)."
)


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    if info.is_required():
        return f"{text} (required, here or in --config)"
    default = info.default
    if default is None or default is PydanticUndefined:
        return text
    if isinstance(default, tuple):
        default = " ".join(str(item) for item in default)
    return f"{text} (default: {default})"


def _choices(annotation: Any) -> list[Any] | None:
    """The values of a Literal field, or of an optional one (`Literal[...] | None`: not given means None)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(options) == 1 and len(typing.get_args(annotation)) == 2:
        return _choices(options[0])
    return None


def _add_field(parser: argparse.ArgumentParser, name: str, info: FieldInfo) -> None:
    annotation = info.annotation
    options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help(info), "dest": name}
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if annotation is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is tuple:
        options.update(nargs=len(typing.get_args(annotation)), metavar=("BETA1", "BETA2"))
    elif (choices := _choices(annotation)) is not None:
        # Literal ints (--zero) parse as ints so they match; everything else reaches pydantic as text.
        options.update(choices=choices, type=type(choices[0]))
    else:
        # Numbers stay text here: pydantic converts them and its errors name the flag (a non-numeric --lr).
        options["metavar"] = extra.get("metavar", name.upper())
    parser.add_argument(flag(name), **options)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE` and one flag per TrainConfig field to `parser`."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML file of options (keys as the long flags without dashes, e.g. micro_batch: 16); "
                        "flags given override it. Presets ship in configs/")
    for name, info in TrainConfig.model_fields.items():
        _add_field(parser, name, info)


def build_train_parser(prog: str = "neva train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_train_arguments(parser)
    return parser


def _environment_overrides(given: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The node's place in a Kubeflow PyTorchJob, refusing flags that contradict it."""
    node = node_from_environment(env)
    if node is None:
        return {}
    found = {key: value for key, value in node.items() if value is not None}
    for key, value in found.items():
        if key in given and str(given[key]) != str(value):
            raise NevaError(
                f"{flag(key)} {given[key]} contradicts the PyTorchJob environment, which gives {value}; "
                f"drop {flag(key)} (every pod runs the same command and reads its place from the environment)"
            )
    return found


def train_config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> TrainConfig:
    """TrainConfig from parsed `neva train` flags (and --config), with the PyTorchJob environment if present."""
    given = {name: getattr(args, name) for name in TrainConfig.model_fields if hasattr(args, name)}
    overrides = _environment_overrides(given, os.environ if env is None else env) | given
    return load_train_config(getattr(args, "config", None), overrides)

