"""Prefect tasks for the data stages: thin wrappers over neva_core.data (download, unzip, shard)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from neva_core.data.archive import read_record, unzip
from neva_core.data.download import download, remote_fingerprint
from neva_core.data.shard_manifest import read_shard_manifest
from neva_core.data.shard_plan import DEFAULT_VAL_FRACTION
from neva_core.data.shards import shard_dataset
from neva_core.errors import NevaError
from tasks.caching import StageCache, retry_transient
from tasks.results import to_json


def hub_token(secret_block: str | None) -> str | None:
    """The HF token from a Prefect Secret block, else None (then the library reads HF_TOKEN).

    Resolved inside the task, never passed as a task argument: arguments are stored by Prefect's API.
    """
    if not secret_block:
        return None
    from prefect.blocks.system import Secret

    return Secret.load(secret_block).get()


def _source_version(inputs: dict[str, Any]) -> str:
    # With HF_HUB_OFFLINE set, a Hub source is keyed by the commit recorded in `dest`: no Hub needed.
    return remote_fingerprint(inputs["source"], hub_token(inputs.get("token_secret")), inputs.get("endpoint"),
                              dest=inputs["dest"], include=tuple(inputs.get("include") or ()))


def _downloaded_files_present(result: dict[str, Any]) -> None:
    for entry in result["files"]:
        path = Path(result["dest"], entry["path"])
        if path.stat().st_size != entry["bytes"]:
            raise NevaError(f"{path} changed size since it was downloaded")


@task(
    name="download",
    cache_policy=StageCache(stage="download", output_params=("dest",), outputs_ok=_downloaded_files_present,
                            remote_version=_source_version),
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=retry_transient,
    persist_result=True,
)
def download_task(
    source: str,
    dest: Path,
    include: tuple[str, ...] = (),
    sha256: str | None = None,
    token_secret: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Fetch a Hub file or snapshot, a URL or a local path into `dest` (resumable, verified)."""
    result = download(source, dest, include=include, sha256=sha256, token=hub_token(token_secret), endpoint=endpoint)
    return result.to_json()


def _unzipped_folder_intact(result: dict[str, Any]) -> None:
    record = read_record(result["dest"])
    if record is None or record["fingerprint"] != result["fingerprint"]:
        raise NevaError(f"{result['dest']} no longer holds the extracted archive")


@task(
    name="unzip",
    cache_policy=StageCache(stage="unzip", output_params=("dest",), outputs_ok=_unzipped_folder_intact),
    persist_result=True,
)
def unzip_task(zip_path: Path, dest: Path) -> dict[str, Any]:
    """Extract an images zip safely and atomically (sharding reads the zip directly; this is optional)."""
    return to_json(unzip(zip_path, dest))


def _shard_folder_complete(result: dict[str, Any]) -> None:
    read_shard_manifest(result["out_dir"])


@task(
    name="shard",
    cache_policy=StageCache(stage="shard", output_params=("out_dir",), outputs_ok=_shard_folder_complete),
    persist_result=True,
)
def shard_task(
    json_path: Path,
    images: Path,
    out_dir: Path,
    maxcount: int = 10000,
    workers: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    image_prefix: str = "",
) -> dict[str, Any]:
    """Validate every record and image and write webdataset shards (+ energon metadata) into `out_dir`."""
    result = shard_dataset(json_path, images, out_dir, maxcount=maxcount, workers=workers, val_fraction=val_fraction,
                           image_prefix=image_prefix)
    if TaskRunContext.get() is not None:  # `shard_task.fn(...)` also runs outside Prefect
        create_markdown_artifact(key="shard-summary", markdown=shard_summary(result.to_dict()),
                                 description=f"shards in {out_dir}")
    return result.to_dict()


def shard_summary(result: dict[str, Any]) -> str:
    """A table for the Prefect UI: what was written, what was skipped and why."""
    rows = [("records", result["records"]), ("written", result["written"]), ("skipped", result["skipped"]),
            ("shards", result["shards"])]
    rows += [(f"{split} samples", count) for split, count in sorted(result["split_samples"].items())]
    rows += [(f"skipped: {reason}", count) for reason, count in sorted(result["skipped_by_reason"].items())]
    rows += [(f"converted: {reason}", count) for reason, count in sorted(result["converted_by_reason"].items())]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"### Shards in `{result['out_dir']}`\n\n| | |\n|---|---|\n{table}\n"
