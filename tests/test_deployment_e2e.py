"""What a user does with deployments/prefect.yaml, against a real Prefect server on 127.0.0.1 with a temporary
PREFECT_HOME: create the process pool, `prefect deploy --all`, start a worker, run `neva/pretrain` with
`--param demo=true --watch`, run it again (all Cached), see nightly's schedule make runs, cancel a finetune
mid-training through the API, stop the worker with two signals and the server, and find no process left.

One server and worker serve the whole module; the last test stops them. Tests run in file order.
"""

from __future__ import annotations

import base64
import io
import signal
from collections.abc import Iterator
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import Artifact, FlowRun, TaskRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import Cancelling

from deployment_support import POOL, PrefectStack, TaggedProcess, copy_checkout, tagged_processes, wait_until

pytestmark = pytest.mark.slow

PREFECT_FILE = "deployments/prefect.yaml"
TRAIN_TASK = "train"  # task-run names are "<task name>-<suffix>"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    stack = PrefectStack(checkout=copy_checkout(tmp_path_factory.mktemp("user") / "neva"),
                         home=tmp_path_factory.mktemp("prefect-home"), logs=tmp_path_factory.mktemp("prefect-logs"))
    try:
        stack.start_server()
        stack.prefect("work-pool", "create", POOL, "--type", "process")
        stack.start_worker(wait=False)  # it starts while the deployments are created, as in two terminals
        stack.prefect("deploy", "--all", "--prefect-file", PREFECT_FILE)
        stack.wait_for_worker()
        yield stack
    finally:
        stack.kill_everything()


@pytest.fixture(scope="module")
def client(stack: PrefectStack) -> Iterator[SyncPrefectClient]:
    with SyncPrefectClient(api=stack.api_url) as client:
        yield client


@pytest.fixture(scope="module")
def first_pretrain(stack: PrefectStack) -> str:
    flow_run_id, _ = stack.run_deployment("neva/pretrain", "demo=true")
    return flow_run_id


def task_runs(client: SyncPrefectClient, flow_run_id: str) -> list[TaskRun]:
    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def artifacts(client: SyncPrefectClient, flow_run_id: str) -> list[Artifact]:
    return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def states(runs: list[TaskRun]) -> dict[str, str]:
    return {run.name: run.state.name for run in runs if run.state is not None}


def test_demo_pretrain_deployment_run_completes_with_progress_and_loss_curve(
    client: SyncPrefectClient, first_pretrain: str
) -> None:
    flow_run = client.read_flow_run(first_pretrain)
    assert flow_run.state.name == "Completed" and flow_run.name.startswith("demo-pretrain-"), flow_run.name
    runs = task_runs(client, first_pretrain)
    assert any(run.name.startswith(f"{TRAIN_TASK}-") for run in runs), states(runs)
    assert set(states(runs).values()) == {"Completed"}, states(runs)
    by_type = {}
    for artifact in artifacts(client, first_pretrain):
        by_type.setdefault(artifact.type, []).append(artifact)
    assert "progress" in by_type and "image" in by_type, sorted(by_type)
    assert [progress.data for progress in by_type["progress"]] == [100.0] * len(by_type["progress"])
    (image,) = by_type["image"]
    header, _, encoded = image.data.partition(",")
    assert header == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as png:
        assert png.format == "PNG" and png.width > 1 and png.height > 1


def test_second_demo_pretrain_run_is_all_cached(stack: PrefectStack, client: SyncPrefectClient,
                                               first_pretrain: str) -> None:
    flow_run_id, _ = stack.run_deployment("neva/pretrain", "demo=true")
    assert client.read_flow_run(flow_run_id).state.name == "Completed"
    rerun, first = states(task_runs(client, flow_run_id)), states(task_runs(client, first_pretrain))
    assert len(rerun) == len(first) and set(rerun.values()) == {"Cached"}, rerun


def test_nightly_schedule_makes_scheduled_runs_at_two_in_berlin(client: SyncPrefectClient) -> None:
    nightly = DeploymentFilter(name=DeploymentFilterName(any_=["nightly"]))

    def scheduled() -> list[FlowRun]:
        return [run for run in client.read_flow_runs(deployment_filter=nightly) if run.state_name == "Scheduled"]

    runs = wait_until(scheduled, 30, "the scheduler to create nightly's runs")
    berlin = ZoneInfo("Europe/Berlin")
    for run in runs:
        start = run.expected_start_time.astimezone(berlin)
        assert (start.hour, start.minute) == (2, 0) and run.expected_start_time > datetime.now(timezone.utc), start
        assert run.parameters == {"demo": False, "stage": "finetune"}


def test_cancelled_finetune_run_leaves_no_training_process(stack: PrefectStack, client: SyncPrefectClient) -> None:
    deployment = client.read_deployment_by_name("neva/finetune")
    flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"demo": True})
    seen: set[str] = set()  # the markers of the trainer command and everything it started

    def training() -> bool:
        state = client.read_flow_run(flow_run.id).state
        if state is not None and state.is_final():
            raise AssertionError(f"the finetune run ended {state.name} before training: {state.message}")
        seen.update(p.marker for p in tagged_processes(stack.tag) if p.marker)
        train = [run for run in task_runs(client, flow_run.id) if run.name.startswith(f"{TRAIN_TASK}-")]
        return bool(seen) and any(run.state is not None and run.state.name == "Running" for run in train)

    # Once the trainer runs (the pretrain it starts from is cached by now); the finetune trains 2400 steps.
    wait_until(training, 240, f"the finetune's trainer to start:\n{stack.log('worker')[-4000:]}", interval=1)
    # What the UI's cancel button and `prefect flow-run cancel` send.
    assert client.set_flow_run_state(flow_run.id, Cancelling()).status == SetStateStatus.ACCEPT
    wait_until(lambda: client.read_flow_run(flow_run.id).state.name == "Cancelled", 90,
               f"the run to be cancelled:\n{stack.log('worker')[-4000:]}")

    def marked_left() -> list[TaggedProcess]:
        return [p for p in tagged_processes(stack.tag) if p.marker in seen]

    wait_until(lambda: not marked_left(), 20, "the training processes to end")
    # Only the server and the worker remain: the flow-run process is gone too.
    stack_pids = {stack.server.pid, stack.worker.pid}
    wait_until(lambda: {p.pid for p in tagged_processes(stack.tag)} <= stack_pids, 20, "the flow-run process to end")


def test_worker_stops_on_two_signals_and_server_stops_leaving_no_process(stack: PrefectStack) -> None:
    # The second signal makes the worker kill itself when its graceful shutdown has not finished yet.
    status = stack.stop_worker()
    assert status in (0, -signal.SIGTERM, -signal.SIGKILL), f"{status}:\n{stack.log('worker')[-4000:]}"
    stack.stop_server()
    wait_until(lambda: not tagged_processes(stack.tag), 20, "every process the stack started to end")
