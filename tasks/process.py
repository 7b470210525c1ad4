"""Commands run from a task: their output in the task's log, and no process of theirs left behind
when the run is cancelled, times out or crashes (see neva_core.process)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from neva_core.process import run_command


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current flow or task run's logger; a plain logger outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run (the CLI, a test)
        return logging.getLogger("neva.process")


def run_logged(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
               grace_seconds: float = 10.0) -> int:
    """Run `argv`, each output line an INFO record of the current task run's logger; return its exit status."""
    return run_command(argv, run_logger().info, env=env, cwd=cwd, grace_seconds=grace_seconds)
