"""What a user runs to serve the `neva` deployments, as subprocesses: a Prefect server on 127.0.0.1, the
process work pool, `prefect deploy --all`, a worker, `prefect deployment run ... --watch`, all from the root
of a checkout of the project (a copy, so that runs write their default workdir there, not into this one).

Every process the stack starts, and everything those start (flow-run processes, training ranks, even
those that called setsid), inherits TAG_VAR=<tag> in its environment, so /proc tells what is still alive.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from neva_core.process import MARKER_VAR

REPO = Path(__file__).resolve().parents[1]
PREFECT = Path(sys.executable).with_name("prefect")
TAG_VAR = "NEVA_E2E_TAG"
POOL = "neva-process"
PROC = Path("/proc")
# What a deployment run needs of a checkout: the flow's code and the training presets.
CHECKOUT_PARTS = ("pyproject.toml", "flows", "tasks", "neva_core", "configs", "deployments")


def copy_checkout(dest: Path) -> Path:
    """The parts of this checkout a deployment run uses, copied to `dest` (made)."""
    dest.mkdir(parents=True)
    for part in CHECKOUT_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / part)
    return dest


@dataclass(frozen=True)
class TaggedProcess:
    pid: int
    marker: str | None  # MARKER_VAR's value: set for a command run by neva_core.process and its descendants
    command: str


def tagged_processes(tag: str) -> list[TaggedProcess]:
    """The live processes (zombies excluded) whose environment carries TAG_VAR=tag."""
    entry, marker_prefix = f"{TAG_VAR}={tag}".encode(), f"{MARKER_VAR}=".encode()
    found = []
    for proc in PROC.glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        if entry not in environ or stat[stat.rindex(")") + 2] in "ZX":
            continue
        marker = next((item[len(marker_prefix):].decode() for item in environ if item.startswith(marker_prefix)), None)
        found.append(TaggedProcess(int(proc.name), marker, command))
    return found


def wait_until(condition: Callable[[], object], seconds: float, what: str, interval: float = 0.2) -> object:
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + seconds
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrefectStack:
    """A server, a process pool and a worker under one temporary PREFECT_HOME."""

    checkout: Path  # the commands' working directory: the root of a checkout
    home: Path
    logs: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    _log_files: list[IO[bytes]] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
            # DeepSpeed's CPU communication op is built once per checkout and shared with the training tests:
            # on a fresh clone the first deployment run pays that build (about a minute, more on busy cores).
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
            TAG_VAR: self.tag,
        }
        return {**env, **(extra or {})}

    def prefect(self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None) -> str:
        """Run `prefect ARGS...` from the checkout's root, as a user types it; its output, or fail showing it."""
        done = subprocess.run([str(PREFECT), *args], cwd=self.checkout, env=self.env(env), capture_output=True, text=True,
                              timeout=timeout)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise AssertionError(f"`prefect {' '.join(args)}` exited {done.returncode}:\n{output}")
        return output

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # a file, not a pipe: a full pipe would block the server
        self._log_files.append(log)
        return subprocess.Popen([str(PREFECT), *argv], cwd=self.checkout, env=self.env(env), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start_server(self, timeout: float = 60) -> None:
        # The scheduler looks at newly created deployments every second instead of every 5 s.
        self.server = self._spawn("server", ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                  {"PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1"})
        wait_until(self._healthy, timeout, f"the Prefect server on port {self.port}:\n{self.log('server')}")

    def _healthy(self) -> bool:
        if self.server is not None and self.server.poll() is not None:
            raise AssertionError(f"the Prefect server exited {self.server.returncode}:\n{self.log('server')}")
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self, wait: bool = True) -> None:
        # Poll for work every second (default 10 s), and look only a second ahead: nightly's runs wait.
        self.worker = self._spawn("worker", ["worker", "start", "--pool", POOL],
                                  {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"})
        if wait:
            self.wait_for_worker()

    def wait_for_worker(self, timeout: float = 60) -> None:
        wait_until(self._worker_ready, timeout, f"the worker to start:\n{self.log('worker')}")

    def _worker_ready(self) -> bool:
        if self.worker is not None and self.worker.poll() is not None:
            raise AssertionError(f"the worker exited {self.worker.returncode}:\n{self.log('worker')}")
        return "started!" in self.log("worker")

    def run_deployment(self, name: str, *params: str, timeout: float = 900) -> tuple[str, str]:
        """`prefect deployment run NAME --param P... --watch`: the flow run's id and the command's output."""
        args = ["deployment", "run", name, *(arg for p in params for arg in ("--param", p)), "--watch"]
        output = self.prefect(*args, timeout=timeout)
        match = re.search(r"UUID: ([0-9a-f-]{36})", output)
        if match is None:
            raise AssertionError(f"no flow run id in the output of `prefect {' '.join(args)}`:\n{output}")
        return match.group(1), output

    def stop_worker(self, timeout: float = 30) -> int:
        """Two SIGTERMs, as the worker needs (one only starts a graceful shutdown that waits on its websocket)."""
        assert self.worker is not None
        for _ in range(2):
            if self.worker.poll() is None:
                self.worker.send_signal(signal.SIGTERM)
                time.sleep(1)
        return self.worker.wait(timeout)

    def stop_server(self, timeout: float = 30) -> int:
        assert self.server is not None
        self.server.send_signal(signal.SIGTERM)
        return self.server.wait(timeout)

    def kill_everything(self) -> None:
        """Last resort after a failure: nothing the stack started survives the test session."""
        for proc in (self.worker, self.server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for stray in tagged_processes(self.tag):
            try:
                os.kill(stray.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in self._log_files:
            log.close()
