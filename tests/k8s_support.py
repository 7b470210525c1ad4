"""Offline stand-ins for a cluster: the PyTorchJob CRD schema (strict), the Kubernetes API types of the
kubernetes client, the environment training-operator v1.9 gives each pod, and fake API objects."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "deployments" / "k8s" / "crds" / "kubeflow.org_pytorchjobs.yaml"


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as `kubectl apply --validate=strict` refuses them (the API
    server would otherwise drop them silently: a misspelt field would simply do nothing)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in strict and "additionalProperties" not in strict
            and not strict.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def pytorchjob_schema() -> dict[str, Any]:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def validate_pytorchjob(manifest: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.Draft7Validator(pytorchjob_schema()).validate(manifest)


_PRIMITIVES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,),
               "datetime": (str,), "date": (str,)}
_QUANTITY_MAPS = ("V1ResourceRequirements.limits", "V1ResourceRequirements.requests")


def validate_k8s(data: Any, type_name: str, where: str = "") -> None:
    """Check `data` against a kubernetes-client model type (e.g. "V1PodSpec"): no unknown field, every
    field of the right type, required fields present. Raises ValueError naming the path."""
    import kubernetes.client

    _check_types(data, type_name, where or type_name, owner="")
    # The models refuse missing required fields. They type a Quantity as a string, while the API server
    # also takes a JSON integer (what a lone "{{ gpus }}" placeholder renders to): compare as strings.
    kubernetes.client.ApiClient()._ApiClient__deserialize(_quantities_as_strings(data), type_name)


def _quantities_as_strings(data: Any) -> Any:
    if isinstance(data, list):
        return [_quantities_as_strings(item) for item in data]
    if not isinstance(data, dict):
        return data
    return {key: ({name: str(value) for name, value in value.items()}
                  if key in ("limits", "requests") and isinstance(value, dict) else _quantities_as_strings(value))
            for key, value in data.items()}


def _check_types(data: Any, type_name: str, where: str, owner: str) -> None:
    import kubernetes.client

    # The client spells types "List[X]", "Dict[str, X]", "Optional[X]" (older releases: "list[X]", "dict(str, X)").
    if type_name.startswith("Optional["):
        _check_types(data, type_name[9:-1], where, owner)
        return
    if type_name.lower().startswith("list["):
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {data!r}")
        for index, item in enumerate(data):
            _check_types(item, type_name[5:-1], f"{where}[{index}]", owner)
        return
    if type_name.startswith(("Dict[", "dict(")):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {data!r}")
        value_type = type_name[5:-1].split(", ", 1)[1]
        for key, value in data.items():
            if owner in _QUANTITY_MAPS and isinstance(value, int):
                continue  # a Quantity is an int or a string
            _check_types(value, value_type, f"{where}.{key}", owner)
        return
    if type_name in _PRIMITIVES:
        wanted = _PRIMITIVES[type_name]
        if not isinstance(data, wanted) or (type_name == "int" and isinstance(data, bool)):
            raise ValueError(f"{where}: expected {type_name}, got {data!r}")
        return
    model = getattr(kubernetes.client, type_name)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a {type_name} mapping, got {data!r}")
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{where}: {type_name} has no field {key!r}")
        _check_types(value, model.openapi_types[fields[key]], f"{where}.{key}", f"{type_name}.{key}")


def operator_environment(job: dict[str, Any], replica_type: str, index: int) -> dict[str, str]:
    """The `pytorch` container's environment in pod `index` of `replica_type` ("Master"/"Worker"): its own
    env plus what training-operator v1.9 adds (pkg/controller.v1/pytorch/envvar.go and master.go)."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    (container,) = [c for c in specs[replica_type]["template"]["spec"]["containers"] if c["name"] == "pytorch"]
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    total = sum(spec["replicas"] for spec in specs.values())
    nproc = job["spec"].get("nprocPerNode")
    (master,) = [c for c in specs["Master"]["template"]["spec"]["containers"] if c["name"] == "pytorch"]
    port = next(p["containerPort"] for p in master["ports"] if p["name"] == "pytorchjob-port")
    rank = index + 1 if replica_type == "Worker" else index
    address = f"{job['metadata']['name']}-master-0"
    env.update(PYTHONUNBUFFERED="1", MASTER_PORT=str(port), PET_MASTER_PORT=str(port), MASTER_ADDR=address,
               PET_MASTER_ADDR=address, WORLD_SIZE=str(total * int(nproc if nproc and nproc.isdigit() else 1)),
               RANK=str(rank), PET_NODE_RANK=str(rank))
    if nproc is not None:
        env["PET_NPROC_PER_NODE"] = nproc
    if "elasticPolicy" not in job["spec"]:
        env["PET_NNODES"] = str(total)
    return env


class FakeLogResponse:
    """What read_namespaced_pod_log(..., _preload_content=False) returns: chunks that split lines anywhere."""

    def __init__(self, chunks: list[bytes], hold: threading.Event | None = None) -> None:
        self.chunks, self.hold, self.closed = chunks, hold, False

    def stream(self, amt: Any = None, decode_content: Any = None):
        yield from self.chunks
        if self.hold is not None:  # a pod still running: the stream stays open until closed
            self.hold.wait(timeout=10)

    def close(self) -> None:
        self.closed = True
        if self.hold is not None:
            self.hold.set()


class FakeCustomObjectsApi:
    """Records calls; each `get` returns the next of `phases` (a condition type, or None: no status yet)."""

    def __init__(self, phases: list[str | None], message: str = "") -> None:
        self.phases, self.message = list(phases), message
        self.created: list[dict] = []
        self.deleted: list[tuple] = []
        self.gets = 0

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict) -> dict:
        assert (group, version, plural, namespace) == ("kubeflow.org", "v1", "pytorchjobs",
                                                      body["metadata"]["namespace"])
        self.created.append(body)
        return body

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict:
        assert name == self.created[-1]["metadata"]["name"]
        phase = self.phases[min(self.gets, len(self.phases) - 1)]
        self.gets += 1
        job = dict(self.created[-1])
        if phase is not None:
            history = ["Created", "Running", phase] if phase not in ("Created", "Running") else ["Created", phase]
            job["status"] = {"conditions": [
                {"type": kind, "status": "True", "message": self.message if kind == phase else ""}
                for kind in dict.fromkeys(history)]}
        return job

    def delete_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                        body: dict | None = None) -> None:
        self.deleted.append((group, version, namespace, plural, name, body))


class FakeCoreV1Api:
    def __init__(self, response: FakeLogResponse) -> None:
        self.response = response
        self.log_calls: list[tuple] = []

    def read_namespaced_pod_log(self, name: str, namespace: str, **kwargs: Any) -> FakeLogResponse:
        self.log_calls.append((name, namespace, kwargs))
        return self.response
