"""Multi-node training from a task: a PyTorchJob whose master's log lines go to the task's log, and which
is deleted when the run is cancelled or times out (see neva_core.train.k8s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neva_core.train.k8s import PyTorchJobConfig, kubernetes_apis, run_pytorchjob
from tasks.process import run_logger


def run_pytorchjob_logged(config: PyTorchJobConfig, poll_seconds: float = 5.0,
                          on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the job with the cluster credentials of this pod (else the kubeconfig); return the finished job.
    The master's lines go to `on_line` (default: the task run's log)."""
    custom_api, core_api = kubernetes_apis()
    return run_pytorchjob(config, custom_api, core_api, on_line or run_logger().info, poll_seconds=poll_seconds)
