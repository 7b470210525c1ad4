"""A flow whose task runs a command that leaves a setsid grandchild behind, as a stray rank would.

Loaded by path (`python -m prefect.engine` with an entrypoint), so it imports nothing from tests/."""

from __future__ import annotations

import sys

from prefect import flow, task

from tasks.process import run_logged

GRANDCHILD = "import os, time\nos.setsid()\ntime.sleep(120)\n"
CHILD = ("import subprocess, sys, time\n"
         "subprocess.Popen([sys.executable, '-c', sys.argv[1]])\n"
         "print('started', flush=True)\n"
         "time.sleep(120)\n")


@task(name="hold")
def hold() -> int:
    return run_logged([sys.executable, "-c", CHILD, GRANDCHILD], grace_seconds=1.0)


@flow(name="cancel-probe")
def cancel_probe() -> int:
    return hold()


@task(name="hold-with-timeout", timeout_seconds=2)
def hold_with_timeout(env: dict[str, str]) -> int:
    return run_logged([sys.executable, "-c", CHILD, GRANDCHILD], env=env, grace_seconds=1.0)


@flow(name="timeout-probe")
def timeout_probe(env: dict[str, str]) -> int:
    return hold_with_timeout(env)
