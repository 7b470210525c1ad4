"""Commands own their process tree: interrupted or finished, nothing they started survives."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from prefect.exceptions import TerminationSignal

from neva_core.process import processes_with_marker, run_command
from process_support import is_running, stray_command


class Interrupted(BaseException):
    """Not an Exception: what a cancelled run or Ctrl-C raises."""


class Lines:
    """Collects output lines; `on_ready` runs once the command reports its grandchild and marker."""

    def __init__(self, on_ready=None) -> None:
        self.lines: list[str] = []
        self.on_ready = on_ready

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("ready") and self.on_ready is not None:
            self.on_ready()

    @property
    def grandchild(self) -> int:
        return int(next(line.split()[1] for line in self.lines if line.startswith("grandchild")))

    @property
    def marker(self) -> str:
        return next(line.split()[1] for line in self.lines if line.startswith("ready"))


def assert_nothing_left(lines: Lines) -> None:
    assert lines.marker and processes_with_marker(lines.marker) == set()
    assert not is_running(lines.grandchild)


@pytest.fixture
def sigterm_raises_termination_signal() -> Iterator[None]:
    """SIGTERM handled as Prefect's engine handles it when a worker cancels a flow run."""
    def handler(signum: int, frame: object) -> None:
        raise TerminationSignal(signal=signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_base_exception_in_the_caller_kills_the_setsid_grandchild() -> None:
    def interrupt() -> None:
        raise Interrupted

    lines = Lines(on_ready=interrupt)
    started = time.monotonic()
    with pytest.raises(Interrupted):
        run_command(stray_command("sleep"), lines, grace_seconds=0.5)
    assert time.monotonic() - started < 10
    assert_nothing_left(lines)


def test_termination_signal_kills_the_tree(sigterm_raises_termination_signal: None) -> None:
    lines = Lines(on_ready=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TerminationSignal):
        run_command(stray_command("sleep"), lines, grace_seconds=0.5)
    assert_nothing_left(lines)


def test_finished_command_returns_its_status_and_leaves_no_descendant() -> None:
    lines = Lines()
    assert run_command(stray_command("exit"), lines, grace_seconds=0.5) == 3
    assert [line.split()[0] for line in lines.lines] == ["grandchild", "ready"]
    assert_nothing_left(lines)


def test_output_lines_arrive_in_order_and_env_is_the_callers() -> None:
    import sys

    code = "import os\nfor i in range(3): print('line', i)\nprint(os.environ['NEVA_PROBE'])"
    lines = Lines()
    assert run_command([sys.executable, "-c", code], lines, env={**os.environ, "NEVA_PROBE": "kept"}) == 0
    assert lines.lines == ["line 0", "line 1", "line 2", "kept"]
