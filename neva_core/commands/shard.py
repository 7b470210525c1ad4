"""`neva shard --json FILE --images ZIP|DIR --out DIR`: validated, resumable webdataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from neva_core.data.shard_manifest import SKIPPED_NAME
from neva_core.data.shard_plan import DEFAULT_MAXCOUNT, DEFAULT_VAL_FRACTION
from neva_core.data.shards import default_workers, shard_dataset
from neva_core.io import MANIFEST_NAME


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shard",
        help="validate records and images and write webdataset shards with megatron-energon metadata",
        description=(
            "Stream a LLaVA-style JSON list of records, check every record and its image, and write "
            "webdataset shards (train-000000.tar, ...; val-... with --val-fraction) plus the megatron-energon "
            "metadata (.nv-meta/, *.tar.idx) into OUT. Bad records and images are skipped, never fatal: each "
            f"one is listed in OUT/{SKIPPED_NAME} with its reason. Shard contents depend only on the inputs "
            "and on --maxcount/--val-fraction/--split-seed, never on --workers. Shards are written into a "
            "temporary folder beside OUT, renamed to OUT when complete; an interrupted run is resumed by running "
            "the same command again (finished shards are kept). An OUT from other inputs or parameters is "
            "rebuilt beside it and replaced only once complete; a folder this command did not write is refused. "
            f"OUT/{MANIFEST_NAME} is written last."
        ),
    )
    p.add_argument("--json", type=Path, required=True, metavar="FILE",
                   help="the JSON list of records, e.g. blip_laion_cc_sbu_558k.json")
    p.add_argument("--images", type=Path, required=True, metavar="ZIP|DIR",
                   help="the dataset's images.zip as downloaded, or the folder it was extracted to; "
                        "each record's 'image' is a path relative to it")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder (created; an interrupted run's folder is resumed)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"processes writing shards (default: min(4, CPU count) = {default_workers()})")
    p.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, metavar="N",
                   help=f"records per shard before rejected images are dropped (default: {DEFAULT_MAXCOUNT})")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help="fraction of records for the val split, chosen by a stable hash of the id, "
                        f"0 <= F < 1 (default: {DEFAULT_VAL_FRACTION}, as in the flow: every record trains, as in "
                        "the LLaVA recipes; give e.g. 0.01 for a validation loss)")
    p.add_argument("--split-seed", type=int, default=0, metavar="N",
                   help="salt of the train/val hash: another seed picks another validation set (default: 0)")
    p.add_argument("--image-prefix", default="", metavar="DIR/",
                   help="put before every record's image path to find it in --images, e.g. 'train2017/' for "
                        "COCO's train2017.zip under LLaVA-Instruct-150K's bare file names (default: none)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    result = shard_dataset(
        args.json, args.images, args.out, maxcount=args.maxcount, workers=args.workers,
        val_fraction=args.val_fraction, split_seed=args.split_seed, image_prefix=args.image_prefix,
    )
    splits = ", ".join(f"{split} {count}" for split, count in result.split_samples.items() if count)
    reasons = ", ".join(f"{reason} {count}" for reason, count in result.skipped_by_reason.items())
    print(f"{result.out_dir}: {result.written} of {result.records} records written in {result.shards} shards"
          f"{f' ({splits})' if splits else ''}")
    if result.skipped:
        print(f"skipped {result.skipped} ({reasons}); see {Path(result.out_dir) / SKIPPED_NAME}")
    if result.converted_by_reason:
        converted = ", ".join(f"{fmt} {count}" for fmt, count in result.converted_by_reason.items())
        print(f"converted to PNG: {converted}")
    return 0
