"""What a shard run leaves besides the tars: per-shard completion records, skipped.jsonl, the manifest
(written last) and the result the stage returns."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neva_core.data.energon import SAMPLE_TYPE
from neva_core.data.shard_plan import TRAIN, VAL, ShardParams
from neva_core.errors import NevaError
from neva_core.io import MANIFEST_NAME, atomic_file, file_entry, read_manifest, verify_files

STATE_DIR = ".neva-shard"
RUN_RECORD = "run.json"
SKIPPED_NAME = "skipped.jsonl"
STAGE = "shard"


@dataclass(frozen=True)
class ShardResult:
    """What the Prefect task returns: small and JSON-able."""

    out_dir: str
    records: int
    written: int
    skipped: int
    skipped_by_reason: dict[str, int]
    converted_by_reason: dict[str, int]
    split_samples: dict[str, int]
    shards: int
    reused_shards: int = 0  # shards kept from an interrupted earlier run
    already_complete: bool = False  # the folder was complete before this call

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_shard_manifest(out_dir: Path | str, *, deep: bool = False) -> dict[str, Any]:
    """The manifest of a finished shard folder, after checking every shard's size (and sha256 if deep)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest.get("stage") != STAGE:
        raise NevaError(f"{out_dir / MANIFEST_NAME} is not a `neva shard` manifest; point at a shard folder")
    verify_files(out_dir, manifest["files"], check_hash=deep)
    for name in manifest["energon"]["files"]:
        if not (out_dir / name).is_file():
            raise NevaError(
                f"{out_dir / name} (megatron-energon metadata) is missing; delete {MANIFEST_NAME} and rerun "
                "`neva shard` with the same arguments to rewrite it"
            )
    return manifest


def shard_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "layout"}


def load_shard_record(out_dir: Path, name: str) -> dict[str, Any]:
    return json.loads(record_path(out_dir, name).read_bytes())


def record_path(out_dir: Path, shard: str) -> Path:
    return out_dir / STATE_DIR / f"{Path(shard).stem}.json"  # train-000003.tar -> .neva-shard/train-000003.json


def merge_skips(parent_skips: list[dict[str, Any]], shard_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    skipped = list(parent_skips)
    for record in shard_records:
        skipped.extend(record["skipped"])
    return sorted(skipped, key=lambda entry: entry["index"])


def write_skipped(path: Path, skipped: list[dict[str, Any]]) -> None:
    with atomic_file(path, "w") as f:
        for entry in skipped:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # one write, not json.dump's many
    with atomic_file(path, "w") as f:
        f.write(text)


def build_manifest(
    fingerprint: dict[str, Any], params: ShardParams, records: int, shards: list[dict[str, Any]],
    skipped: list[dict[str, Any]], shard_records: list[dict[str, Any]], energon_files: list[str], out_dir: Path,
) -> dict[str, Any]:
    written = sum(shard["samples"] for shard in shards)
    converted: Counter[str] = Counter()
    relabeled: Counter[str] = Counter()
    for record in shard_records:
        converted.update(record["converted_by_reason"])
        relabeled.update(record["relabeled_by_format"])
    files = {shard["name"]: {"bytes": shard["bytes"], "sha256": shard["sha256"]} for shard in shards}
    files[SKIPPED_NAME] = file_entry(out_dir / SKIPPED_NAME)
    return {
        "stage": STAGE,
        "format": "webdataset",
        "fingerprint": fingerprint,
        "params": asdict(params),
        "records": records,
        "written": written,
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(entry["reason"] for entry in skipped).items())),
        "converted_by_reason": dict(sorted(converted.items())),
        "relabeled_by_format": dict(sorted(relabeled.items())),
        "splits": {
            split: {
                "samples": sum(s["samples"] for s in shards if s["split"] == split),
                "shards": [s["name"] for s in shards if s["split"] == split],
            }
            for split in (TRAIN, VAL)
        },
        "shards": [{k: shard[k] for k in ("name", "split", "samples", "bytes", "sha256")} for shard in shards],
        "files": files,
        "skipped_file": SKIPPED_NAME,
        "energon": {"sample_type": SAMPLE_TYPE, "files": energon_files},
    }


def shard_result(
    out_dir: Path, manifest: dict[str, Any], *, reused_shards: int, already_complete: bool = False
) -> ShardResult:
    return ShardResult(
        out_dir=str(out_dir),
        records=manifest["records"],
        written=manifest["written"],
        skipped=manifest["skipped"],
        skipped_by_reason=manifest["skipped_by_reason"],
        converted_by_reason=manifest["converted_by_reason"],
        split_samples={split: info["samples"] for split, info in manifest["splits"].items()},
        shards=len(manifest["shards"]),
        reused_shards=reused_shards,
        already_complete=already_complete,
    )
