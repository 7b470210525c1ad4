"""`neva demo`: the whole pipeline on built-in synthetic data, offline, on CPU."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from neva_core.commands.run import add_json_flag, print_run_result


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the neva Prefect flow on synthetic data (offline, CPU)",
        description=(
            "Make the synthetic fixtures (a LLaVA-Pretrain-shaped dataset, a tiny LLaMA, a tiny CLIP and a "
            "sentencepiece tokenizer) under WORKDIR/fixtures/seed<S>-images<N>, then run the `neva` Prefect flow on them: "
            "download (local copies), shard, tokenizer extension, convert and repartition. Uses the Prefect API "
            "in PREFECT_API_URL if set, else Prefect's embedded local server. A second run reuses cached stages. "
            "Ends with a summary of the stages (--json: the whole result)."
        ),
    )
    p.add_argument("--workdir", type=Path, default=Path("demo-run"), help="where everything is written (default: demo-run)")
    p.add_argument("--images", type=int, default=256, help="synthetic pretraining images (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and models (default: 0)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the final checkpoint (default: 2)")
    add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Offline: the embedded Prefect server must not try to send usage analytics.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.neva import neva
    from neva_core.demo import demo_config

    config = demo_config(args.workdir, images=args.images, seed=args.seed, tp=args.tp)
    print_run_result(neva(config), args.json)
    return 0
