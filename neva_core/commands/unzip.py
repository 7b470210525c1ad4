"""`neva unzip ZIP DEST`: extract an archive safely and atomically (see neva_core.data.archive)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from neva_core.data.archive import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RATIO,
    RATIO_CHECK_MIN_BYTES,
    RECORD_NAME,
    format_bytes,
    unzip,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNIT_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int | None:
    """'500G' -> 500 GiB in bytes, '1048576' -> 1048576, 'none' -> None (no limit). Units are binary."""
    if text.strip().lower() == "none":
        return None
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 1048576, 500M, 2T or 'none'")
    size = int(float(match.group(1)) * (1 << _UNIT_SHIFT[match.group(2).lower()]))
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive (or 'none' for no limit)")
    return size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "unzip",
        help="extract a zip archive safely and atomically",
        description=(
            "Extract ZIP into the new folder DEST. Entries that could write outside DEST (absolute paths, "
            "'..', Windows paths, links, devices) and zip bombs are refused. Extraction goes to a temporary "
            "folder beside DEST, which is renamed to DEST only after every entry passed its CRC check, so an "
            f"interrupted run leaves no DEST. DEST/{RECORD_NAME} records the archive it came from: running the "
            "command again on the same archive does nothing; a DEST from another archive is extracted again "
            "beside it and replaced once complete; a DEST not made by this command is an error (it is never "
            "merged into or overwritten)."
        ),
    )
    p.add_argument("zip", type=Path, metavar="ZIP", help="the zip archive to extract")
    p.add_argument("dest", type=Path, metavar="DEST", help="the folder to create (its parent is created if needed)")
    p.add_argument(
        "--max-bytes",
        type=parse_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help=(
            "refuse an archive whose entries declare more than SIZE bytes in total, e.g. 500G, 2T, 1048576, "
            f"or 'none' for no limit (default: {format_bytes(DEFAULT_MAX_BYTES)})"
        ),
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        default=DEFAULT_MAX_RATIO,
        metavar="RATIO",
        help=(
            f"refuse an entry larger than {format_bytes(RATIO_CHECK_MIN_BYTES)} that expands more than RATIO times "
            f"its compressed size (default: {DEFAULT_MAX_RATIO:g})"
        ),
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    result = unzip(args.zip, args.dest, max_bytes=args.max_bytes, max_ratio=args.max_ratio)
    if result.skipped:
        print(f"{result.dest} already holds {args.zip} ({result.files} files); nothing to do")
    else:
        print(f"extracted {result.files} files ({format_bytes(result.bytes)}) from {args.zip} into {result.dest}")
    return 0
