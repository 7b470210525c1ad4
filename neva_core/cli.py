"""The `neva` command: one subcommand per stage, each a thin layer over the library.

Each module in `neva_core.commands` registers its own subcommand; heavy imports (torch, transformers)
happen inside the handlers so that `neva --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from neva_core.errors import NevaError

COMMAND_MODULES = (
    "fixtures",
    "download",
    "unzip",
    "shard",
    "tokenizer",
    "convert",
    "repartition",
    "export",
    "llava_import",
    "generate",
    "train",
    "demo",
    "eval",
    "run",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neva", description="NeVA / LLaVA training pipeline: data, checkpoint and training stages."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"neva_core.commands.{name}").register(subparsers)
    return parser


class RunLogFormatter(logging.Formatter):
    """neva's log lines, naming the Prefect task or flow run a record comes from: Prefect leaves a root handler
    set up here in place (so its own console format, which names runs, is not used), and its run loggers
    attach the run's name to each record."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(run)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        task_run, flow_run = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        record.run = f"task run '{task_run}': " if task_run else f"flow run '{flow_run}': " if flow_run else ""
        return super().format(record)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = logging.StreamHandler()
    console.setFormatter(RunLogFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[console])
    # HTTP clients log every request at INFO (Prefect's API calls among them): keep them for --verbose.
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except NevaError as exc:
        print(f"neva {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
