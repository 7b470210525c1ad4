"""A command's lines, and a PyTorchJob master's, reach the task run's log on Prefect's server."""

from __future__ import annotations

import logging
import sys

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

import tasks.kubernetes
from k8s_support import FakeCoreV1Api, FakeCustomObjectsApi, FakeLogResponse
from neva_core.train.k8s import PyTorchJobConfig
from tasks.kubernetes import run_pytorchjob_logged
from tasks.process import run_logged

pytestmark = pytest.mark.slow

JOB = PyTorchJobConfig(name="neva-logs", image="registry.example/neva:1", nnodes=2, gpus_per_node=0,
                       train_args=("--config", "configs/tiny-pretrain.yaml"))


@task(name="command")
def command() -> int:
    return run_logged([sys.executable, "-c", "print('rank 0: step 1'); print('rank 0: step 2')"])


@task(name="pytorchjob")
def pytorchjob() -> str:
    return run_pytorchjob_logged(JOB, poll_seconds=0.01)["metadata"]["name"]


@flow(name="logs-probe")
def logs_probe() -> tuple[int, str]:
    return command(), pytorchjob()


def test_lines_are_task_run_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    apis = (FakeCustomObjectsApi(["Running", "Succeeded"]), FakeCoreV1Api(FakeLogResponse([b"master: step 7\n"])))
    monkeypatch.setattr(tasks.kubernetes, "kubernetes_apis", lambda: apis)
    # The suite logs at WARNING (conftest); these lines are INFO records.
    task_logger = logging.getLogger("prefect.task_runs")
    level = task_logger.level
    task_logger.setLevel(logging.INFO)
    try:
        state = logs_probe(return_state=True)
    finally:
        task_logger.setLevel(level)
    assert state.result() == (0, "neva-logs")
    APILogHandler().flush()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    by_message = {log.message: log for log in logs}
    for message in ("rank 0: step 1", "rank 0: step 2", "master: step 7"):
        assert by_message[message].task_run_id is not None, message
    assert by_message["rank 0: step 1"].task_run_id != by_message["master: step 7"].task_run_id
