"""A command whose grandchild leaves the process group (setsid) and ignores SIGTERM, as a stray rank might."""

from __future__ import annotations

import sys

GRANDCHILD = """
import os, signal, time
os.setsid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("grandchild", os.getpid(), flush=True)
time.sleep(120)
"""

# argv[1]: "sleep" (wait to be killed) or "exit" (exit with status 3, leaving the grandchild running).
CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(grandchild.stdout.readline().strip(), flush=True)
print("ready", os.environ["NEVA_RUN_MARKER"], flush=True)
if sys.argv[1] == "exit":
    sys.exit(3)
time.sleep(120)
"""


def stray_command(mode: str) -> list[str]:
    return [sys.executable, "-c", CHILD, mode, GRANDCHILD]


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"
