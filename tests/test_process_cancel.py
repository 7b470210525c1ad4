"""A flow run cancelled through the API, as a worker executes it, leaves no process of its task behind."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
import warnings
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.flows import load_flow_from_entrypoint
from prefect.runner import Runner
from prefect.server.api.server import SubprocessASGIServer
from prefect.states import Cancelling

from neva_core.process import MARKER_VAR

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "tests/cancel_support.py:cancel_probe"


def tagged(tag: str) -> list[tuple[int, bool, bool]]:
    """(pid, carries the run marker, leads its own session) of each live process carrying the test's tag."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if f"NEVA_TEST_TAG={tag}".encode() in environ and stat[stat.rindex(")") + 2] not in "ZX":
            pid = int(proc.name)
            try:
                leader = os.getsid(pid) == pid
            except OSError:
                continue
            found.append((pid, any(item.startswith(MARKER_VAR.encode() + b"=") for item in environ), leader))
    return found


async def wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.2)


async def cancel_mid_run(tag: str) -> str:
    async with get_client() as client:
        flow_run = await client.create_flow_run(load_flow_from_entrypoint(str(REPO / ENTRYPOINT)))
        env = {"PREFECT_API_URL": SubprocessASGIServer().api_url, "NEVA_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # execute_flow_run is deprecated for newer runner internals
            runner = Runner(name=f"cancel-{tag[:8]}")
            async with runner:
                execution = asyncio.create_task(runner.execute_flow_run(flow_run.id, entrypoint=ENTRYPOINT,
                                                                        cwd=REPO, env=env))
                # The command and its grandchild both lead their own session once the grandchild called setsid.
                await wait_for(lambda: sum(marked and leader for _, marked, leader in tagged(tag)) == 2, 60)
                await client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
                await asyncio.wait_for(execution, 60)
        return (await client.read_flow_run(flow_run.id)).state.name


def test_cancelled_flow_run_leaves_no_process_behind() -> None:
    tag = uuid.uuid4().hex
    state = asyncio.run(cancel_mid_run(tag))
    assert state == "Cancelled"
    deadline = time.monotonic() + 10
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged(tag) == []


def test_task_timeout_leaves_no_process_behind() -> None:
    import threading

    from cancel_support import timeout_probe

    tag = uuid.uuid4().hex
    leaders_seen: list[int] = []
    done = threading.Event()

    def watch() -> None:  # what ran during the task: the command and its setsid grandchild
        while not done.is_set():
            leaders_seen.append(sum(marked and leader for _, marked, leader in tagged(tag)))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        state = timeout_probe({**os.environ, "NEVA_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}, return_state=True)
    finally:
        done.set()
        watcher.join()
    assert state.is_failed() and "timeout" in state.message.lower().replace(" ", ""), state.message
    assert max(leaders_seen) == 2
    assert tagged(tag) == []
