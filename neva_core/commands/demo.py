"""`neva demo`: the whole pipeline on built-in synthetic data, offline, on CPU, then the held-out accuracy."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from neva_core.commands.run import add_json_flag, print_run_result
from neva_core.demo import DEMO_FINETUNE_STEPS, DEMO_IMAGES, DEMO_PRETRAIN_STEPS, DEMO_TP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the neva Prefect flow on synthetic data (offline, CPU), training included",
        description=(
            "Make the synthetic fixtures (a LLaVA-Pretrain-shaped dataset of captioned shapes, a tiny LLaMA, a tiny "
            "CLIP and a sentencepiece tokenizer) under WORKDIR/fixtures/seed<S>-images<N>-v<format>, then run the `neva` "
            "Prefect flow on them with stage finetune and the tiny presets: download (local copies), shard, "
            "tokenizer extension, convert (and repartition with --tp 2), pretrain, finetune, export to HF LLaVA. "
            "Uses the Prefect API in PREFECT_API_URL if set, else Prefect's embedded local server. A second run "
            "reuses cached stages. Ends with a summary of the stages and the held-out caption accuracy of the "
            "export, run by transformers (--json: the whole result)."
        ),
    )
    p.add_argument("--workdir", type=Path, default=Path("demo-run"), help="where everything is written (default: demo-run)")
    p.add_argument("--images", type=int, default=DEMO_IMAGES,
                   help=f"synthetic pretraining images (default: {DEMO_IMAGES}; fewer train a worse model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and models (default: 0)")
    p.add_argument("--tp", type=int, default=DEMO_TP, choices=(1, 2),
                   help=f"tensor-parallel size of the checkpoint and the training (default: {DEMO_TP})")
    p.add_argument("--pretrain-steps", type=int, default=DEMO_PRETRAIN_STEPS,
                   help=f"pretraining steps (default: {DEMO_PRETRAIN_STEPS})")
    p.add_argument("--finetune-steps", type=int, default=DEMO_FINETUNE_STEPS,
                   help=f"finetuning steps (default: {DEMO_FINETUNE_STEPS}; fewer train a worse model)")
    add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Offline: the embedded Prefect server must not try to send usage analytics.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server can take over 20 s (Prefect's default limit) to start on busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from pydantic import ValidationError

    from flows.neva import neva, run_name
    from neva_core.demo import demo_accuracy, demo_config, demo_fixtures
    from neva_core.errors import NevaError
    from neva_core.eval.captions import caption_scores
    from neva_core.model.neva import Stage

    try:
        config = demo_config(args.workdir, images=args.images, seed=args.seed, tp=args.tp,
                             pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps)
    except ValidationError as exc:  # steps the tiny presets' warmup does not fit, named by train.<stage>
        raise NevaError(f"--pretrain-steps {args.pretrain_steps} / --finetune-steps {args.finetune_steps}: "
                        + "; ".join(error["msg"] for error in exc.errors())) from None
    # The same stages as the flow's demo=true, on these fixtures; the run is named as a demo run.
    result = neva.with_options(flow_run_name=run_name(True, Stage.FINETUNE, config))(
        stage=Stage.FINETUNE, config=config)
    fixtures = demo_fixtures(args.workdir, images=args.images, seed=args.seed, make=False)
    heldout = demo_accuracy(Path(result["export"]["path"]), fixtures, args.workdir)
    result["heldout_accuracy"] = heldout.accuracy
    result["heldout_scores"] = scores = caption_scores(heldout.answers, heldout.truths)
    print_run_result(result, args.json)
    if not args.json:
        print(f"accuracy: {heldout.accuracy:.0%} (held-out images whose answer contains the true caption, "
              f"{len(heldout.answers)} images, transformers on {result['export']['path']})")
        print(f"held-out captions: CIDEr {scores['CIDEr']:.1f}, BLEU-4 {scores['BLEU-4']:.1f}, "
              f"ROUGE-L {scores['ROUGE-L']:.1f} against the true captions")
        print("benchmark fixtures: " + ", ".join(f"{name} {value:.1f}" for name, value
                                                  in sorted(result["evaluation"]["scores"].items()))
              + f" ({result['evaluation']['decision']})")
    return 0
