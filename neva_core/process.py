"""Run a command so that nothing it starts outlives it.

The command leads a new session (its own process group), and every process it starts inherits a marker
environment variable. When the caller is interrupted (a cancelled Prefect run's TerminationSignal, a
timeout, Ctrl-C, a crash: any BaseException), or when the command exits, the group is sent SIGTERM, then
SIGKILL after a grace period, and so is every process still carrying the marker: descendants that called
setsid left the group but keep their environment. Linux only (the marker scan reads /proc/*/environ).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

MARKER_VAR = "NEVA_RUN_MARKER"
_PROC = Path("/proc")
_POLL_SECONDS = 0.1


def processes_with_marker(marker: str) -> set[int]:
    """The live processes (zombies excluded) whose environment has MARKER_VAR=marker."""
    entry = f"{MARKER_VAR}={marker}".encode()
    found = set()
    for proc_dir in _PROC.glob("[0-9]*"):
        try:
            if entry in (proc_dir / "environ").read_bytes().split(b"\0") and _is_alive(int(proc_dir.name)):
                found.add(int(proc_dir.name))
        except OSError:  # gone meanwhile, or another user's process
            continue
    found.discard(os.getpid())
    return found


def _is_alive(pid: int) -> bool:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain spaces or parentheses.
    return stat[stat.rindex(")") + 2] not in "ZX"


def _signal_all(pgid: int, pids: Iterable[int], signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_is_alive(int(p.name)) and _pgid(int(p.name)) == pgid for p in _PROC.glob("[0-9]*"))


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def kill_tree(pgid: int, marker: str, grace_seconds: float) -> None:
    """SIGTERM the process group and every marked process, SIGKILL what is left after `grace_seconds`."""
    _signal_all(pgid, processes_with_marker(marker), signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and (_group_alive(pgid) or processes_with_marker(marker)):
        time.sleep(_POLL_SECONDS)
    # A process may fork between a scan and its signal: repeat until a scan finds nothing.
    for _ in range(50):
        remaining = processes_with_marker(marker)
        if not remaining and not _group_alive(pgid):
            return
        _signal_all(pgid, remaining, signal.SIGKILL)
        time.sleep(_POLL_SECONDS)


def _pump(stream: Iterable[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def run_command(argv: Sequence[str], on_line: Callable[[str], None], *, env: Mapping[str, str] | None = None,
                cwd: Path | None = None, grace_seconds: float = 10.0) -> int:
    """Run `argv` (no shell), hand each output line (stdout and stderr merged) to `on_line` in the calling
    thread, and return its exit status once it and every process it started are gone.

    On any exception in the caller, the command's whole tree is killed before the exception propagates.
    """
    marker = uuid.uuid4().hex
    child_env = dict(os.environ if env is None else env)
    child_env[MARKER_VAR] = marker
    child_env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               errors="replace", env=child_env, cwd=cwd, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    # A reader thread keeps this thread in Python code (short waits), so an asynchronous exception such as
    # Prefect's timeout is raised promptly even while the command prints nothing.
    reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        while (line := _next_line(lines, process)) is not None:
            on_line(line)
        returncode = process.wait()
    except BaseException:
        kill_tree(process.pid, marker, grace_seconds)
        process.wait()
        raise
    # Also after a normal exit: a rank that outlives its launcher is killed, not left running.
    kill_tree(process.pid, marker, grace_seconds)
    reader.join(timeout=grace_seconds)
    while not lines.empty():
        if (line := lines.get()) is not None:
            on_line(line)
    return returncode


def _next_line(lines: queue.Queue[str | None], process: subprocess.Popen[str]) -> str | None:
    """The next output line; None at the end of output, or once the command exited (a descendant that
    keeps the pipe open must not keep the caller waiting: it is killed next)."""
    while True:
        try:
            return lines.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if process.poll() is not None:
                return None
