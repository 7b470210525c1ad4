"""`neva train` across Kubernetes nodes as a Kubeflow PyTorchJob (training-operator, kubeflow.org/v1).

One pod per node: a Master and nnodes - 1 Workers, whose containers (all named `pytorch`, as the operator
requires) run the same `neva train ...` argv. The operator gives each pod its place in the environment
(PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK = RANK, MASTER_ADDR/PORT pointing at the master pod), which
`node_from_environment` reads, so the argv never names a node. Outputs go to a PersistentVolumeClaim every
pod mounts (checkpoints must be on storage all nodes share).

`run_pytorchjob` creates the job, follows its status conditions and the master's log, and deletes it when
the caller is interrupted (a cancelled run, a timeout): no pod outlives the run that started it.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neva_core.errors import NevaError
from neva_core.train.config import TrainConfig, flag

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the training container and its port by these names
PORT_NAME = "pytorchjob-port"
GPU_RESOURCE = "nvidia.com/gpu"
# The pod's place comes from the operator's environment; flags saying otherwise would contradict it.
PLACE_FLAGS = frozenset({*(flag(name) for name in ("nproc", "nnodes", "node_rank", "master_addr", "master_port",
                                                   "hostfile", "ssh")), "--no-ssh"})
OPERATOR_ENV = frozenset({"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONUNBUFFERED"})
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_POLL_SECONDS = 5.0


class PyTorchJobSettings(BaseModel):
    """Where and how a training job runs on the cluster: everything but its name and `neva train` flags
    (the `neva` flow's `train.kubernetes`, which names each job and writes the flags itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = "default"
    image: str = Field(description="a container image with neva installed (the `neva` command on PATH)")
    nnodes: int = Field(ge=1, description="pods, one per node: a master and nnodes - 1 workers")
    gpus_per_node: int = Field(ge=0, description="nvidia.com/gpu per pod; one training process per GPU")
    nproc_per_node: int | None = Field(default=None, ge=1, description="processes per pod (default: the GPUs, "
                                       "or 1 without GPUs)")
    pvc: str | None = Field(default=None, description="PersistentVolumeClaim mounted at mount_path in every pod")
    mount_path: str = "/workspace"
    node_selector: dict[str, str] = Field(default_factory=dict)
    master_port: int = Field(default=23456, ge=1, le=65535)
    env: dict[str, str] = Field(default_factory=dict)
    service_account: str | None = None
    shm_size: str | None = Field(default="16Gi", description="/dev/shm size (NCCL and loader workers need more "
                                 "than the container default of 64 MiB); None keeps the default")
    image_pull_policy: str = "IfNotPresent"
    ttl_seconds_after_finished: int | None = Field(default=86400, ge=0)


class PyTorchJobConfig(PyTorchJobSettings):
    """What a multi-node training job needs beyond `neva train`'s own flags."""

    name: str = Field(description="the job's name; pods are NAME-master-0, NAME-worker-I")
    train_args: tuple[str, ...] = Field(description="the flags after `neva train` (paths under mount_path)")

    @field_validator("name")
    @classmethod
    def _name_is_a_dns_label(cls, name: str) -> str:
        if not _DNS_LABEL.fullmatch(name):
            raise ValueError(f"{name!r} is not a Kubernetes name: lowercase letters, digits and '-', starting "
                             "and ending with a letter or digit")
        return name

    @model_validator(mode="after")
    def _check(self) -> PyTorchJobConfig:
        longest_pod = f"{self.name}-worker-{max(self.nnodes - 2, 0)}"
        if len(longest_pod) > 63:
            raise ValueError(f"name {self.name!r} is too long: pod name {longest_pod!r} exceeds 63 characters")
        place = sorted(arg.split("=", 1)[0] for arg in self.train_args if arg.split("=", 1)[0] in PLACE_FLAGS)
        if place:
            raise ValueError(f"train_args {', '.join(place)}: in a PyTorchJob the operator sets each pod's place "
                             "(nodes, rank, master, processes per node); drop these flags and set nnodes / "
                             "nproc_per_node / master_port here")
        reserved = sorted(name for name in self.env if name in OPERATOR_ENV or name.startswith("PET_"))
        if reserved:
            raise ValueError(f"env {', '.join(reserved)}: the operator sets these in every pod")
        return self

    @property
    def processes_per_node(self) -> int:
        return self.nproc_per_node or max(self.gpus_per_node, 1)


def training_job(config: TrainConfig, settings: PyTorchJobSettings, config_file: Path, name: str) -> PyTorchJobConfig:
    """The PyTorchJob that runs `config` on the cluster: every pod reads the TrainConfig from `config_file` on
    the claim (so every path in it must be under mount_path) and its place (nodes, rank, master, processes)
    from the operator's environment, which overrides the file's."""
    mount = PurePosixPath(settings.mount_path)
    paths = {"out": config.out, "shards": config.shards, "llm": config.llm, "vision": config.vision,
             "tokenizer": config.tokenizer, "init": config.init, "config file": config_file}
    outside = sorted(what for what, path in paths.items()
                     if path is not None and not PurePosixPath(path).is_relative_to(mount))
    if settings.pvc is None or outside:
        raise NevaError(f"train.kubernetes: the pods see the workdir only through the claim, but "
                        f"{'pvc is not set' if settings.pvc is None else ', '.join(outside) + ' are outside'} "
                        f"mount_path {mount}; set pvc, and a workdir under {mount} where the flow run mounts "
                        "the same claim (deployments/k8s/base-job-template.json)")
    return PyTorchJobConfig(**settings.model_dump(), name=name, train_args=("--config", str(config_file)))


def load_pytorchjob_config(values: Mapping[str, Any]) -> PyTorchJobConfig:
    """A PyTorchJobConfig, or a NevaError naming each bad key."""
    from pydantic import ValidationError

    try:
        return PyTorchJobConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors())
        raise NevaError(f"PyTorchJob settings: {problems}") from None


def _container(config: PyTorchJobConfig) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["neva", "train", *config.train_args],
        "env": [{"name": name, "value": value} for name, value in sorted(config.env.items())],
        "ports": [{"name": PORT_NAME, "containerPort": config.master_port, "protocol": "TCP"}],
    }
    if config.gpus_per_node:
        gpus = str(config.gpus_per_node)
        container["resources"] = {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}}
    mounts = []
    if config.pvc is not None:
        mounts.append({"name": "workspace", "mountPath": config.mount_path})
    if config.shm_size is not None:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _pod_template(config: PyTorchJobConfig, role: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [_container(config)]}
    volumes = []
    if config.pvc is not None:
        volumes.append({"name": "workspace", "persistentVolumeClaim": {"claimName": config.pvc}})
    if config.shm_size is not None:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
    if volumes:
        spec["volumes"] = volumes
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.service_account is not None:
        spec["serviceAccountName"] = config.service_account
    labels = {"app.kubernetes.io/name": "neva", "neva/job": config.name, "neva/role": role}
    return {"metadata": {"labels": labels}, "spec": spec}


def render_pytorchjob(config: PyTorchJobConfig) -> dict[str, Any]:
    """The PyTorchJob manifest: a master and nnodes - 1 workers running the same `neva train` argv.

    Pods never restart on their own (restartPolicy Never, backoffLimit 0): a failed job fails the task,
    whose retry deletes it and creates a new one that resumes from the last committed checkpoint.
    """
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "Never", "template": _pod_template(config, "master")}}
    if config.nnodes > 1:
        replicas["Worker"] = {"replicas": config.nnodes - 1, "restartPolicy": "Never",
                              "template": _pod_template(config, "worker")}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "All", "backoffLimit": 0}
    if config.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = config.ttl_seconds_after_finished
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": config.name, "namespace": config.namespace,
                     "labels": {"app.kubernetes.io/name": "neva", "neva/job": config.name}},
        "spec": {"nprocPerNode": str(config.processes_per_node), "runPolicy": run_policy,
                 "pytorchReplicaSpecs": replicas},
    }


def master_pod(job_name: str) -> str:
    return f"{job_name}-master-0"


def job_phase(job: Mapping[str, Any]) -> tuple[str | None, str]:
    """The latest true condition of a PyTorchJob (Created, Running, Restarting, Succeeded, Failed,
    Suspended) and its message; (None, "") before the operator reports any."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return None, ""
    # Succeeded and Failed are final whatever their order; otherwise the operator appends the newest last.
    for final in ("Failed", "Succeeded"):
        for condition in conditions:
            if condition.get("type") == final:
                return final, condition.get("message", "")
    return conditions[-1].get("type"), conditions[-1].get("message", "")


class _LogFollower:
    """Follows one pod's log in a thread; the caller drains the lines in its own thread."""

    def __init__(self, core_api: Any, pod: str, namespace: str) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.got_output = False
        self.error: Exception | None = None
        self._response: Any = None
        self._thread = threading.Thread(target=self._follow, args=(core_api, pod, namespace), daemon=True)
        self._thread.start()

    def _follow(self, core_api: Any, pod: str, namespace: str) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        try:
            self._response = core_api.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True,
                                                              _preload_content=False)
            for line in iter_resp_lines(self._response):
                self.got_output = True
                self.lines.put(line)
        except Exception as exc:  # a dropped stream ends the forwarding, never the training
            self.error = exc

    @property
    def retry_wanted(self) -> bool:
        """The log was not readable yet (the container was still starting): follow it again."""
        return not self._thread.is_alive() and self.error is not None and not self.got_output

    def drain(self, on_line: Callable[[str], None]) -> None:
        while True:
            try:
                on_line(self.lines.get_nowait())
            except queue.Empty:
                return

    def finish(self, on_line: Callable[[str], None], timeout: float) -> None:
        """Forward what is left of a finished pod's log (the stream ends by itself), then stop."""
        self._thread.join(timeout=timeout)
        self.close()
        self.drain(on_line)

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
        self._thread.join(timeout=2)


def run_pytorchjob(config: PyTorchJobConfig, custom_api: Any, core_api: Any, on_line: Callable[[str], None],
                   poll_seconds: float = _POLL_SECONDS, log_timeout: float = 30.0) -> dict[str, Any]:
    """Create the job, forward the master's log lines to `on_line` (in this thread) and wait for it to end.

    `custom_api` is a kubernetes.client.CustomObjectsApi, `core_api` a CoreV1Api. Returns the finished job
    object (kept until ttl_seconds_after_finished); raises NevaError when it failed or its name is taken.
    On any exception while it runs (a cancelled run's TerminationSignal included) the job and its pods are
    deleted before the exception propagates.
    """
    _create(custom_api, config)
    follower: _LogFollower | None = None
    try:
        while True:
            job = custom_api.get_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, config.name)
            phase, message = job_phase(job)
            if (follower is None or follower.retry_wanted) and phase in ("Running", "Succeeded", "Failed"):
                follower = _LogFollower(core_api, master_pod(config.name), config.namespace)
            if phase in ("Succeeded", "Failed"):
                _finish_log(follower, core_api, config, on_line, log_timeout)
                if phase == "Failed":
                    raise NevaError(f"PyTorchJob {config.namespace}/{config.name} failed: {message or 'no message'}"
                                    f" (kubectl describe pytorchjob -n {config.namespace} {config.name})")
                return job
            _wait(poll_seconds, follower, on_line)
    except BaseException:
        if follower is not None:
            follower.close()
        try:
            delete_pytorchjob(custom_api, config.namespace, config.name)
        except Exception as exc:  # keep the original exception; say what is left to clean up
            on_line(f"could not delete PyTorchJob {config.namespace}/{config.name} ({exc}): "
                    f"kubectl delete pytorchjob -n {config.namespace} {config.name}")
        raise


def _create(custom_api: Any, config: PyTorchJobConfig) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom_api.create_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL,
                                                   render_pytorchjob(config))
    except ApiException as exc:
        if exc.status == 409:
            raise NevaError(f"PyTorchJob {config.namespace}/{config.name} already exists: give each attempt its "
                            f"own name, or delete the old job (kubectl delete pytorchjob -n {config.namespace} "
                            f"{config.name})") from None
        raise


def _finish_log(follower: _LogFollower, core_api: Any, config: PyTorchJobConfig, on_line: Callable[[str], None],
                timeout: float) -> None:
    follower.finish(on_line, timeout=timeout)
    if follower.retry_wanted:  # it ended before the container had started: the whole log is readable now
        _LogFollower(core_api, master_pod(config.name), config.namespace).finish(on_line, timeout=timeout)


def _wait(seconds: float, follower: _LogFollower | None, on_line: Callable[[str], None]) -> None:
    """Sleep in short steps, forwarding log lines as they come (and staying interruptible)."""
    deadline = time.monotonic() + seconds
    while True:
        if follower is not None:
            follower.drain(on_line)
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def delete_pytorchjob(custom_api: Any, namespace: str, name: str) -> None:
    """Delete the job and, in the foreground, its pods; a job already gone is fine."""
    from kubernetes.client.exceptions import ApiException

    try:
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   body={"propagationPolicy": "Foreground"})
    except ApiException as exc:
        if exc.status != 404:
            raise


def kubernetes_apis() -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) from the pod's service account, else the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()
