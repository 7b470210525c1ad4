"""Kubernetes, offline: rendered PyTorchJobs against the training-operator's CRD schema, their pods'
environment against what `neva train` reads, the job's lifecycle against fake APIs, and the work pool's
base job template against the Kubernetes API types."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
from prefect.utilities.templating import apply_values

from k8s_support import (
    REPO,
    FakeCoreV1Api,
    FakeCustomObjectsApi,
    FakeLogResponse,
    operator_environment,
    validate_k8s,
    validate_pytorchjob,
)
from neva_core.errors import NevaError
from neva_core.train.arguments import build_train_parser, train_config_from_args
from neva_core.train.k8s import (
    PyTorchJobConfig,
    job_phase,
    load_pytorchjob_config,
    render_pytorchjob,
    run_pytorchjob,
)
from neva_core.train.launch import node_from_environment, torchrun_command, worker_from_environment

TRAIN_ARGS = ("--config", "configs/neva-llama2-7b-chat-tp4.yaml", "--shards", "/workspace/shards/coco",
              "--llm", "/workspace/native", "--vision", "/workspace/clip", "--tokenizer", "/workspace/tokenizer",
              "--out", "/workspace/runs/pretrain")


def job_config(**changes: object) -> PyTorchJobConfig:
    values = dict(name="neva-pretrain", namespace="training", image="registry.example/neva:1", nnodes=4,
                  gpus_per_node=8, train_args=TRAIN_ARGS, pvc="neva-work",
                  node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, env={"NCCL_DEBUG": "WARN"},
                  service_account="neva-trainer")
    return PyTorchJobConfig(**(values | changes))


VARIANTS = {
    "4x8 GPUs, PVC": job_config(),
    "single node": job_config(nnodes=1),
    "CPU, no PVC, no shm": job_config(nnodes=2, gpus_per_node=0, pvc=None, node_selector={}, env={},
                                      service_account=None, shm_size=None, ttl_seconds_after_finished=None),
}


@pytest.mark.parametrize("config", VARIANTS.values(), ids=VARIANTS.keys())
def test_rendered_pytorchjobs_match_the_crd_and_the_pod_schema(config: PyTorchJobConfig) -> None:
    job = render_pytorchjob(config)
    validate_pytorchjob(job)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert sum(spec["replicas"] for spec in specs.values()) == config.nnodes
    commands = set()
    for spec in specs.values():
        validate_k8s(spec["template"], "V1PodTemplateSpec")
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        commands.add(tuple(container["command"]))
        if config.gpus_per_node:
            assert container["resources"]["limits"] == {"nvidia.com/gpu": str(config.gpus_per_node)}
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["template"]["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v]
        assert claims == ([config.pvc] if config.pvc else [])
    assert commands == {("neva", "train", *config.train_args)}


def test_the_validators_refuse_what_a_cluster_would_refuse() -> None:
    job = render_pytorchjob(job_config())
    misspelt = json.loads(json.dumps(job))
    misspelt["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate_pytorchjob(misspelt)
    wrong_type = json.loads(json.dumps(job))
    wrong_type["spec"]["nprocPerNode"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_pytorchjob(wrong_type)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    with pytest.raises(ValueError, match="no field 'volumeMount'"):
        validate_k8s({**pod, "spec": {**pod["spec"], "containers": [
            {**pod["spec"]["containers"][0], "volumeMount": []}]}}, "V1PodTemplateSpec")
    with pytest.raises(ValueError, match="name"):
        validate_k8s({"containers": [{"image": "x"}]}, "V1PodSpec")


def test_every_pod_finds_its_place_as_neva_train_reads_it() -> None:
    config = job_config()
    job = render_pytorchjob(config)
    pods = [("Master", 0)] + [("Worker", index) for index in range(config.nnodes - 1)]
    parser = build_train_parser()
    node_ranks, launched_ranks = [], []
    for replica_type, index in pods:
        env = operator_environment(job, replica_type, index)
        node = node_from_environment(env)
        assert node == {"nnodes": 4, "node_rank": node["node_rank"], "nproc": 8, "master_addr": "neva-pretrain-master-0",
                        "master_port": 23456}
        node_ranks.append(node["node_rank"])
        (container,) = job["spec"]["pytorchReplicaSpecs"][replica_type]["template"]["spec"]["containers"]
        train = train_config_from_args(parser.parse_args(container["command"][2:]), env)
        assert (train.nnodes, train.nproc, train.node_rank) == (4, 8, node["node_rank"])
        argv = torchrun_command(train, "neva_core.train.main", [])
        assert argv[argv.index("--master-addr") + 1] == "neva-pretrain-master-0"
        # What torchrun then gives each of the node's processes.
        for local_rank in range(train.nproc):
            worker = worker_from_environment({
                "RANK": str(train.node_rank * train.nproc + local_rank), "LOCAL_RANK": str(local_rank),
                "WORLD_SIZE": str(train.nnodes * train.nproc), "MASTER_ADDR": train.master_addr,
                "MASTER_PORT": str(train.master_port)})
            assert worker.world_size == int(env["WORLD_SIZE"])  # the operator's count agrees with torchrun's
            launched_ranks.append(worker.rank)
    assert sorted(node_ranks) == [0, 1, 2, 3]
    assert sorted(launched_ranks) == list(range(32))


def test_bad_job_settings_name_the_key() -> None:
    with pytest.raises(NevaError, match="train_args.*--node-rank.*operator sets each pod's place"):
        load_pytorchjob_config(job_config().model_dump() | {"train_args": (*TRAIN_ARGS, "--node-rank", "1")})
    with pytest.raises(NevaError, match="env.*RANK"):
        load_pytorchjob_config(job_config().model_dump() | {"env": {"RANK": "0"}})
    with pytest.raises(NevaError, match="name.*not a Kubernetes name"):
        load_pytorchjob_config(job_config().model_dump() | {"name": "Neva_Pretrain"})
    with pytest.raises(NevaError, match="too long"):
        load_pytorchjob_config(job_config().model_dump() | {"name": "n" * 60})


LOG = [b"step 1 loss 2.0\nstep 2 lo", b"ss 1.5\n", b"done\n"]


def test_a_succeeding_job_forwards_the_master_log_and_is_kept() -> None:
    custom = FakeCustomObjectsApi([None, "Created", "Running", "Running", "Succeeded"])
    core = FakeCoreV1Api(FakeLogResponse(LOG))
    lines: list[str] = []
    job = run_pytorchjob(job_config(), custom, core, lines.append, poll_seconds=0.01)
    assert job_phase(job)[0] == "Succeeded"
    assert lines == ["step 1 loss 2.0", "step 2 loss 1.5", "done"]
    validate_pytorchjob(custom.created[0])
    (name, namespace, options), *_ = core.log_calls
    assert (name, namespace, options["container"], options["follow"]) == ("neva-pretrain-master-0", "training",
                                                                         "pytorch", True)
    assert custom.deleted == []


def test_the_master_log_is_followed_again_while_its_container_starts() -> None:
    from kubernetes.client.exceptions import ApiException

    class Starting(FakeCoreV1Api):
        def read_namespaced_pod_log(self, name: str, namespace: str, **kwargs: object) -> FakeLogResponse:
            if not self.log_calls:
                self.log_calls.append((name, namespace, kwargs))
                raise ApiException(status=400, reason="container pytorch is waiting to start: ContainerCreating")
            return super().read_namespaced_pod_log(name, namespace, **kwargs)

    core = Starting(FakeLogResponse(LOG))
    lines: list[str] = []
    run_pytorchjob(job_config(), FakeCustomObjectsApi(["Running"] * 5 + ["Succeeded"]), core, lines.append,
                   poll_seconds=0.01)
    assert lines == ["step 1 loss 2.0", "step 2 loss 1.5", "done"] and len(core.log_calls) == 2


def test_a_failed_job_raises_and_is_deleted() -> None:
    custom = FakeCustomObjectsApi(["Running", "Failed"], message="pod neva-pretrain-worker-1 OOMKilled")
    with pytest.raises(NevaError, match="training/neva-pretrain failed: pod neva-pretrain-worker-1 OOMKilled"):
        run_pytorchjob(job_config(), custom, FakeCoreV1Api(FakeLogResponse([])), lambda line: None,
                       poll_seconds=0.01)
    assert [entry[2:5] for entry in custom.deleted] == [("training", "pytorchjobs", "neva-pretrain")]


def test_a_taken_job_name_is_a_clear_error() -> None:
    from kubernetes.client.exceptions import ApiException

    class Taken(FakeCustomObjectsApi):
        def create_namespaced_custom_object(self, *args: object, **kwargs: object) -> dict:
            raise ApiException(status=409, reason="AlreadyExists")

    custom = Taken(["Running"])
    with pytest.raises(NevaError, match="training/neva-pretrain already exists"):
        run_pytorchjob(job_config(), custom, FakeCoreV1Api(FakeLogResponse([])), lambda line: None)
    assert custom.deleted == []  # someone else's job: never deleted


class Cancelled(BaseException):
    """What a cancelled Prefect run raises in the task (TerminationSignal is a BaseException too)."""


def test_an_interrupted_run_deletes_the_job_and_its_pods() -> None:
    custom = FakeCustomObjectsApi(["Running"])
    response = FakeLogResponse([b"step 1 loss 2.0\n"], hold=threading.Event())

    def cancel_on_first_line(line: str) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        run_pytorchjob(job_config(), custom, FakeCoreV1Api(response), cancel_on_first_line, poll_seconds=0.01)
    ((group, version, namespace, plural, name, body),) = custom.deleted
    assert (group, version, namespace, plural, name) == ("kubeflow.org", "v1", "training", "pytorchjobs",
                                                         "neva-pretrain")
    assert body == {"propagationPolicy": "Foreground"}
    assert response.closed


BASE_TEMPLATE = REPO / "deployments" / "k8s" / "base-job-template.json"


def render_base_template(**values: object) -> dict:
    """The job configuration as the worker renders it: variable defaults, then the given values; the
    Kubernetes worker then turns `env` into a list and the command string into args."""
    template = json.loads(BASE_TEMPLATE.read_text())
    variables = template["variables"]
    defaults = {name: spec["default"] for name, spec in variables["properties"].items() if "default" in spec}
    jsonschema.validate(values, variables)
    rendered = apply_values(template["job_configuration"], defaults | values)
    (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = container["args"].split()
    return rendered


def test_base_job_template_renders_a_valid_gpu_job_with_the_claim() -> None:
    rendered = render_base_template(
        name="neva-pretrain-abc", command="prefect flow-run execute", namespace="training",
        env={"PREFECT__FLOW_RUN_ID": "1234"}, labels={"prefect.io/flow-run-id": "1234"},
        image="registry.example/neva:1", pvc_name="neva-work", gpus=8, service_account_name="neva-trainer",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    manifest = rendered["job_manifest"]
    validate_k8s(manifest, "V1Job")
    pod = manifest["spec"]["template"]["spec"]
    validate_k8s(pod, "V1PodSpec")
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "neva-work"}
    assert container["volumeMounts"][0] == {"name": "workspace", "mountPath": "/workspace"}
    assert (pod["serviceAccountName"], manifest["metadata"]["namespace"]) == ("neva-trainer", "training")


def test_base_job_template_without_optional_values_is_still_valid() -> None:
    rendered = render_base_template(name="n", command="prefect flow-run execute", env={}, labels={},
                                    image="registry.example/neva:1", pvc_name="neva-work")
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    validate_k8s(pod, "V1PodSpec")
    assert "nodeSelector" not in pod and "serviceAccountName" not in pod
    with pytest.raises(jsonschema.ValidationError, match="pvc_name"):
        render_base_template(name="n", command="c", env={}, labels={}, image="registry.example/neva:1")


def kubernetes_training(tmp_path, **changes: object):
    from neva_core.train.config import TrainConfig
    from neva_core.train.k8s import PyTorchJobSettings

    work = tmp_path / "claim" / "work"
    config = TrainConfig(shards=work / "shards", llm=work / "llm", vision=work / "clip", tokenizer=work / "tok",
                         out=work / "runs" / "pretrain-0123abcd", stage="pretrain", template="plain", max_steps=4,
                         micro_batch=2, global_batch=8, lr=1e-3)
    values = dict(image="registry.example/neva:1", nnodes=2, gpus_per_node=2, pvc="neva-work",
                  mount_path=str(tmp_path / "claim"))
    return config, PyTorchJobSettings(**(values | changes))


def test_the_train_task_runs_a_pytorchjob_whose_pods_read_the_run_and_their_place(tmp_path, monkeypatch) -> None:
    import tasks.kubernetes
    from neva_core.train.config import TrainConfig
    from tasks.train import run_trainer

    config, settings = kubernetes_training(tmp_path)
    custom = FakeCustomObjectsApi(["Created", "Running", "Succeeded"])
    core = FakeCoreV1Api(FakeLogResponse([b"step 1 loss 2.0\nfinished at ", b"step 4\n"]))
    monkeypatch.setattr(tasks.kubernetes, "kubernetes_apis", lambda: (custom, core))
    monkeypatch.setattr("tasks.train.JOB_POLL_SECONDS", 0.01)
    lines: list[str] = []
    assert run_trainer(config, lines.append, settings) == 0
    assert lines == ["step 1 loss 2.0", "finished at step 4"]  # the master's log, as the progress parser reads it
    (job,) = custom.created
    validate_pytorchjob(job)
    assert job["metadata"]["name"].startswith("neva-pretrain-0123abcd-")
    parser = build_train_parser()
    for replica_type, index, node_rank in (("Master", 0, 0), ("Worker", 0, 1)):
        (container,) = job["spec"]["pytorchReplicaSpecs"][replica_type]["template"]["spec"]["containers"]
        assert container["command"][:3] == ["neva", "train", "--config"]
        # The file on the claim holds this run; the operator's environment gives each pod its place.
        placed = train_config_from_args(parser.parse_args(container["command"][2:]),
                                        operator_environment(job, replica_type, index))
        assert placed.model_dump(exclude={"nnodes", "node_rank", "nproc", "master_addr", "master_port"}) == \
            config.model_dump(exclude={"nnodes", "node_rank", "nproc", "master_addr", "master_port"})
        assert (placed.nnodes, placed.nproc, placed.node_rank) == (2, 2, node_rank)
    assert TrainConfig.model_validate_json(config.out.with_name("pretrain-0123abcd.train.json").read_text()) == config


def test_a_failed_training_job_is_retried_and_a_workdir_off_the_claim_is_refused(tmp_path, monkeypatch) -> None:
    import tasks.kubernetes
    from tasks.train import TrainerFailed, retry_unless_bad_input, run_trainer

    config, settings = kubernetes_training(tmp_path)
    custom = FakeCustomObjectsApi(["Running", "Failed"], message="pod neva-worker-0 OOMKilled")
    monkeypatch.setattr(tasks.kubernetes, "kubernetes_apis",
                        lambda: (custom, FakeCoreV1Api(FakeLogResponse([]))))
    monkeypatch.setattr("tasks.train.JOB_POLL_SECONDS", 0.01)
    with pytest.raises(TrainerFailed, match="OOMKilled.*a retry starts a new job that resumes") as failed:
        run_trainer(config, lambda line: None, settings)
    assert len(custom.deleted) == 1
    state = type("State", (), {"data": failed.value})()
    assert retry_unless_bad_input(None, None, state)
    _, elsewhere = kubernetes_training(tmp_path, mount_path="/workspace")
    with pytest.raises(NevaError, match=r"out, shards, .* are outside mount_path /workspace"):
        run_trainer(config, lambda line: None, elsewhere)
    with pytest.raises(NevaError, match="pvc is not set"):
        run_trainer(config, lambda line: None, settings.model_copy(update={"pvc": None}))
