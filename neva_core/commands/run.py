"""`neva run CONFIG.yaml`: the `neva` flow with a PipelineConfig read from a YAML file."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the neva Prefect flow with the pipeline configuration in a YAML file",
        description=(
            "Read CONFIG.yaml (the keys of the flow's PipelineConfig: workdir, dataset.*, model.*, finetune_dataset.*, "
            "train.pretrain.*, train.finetune.* (null: no training), hf_token_secret, hf_endpoint, keep_outputs), "
            "validate it, and run the `neva` flow with it (--stage: pretrain, or finetune from the pretrain output). "
            "Uses the Prefect API in "
            "PREFECT_API_URL if set, else Prefect's embedded local server. A relative workdir is taken from the "
            "directory the command runs in. Stages whose inputs and parameters did not change are served from the cache. Ends with a "
            "summary of the stages: ran or cached, seconds, output (--json: the whole result)."
        ),
    )
    p.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the pipeline configuration")
    p.add_argument("--stage", choices=("pretrain", "finetune"), default="pretrain",
                   help="the last training stage (default: pretrain); finetune also runs (or reuses) pretrain")
    add_json_flag(p)
    p.set_defaults(handler=run)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the flow's whole result as JSON (for scripts) instead of the stage summary")


def print_run_result(result: dict[str, Any], as_json: bool) -> None:
    """The flow's result as JSON, or the summary of its stages: ran or cached, seconds, output."""
    from neva_core.summary import StageOutcome, summary_text

    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(summary_text([StageOutcome(**stage) for stage in result["stages"]]))


def load_pipeline_config(path: Path) -> Any:
    """The PipelineConfig in the YAML file `path`; a NevaError names the file and each bad key."""
    import yaml
    from pydantic import ValidationError

    from neva_core.config import PipelineConfig

    try:
        with open(path) as stream:
            document = yaml.safe_load(stream)
    except OSError as exc:
        raise NevaError(f"cannot read the pipeline configuration {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise NevaError(f"{path} is not valid YAML: {exc}") from exc
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise NevaError(f"{path} must hold a mapping of PipelineConfig keys (workdir, dataset, model, ...), "
                        f"not a {type(document).__name__}")
    try:
        return PipelineConfig.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
                             for error in exc.errors())
        raise NevaError(f"{path}: {problems}") from None
    except NevaError as exc:  # a source string the validators refused
        raise NevaError(f"{path}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    config = load_pipeline_config(args.config)
    # The embedded Prefect server must not try to send usage analytics (it may run offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.neva import neva
    from neva_core.model.neva import Stage

    print_run_result(neva(stage=Stage(args.stage), config=config), args.json)
    return 0
