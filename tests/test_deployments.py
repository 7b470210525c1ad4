"""deployments/prefect.yaml, checked without a server: what `prefect deploy --all` reads from it parses,
its entrypoints load the flow, its schedules and concurrency limit are valid, and its parameters fit the
flow's parameters."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.flows import load_flow_from_entrypoint
from prefect.server.schemas.schedules import CronSchedule as ServerCronSchedule
from prefect.utilities.callables import parameter_schema


REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


@pytest.fixture(scope="module")
def project() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def deployments(project: dict) -> dict[str, dict]:
    return {deployment["name"]: deployment for deployment in project["deployments"]}


def test_prefect_deploy_reads_three_deployments_on_a_process_pool(project: dict, deployments: dict) -> None:
    model = PrefectYamlModel.model_validate(project)
    assert [d.name for d in model.deployments] == ["pretrain", "finetune", "nightly"]
    for raw in project["deployments"]:
        # Prefect ignores unknown keys; a misspelt one (`schedule:` vs `schedules:`) would silently do nothing.
        assert set(raw) <= set(DeploymentConfig.model_fields), raw["name"]
    assert {d.work_pool.name for d in model.deployments} == {"neva-process"}
    assert all(d.work_pool.job_variables["env"]["PYTHONUNBUFFERED"] == "1" for d in model.deployments)


def test_entrypoints_load_the_neva_flow_from_the_repo_root(deployments: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    for deployment in deployments.values():
        assert load_flow_from_entrypoint(deployment["entrypoint"]).name == "neva"


def test_parameters_fit_the_flow_signature(deployments: dict) -> None:
    from flows.neva import neva

    schema = parameter_schema(neva.fn).model_dump_for_openapi()
    assert set(schema["properties"]) == {"demo", "stage", "config"}
    assert schema["properties"]["demo"]["default"] is False
    for deployment in deployments.values():
        jsonschema.validate(deployment["parameters"], schema)
    assert {name: d["parameters"]["stage"] for name, d in deployments.items()} == {
        "pretrain": "pretrain", "finetune": "finetune", "nightly": "finetune"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"stage": "pretrian"}, schema)


def test_nightly_runs_every_night_in_its_timezone_one_at_a_time(deployments: dict) -> None:
    nightly = deployments["nightly"]
    (raw,) = nightly["schedules"]
    schedule = _schedule_config_to_deployment_schedule(raw)["schedule"]
    assert schedule.timezone == "Europe/Berlin"
    # The server's own schedule model: the dates the scheduler will create runs for.
    server_schedule = ServerCronSchedule.model_validate(schedule.model_dump())
    runs = asyncio.run(server_schedule.get_dates(n=2, start=datetime(2026, 3, 28, tzinfo=timezone.utc)))
    # 02:00 in Berlin is 01:00 UTC in winter time, 00:00 UTC after the switch to summer time on 29 March.
    assert [(run.day, run.astimezone(timezone.utc).hour) for run in runs] == [(28, 1), (29, 0)]
    limit = ConcurrencyLimitConfig.model_validate(nightly["concurrency_limit"])
    assert (limit.limit, limit.collision_strategy) == (1, ConcurrencyLimitStrategy.CANCEL_NEW)
    assert "schedules" not in deployments["pretrain"] and "schedules" not in deployments["finetune"]
