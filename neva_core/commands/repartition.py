"""`neva repartition`: rewrite a native checkpoint for another tensor-parallel size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "repartition",
        help="rewrite a native checkpoint for another tensor-parallel size",
        description=(
            "Repartition a native checkpoint from any tensor-parallel size to any other (e.g. 1->4, 8->2), "
            "streaming in one pass over the tensors. The input is verified against its manifest; the output "
            "is a new native checkpoint folder. Fails, naming every factor, when the model does not divide."
        ),
    )
    p.add_argument("--in", dest="in_dir", type=Path, required=True, metavar="DIR", help="the native checkpoint to read")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the native checkpoint folder to create")
    p.add_argument("--tp", type=int, required=True, metavar="N", help="the new tensor-parallel size")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neva_core.checkpoint.repartition import repartition

    print(json.dumps(repartition(args.in_dir, args.out, args.tp).to_dict()))
    return 0
