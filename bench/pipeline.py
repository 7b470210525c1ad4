"""Benchmark what a fully cached rerun of the `neva` flow costs, and the demo's wall time stage by stage.

Prints one JSON line per measurement:

* "demo": the `neva` flow on the demo config (neva_core.demo.demo_config), once cold and once cached, each
  in a fresh process as `neva demo` runs it (Python and Prefect's embedded server start-up included), with
  each stage's seconds as the flow result's "stages" lists them.
* "cache-decision" at fixture scale: what the cached run computed to decide each stage's hit, taken from an
  in-process cached run of the same flow and re-timed `--repeats` times: StageCache.compute_key, i.e. the
  input fingerprints (names, sizes, mtimes), the parameters and the code version, the result store's lookup
  of the recorded result and the `outputs_ok` check of the outputs it points at.
* "cache-decision" at `--records` records (default 558,128, LLaVA-Pretrain's count): the same computation
  for download (JSON and images.zip), and shard, on a synthetic LLaVA-Pretrain-shaped JSON, an images.zip
  whose central directory has that many (empty) entries, their downloads made by `neva download`, and a
  shard folder with its manifest, energon index and .tar.idx files at the real shard count (the tars are
  sparse files of the real sizes: a cached rerun checks their sizes, it never reads them).
* "against" on the same JSON + zip, side by side: the decision again with the zip's bytes grown
  `--grown-member-bytes` per entry at the same entry count; a key read from the zip's central directory
  (an index-keyed cache: O(entries)); md5 of every byte (a content-keyed cache, the method of
  prefect.utilities.hashing.file_hash, streamed here); a plain read of those bytes (the disk's floor).
  Hashing and reading start cold (the files' pages dropped with posix_fadvise DONTNEED).

The synthetic set takes a few minutes to build; `--cache-dir DIR` keeps it for the next run.

    python bench/pipeline.py [--records N] [--cache-dir DIR] [--images N] [--repeats N]
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Before anything imports prefect: its database and result records live in a throwaway home.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="neva-bench-prefect-home-")
atexit.register(functools.partial(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The embedded server's 20-s default start-up timeout is too short on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from neva_core.data.download import download  # noqa: E402
from neva_core.data.energon import SampleIndexWriter, write_energon_metadata, write_tar_index  # noqa: E402
from neva_core.data.image_source import open_image_source  # noqa: E402
from neva_core.data.shard_manifest import build_manifest, read_shard_manifest, shard_result, write_skipped  # noqa: E402
from neva_core.data.shard_plan import TRAIN, ShardParams  # noqa: E402
from neva_core.data.shards import LAYOUT_VERSION  # noqa: E402
from neva_core.fingerprint import output_folder, source_version  # noqa: E402
from neva_core.io import MANIFEST_NAME, file_entry, write_manifest  # noqa: E402
from tasks.caching import StageCache  # noqa: E402
from tasks.data import download_task, shard_task  # noqa: E402

LLAVA_PRETRAIN_RECORDS = 558_128
REAL_JSON_BYTES = 181 * 10**6  # blip_laion_cc_sbu_558k.json
REAL_ZIP_BYTES = int(27.4 * 10**9)  # LLaVA-Pretrain's images.zip
MAXCOUNT = 10_000  # the pipeline's default samples per shard
IMAGE_BYTES = 49_800  # LCS-558K's mean JPEG
TAR_BLOCK = 512
READ_CHUNK = 4 << 20
DATASET = "llava-pretrain"

DEMO_RUN = """
import json, sys, time
from pathlib import Path
start = time.perf_counter()
from flows.neva import neva
from neva_core.demo import demo_config
config = demo_config(Path(sys.argv[1]), images=int(sys.argv[2]))
config_s = time.perf_counter() - start
result = neva(config=config)
print("STAGES " + json.dumps({"stages": result["stages"], "config_s": config_s,
                              "flow_s": time.perf_counter() - start - config_s}))
"""


# --- the demo, cold and cached ----------------------------------------------------------------------


def demo_run(workdir: Path, images: int, run: str) -> dict[str, Any]:
    """One `neva` flow run on the demo config in a fresh process; its wall time and stages."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DEMO_RUN, str(workdir), str(images)], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the demo flow failed ({done.returncode}):\n{done.stderr[-4000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("STAGES "))
    reported = json.loads(line.removeprefix("STAGES "))
    stages = [{"stage": s["stage"], "status": s["status"], "seconds": round(s["seconds"], 2)}
              for s in reported["stages"]]
    return {"bench": "demo", "run": run, "images": images, "wall_s": round(wall, 2),
            "imports_and_fixtures_s": round(reported["config_s"], 2), "flow_call_s": round(reported["flow_s"], 2),
            "all_cached": all(s["status"] == "cached" for s in stages),
            "stages": stages}


# --- what a cached run computes per stage -----------------------------------------------------------


@dataclass
class Decision:
    """One StageCache.compute_key call as a run made it: enough to make it again."""

    policy: StageCache
    inputs: dict[str, Any]
    store: Any  # the task run's prefect ResultStore
    key: str
    seconds: float


@contextmanager
def recorded_decisions() -> Iterator[list[Decision]]:
    """Every StageCache.compute_key call made in this process meanwhile, with its inputs and its time."""
    decisions: list[Decision] = []
    original = StageCache.compute_key

    def timed(self: StageCache, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
              **kwargs: Any) -> str | None:
        start = time.perf_counter()
        key = original(self, task_ctx, inputs, flow_parameters, **kwargs)
        decisions.append(Decision(self, dict(inputs), task_ctx.result_store, key, time.perf_counter() - start))
        return key

    StageCache.compute_key = timed  # type: ignore[method-assign]
    try:
        yield decisions
    finally:
        StageCache.compute_key = original  # type: ignore[method-assign]


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def time_decision(decision: Decision, repeats: int) -> dict[str, Any]:
    """Median seconds of the whole decision, and of its outputs_ok check alone; refuses a miss."""
    context = SimpleNamespace(result_store=decision.store)

    def decide() -> None:
        if decision.policy.compute_key(context, decision.inputs, {}) != decision.key:
            raise SystemExit(f"{decision.policy.stage}: the rerun's key is not the recorded hit")

    record = decision.store.read(decision.key).result
    return {
        "stage": stage_label(decision),
        "decision_ms": round(1e3 * median_seconds(decide, repeats), 3),
        "outputs_ok_ms": round(1e3 * median_seconds(lambda: decision.policy.outputs_ok(record), repeats), 3),
    }


def stage_label(decision: Decision) -> str:
    """The stage's name; a download also names its source's file or folder (the flow runs four)."""
    if decision.policy.stage != "download":
        return decision.policy.stage
    return f"download:{Path(str(decision.inputs['source'])).name}"


def code_version_first_call() -> float:
    """Seconds of the source digest that the first key of a process pays (cached afterwards)."""
    source_version.cache_clear()
    start = time.perf_counter()
    source_version()
    return time.perf_counter() - start


def fixture_decisions(workdir: Path, images: int, repeats: int) -> tuple[dict[str, Any], Any]:
    """The cached run's decisions at fixture scale, made in this process; returns the line and the store."""
    from flows.neva import neva
    from neva_core.demo import demo_config

    config = demo_config(workdir, images=images)
    with recorded_decisions() as decisions:
        result = neva(config=config)
    if not all(stage["status"] == "cached" for stage in result["stages"]):
        raise SystemExit(f"the in-process rerun was not fully cached: {result['stages']}")
    stages = [time_decision(decision, repeats) for decision in decisions]
    line = {
        "bench": "cache-decision", "scale": "fixtures", "records": images, "repeats": repeats,
        "code_version_first_call_ms": round(1e3 * code_version_first_call(), 2),
        "stages": stages, "in_run_ms": round(1e3 * sum(d.seconds for d in decisions), 2),
        "total_ms": round(sum(s["decision_ms"] for s in stages), 2),
    }
    return line, decisions[0].store


# --- the synthetic LLaVA-Pretrain-shaped set ----------------------------------------------------------


def record_id(index: int) -> str:
    return f"{index * 11:09d}"  # spread like LCS-558K's ids: folders 00000/ to 00613/


def image_name(index: int) -> str:
    key = record_id(index)
    return f"{key[:5]}/{key}.jpg"


def write_json(path: Path, records: int) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write("[")
        for i in range(records):
            human = "<image>\nRender a clear and concise summary of the photo." if i % 2 else \
                "Render a clear and concise summary of the photo.\n<image>"
            record = {"id": record_id(i), "image": image_name(i), "conversations": [
                {"from": "human", "value": human},
                {"from": "gpt", "value": f"select luxury furniture {i % 97} - inch gel memory foam mattress topper"}]}
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    tmp.rename(path)


def write_zip(path: Path, records: int, member_bytes: int) -> None:
    """A stored zip with one `member_bytes`-byte entry per record, under the records' image names."""
    tmp = path.with_name(path.name + ".partial")
    payload = bytes(range(256)) * (member_bytes // 256) + bytes(member_bytes % 256)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for i in range(records):
            archive.writestr(zipfile.ZipInfo(image_name(i), date_time=(2023, 10, 1, 0, 0, 0)), payload)
    tmp.rename(path)


def downloaded(source: Path, downloads: Path, label: str) -> dict[str, Any]:
    """`neva download` of a local file into the folder the flow would use (a no-op when already there)."""
    return download(str(source), output_folder(downloads, label, source=str(source))).to_json()


def tar_bytes(samples: int) -> int:
    """A shard's size: per sample a jpg and a json member with their headers, then the tar's end."""
    image = TAR_BLOCK + -(-IMAGE_BYTES // TAR_BLOCK) * TAR_BLOCK
    return samples * (image + 2 * TAR_BLOCK) + 2 * TAR_BLOCK


def write_shard_folder(out_dir: Path, json_path: Path, zip_path: Path, records: int) -> dict[str, Any]:
    """A finished shard folder for `records` samples at the real shard count, as `neva shard` leaves it,
    with sparse tars of the real sizes (hashes recorded for them are stand-ins: a cached rerun checks sizes)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = ShardParams(maxcount=MAXCOUNT, val_fraction=0.0)
    shards = []
    with SampleIndexWriter(tmp) as index:
        for number, first in enumerate(range(0, records, MAXCOUNT)):
            samples = min(MAXCOUNT, records - first)
            name = f"{TRAIN}-{number:06d}.tar"
            size = tar_bytes(samples)
            with open(tmp / name, "wb") as f:
                f.truncate(size)
            stride = tar_bytes(1) - 2 * TAR_BLOCK
            offsets = [i * stride for i in range(samples)]
            write_tar_index(tmp / name, offsets, samples * stride)
            index.add_shard({
                "keys": [record_id(first + i) for i in range(samples)], "offsets": offsets,
                "sizes": [stride] * samples,
                "part_samples": [i for i in range(samples) for _ in (0, 1)],
                "part_names": ["jpg", "json"] * samples,
                "part_offsets": [o + d for o in offsets for d in (TAR_BLOCK, stride - TAR_BLOCK)],
                "part_sizes": [IMAGE_BYTES, TAR_BLOCK] * samples,
            })
            shards.append({"name": name, "split": TRAIN, "samples": samples, "bytes": size,
                           "sha256": hashlib.sha256(name.encode()).hexdigest()})
        write_skipped(tmp / "skipped.jsonl", [])
        energon_files = write_energon_metadata(tmp, shards, index)
    fingerprint = {"layout": LAYOUT_VERSION, "json": file_entry(json_path),
                   "images": open_image_source(zip_path).fingerprint(), "params": asdict(params)}
    shard_records = [{"converted_by_reason": {}, "relabeled_by_format": {}} for _ in shards]
    manifest = build_manifest(fingerprint, params, records, shards, [], shard_records, energon_files, tmp)
    write_manifest(tmp, manifest)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return shard_result(out_dir, manifest, reused_shards=0).to_dict()


@dataclass
class SyntheticSet:
    json_download: dict[str, Any]
    zip_download: dict[str, Any]
    shards: dict[str, Any]
    shard_dir: Path

    @property
    def json_path(self) -> Path:
        return Path(self.json_download["paths"][0])

    @property
    def zip_path(self) -> Path:
        return Path(self.zip_download["paths"][0])


def synthetic_set(root: Path, records: int, member_bytes: int, label: str) -> SyntheticSet:
    """JSON + zip of `records` entries, downloaded and sharded as a finished run leaves them (built once)."""
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    json_source, zip_source = sources / f"data-{records}.json", sources / f"images-{label}-{records}.zip"
    if not json_source.is_file():
        write_json(json_source, records)
    if not zip_source.is_file():
        write_zip(zip_source, records, member_bytes)
    downloads = root / "workdir" / "downloads" / label
    json_download = downloaded(json_source, downloads, "json")
    zip_download = downloaded(zip_source, downloads, "images")
    json_path, zip_path = Path(json_download["paths"][0]), Path(zip_download["paths"][0])
    shard_dir = output_folder(root / "workdir" / "shards", label, json=json_path, images=zip_path,
                              maxcount=MAXCOUNT, val_fraction=0.0)
    if (shard_dir / MANIFEST_NAME).is_file():
        shards = shard_result(shard_dir, read_shard_manifest(shard_dir), reused_shards=0).to_dict()
    else:
        shards = write_shard_folder(shard_dir, json_path, zip_path, records)
    return SyntheticSet(json_download, zip_download, shards, shard_dir)


def call_inputs(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The parameters Prefect hands a cache policy for this call (defaults filled in)."""
    bound = inspect.signature(task.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def recorded_hit(policy: StageCache, inputs: dict[str, Any], result: dict[str, Any], store: Any) -> Decision:
    """Record `result` in the store under the stage's key, as a finished cold run leaves it."""
    key = policy.compute_key(SimpleNamespace(result_store=store), inputs, {})
    store.write(result, key=key)
    return Decision(policy, inputs, store, key, 0.0)


def synthetic_decisions(data: SyntheticSet, store: Any) -> list[Decision]:
    """The decisions of a cached rerun over `data`: the two dataset downloads, then shard."""
    json_inputs = call_inputs(download_task, str(data.json_download["source"]), Path(data.json_download["dest"]))
    zip_inputs = call_inputs(download_task, str(data.zip_download["source"]), Path(data.zip_download["dest"]))
    shard_inputs = call_inputs(shard_task, data.json_path, data.zip_path, data.shard_dir, maxcount=MAXCOUNT,
                               val_fraction=0.0)
    return [
        recorded_hit(download_task.cache_policy, json_inputs, data.json_download, store),
        recorded_hit(download_task.cache_policy, zip_inputs, data.zip_download, store),
        recorded_hit(shard_task.cache_policy, shard_inputs, data.shards, store),
    ]


def decision_line(scale: str, records: int, data: SyntheticSet, store: Any, repeats: int) -> dict[str, Any]:
    stages = [time_decision(decision, repeats) for decision in synthetic_decisions(data, store)]
    return {
        "bench": "cache-decision", "scale": scale, "records": records, "repeats": repeats,
        "json_mb": round(data.json_path.stat().st_size / 1e6, 1),
        "zip_mb": round(data.zip_path.stat().st_size / 1e6, 1),
        "zip_entries": records, "shards": data.shards["shards"],
        "code_version_first_call_ms": round(1e3 * code_version_first_call(), 2),
        "stages": stages, "total_ms": round(sum(s["decision_ms"] for s in stages), 2),
    }


# --- the methods it replaces, and the disk ------------------------------------------------------------


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_cold(paths: list[Path], hasher: Callable[[], Any] | None) -> float:
    """Seconds to read (and hash, given a hasher) every byte of `paths`, starting from the disk."""
    for path in paths:
        drop_from_page_cache(path)
    start = time.perf_counter()
    for path in paths:
        digest = hasher() if hasher else None
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(READ_CHUNK):
                if digest is not None:
                    digest.update(chunk)
    return time.perf_counter() - start


def against_line(small: SyntheticSet, grown: SyntheticSet, store: Any, repeats: int,
                 small_total_ms: float, member_bytes: int) -> dict[str, Any]:
    grown_stages = [time_decision(d, repeats) for d in synthetic_decisions(grown, store)]
    line: dict[str, Any] = {"bench": "against", "records": small.shards["records"], "repeats": repeats,
                            "grown_member_bytes": member_bytes,
                            "ours_decision_ms": small_total_ms,
                            "ours_decision_grown_zip_ms": round(sum(s["decision_ms"] for s in grown_stages), 2)}
    for name, data in (("", small), ("grown_", grown)):
        paths = [data.json_path, data.zip_path]
        total = sum(p.stat().st_size for p in paths)
        index_s = median_seconds(lambda: open_image_source(data.zip_path).fingerprint(), repeats)
        hashes, reads = [], []
        for _ in range(max(1, repeats // 2)):  # interleaved, cold each time
            hashes.append(read_cold(paths, hashlib.md5))
            reads.append(read_cold(paths, None))
        line.update({
            f"{name}input_mb": round(total / 1e6, 1),
            f"{name}zip_mb": round(data.zip_path.stat().st_size / 1e6, 1),
            f"{name}zip_index_key_s": round(index_s, 3),
            f"{name}content_md5_cold_s": round(statistics.median(hashes), 3),
            f"{name}read_cold_s": round(statistics.median(reads), 3),
        })
    real = REAL_JSON_BYTES + REAL_ZIP_BYTES
    rates = {"md5": line["grown_input_mb"] * 1e6 / line["grown_content_md5_cold_s"],
             "read": line["grown_input_mb"] * 1e6 / line["grown_read_cold_s"]}
    line.update({
        "grown_over_small_bytes": round(line["grown_input_mb"] / line["input_mb"], 1),
        "projected_real_content_md5_s": round(real / rates["md5"], 1),  # at this run's rate, 27.6 GB
        "projected_real_read_s": round(real / rates["read"], 1),
    })
    return line


def emit(line: dict[str, Any]) -> None:
    """Print one measurement with the machine's load at that moment (the machine may be shared)."""
    print(json.dumps({**line, "load_avg_1m": round(os.getloadavg()[0], 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=LLAVA_PRETRAIN_RECORDS,
                        help=f"records and zip entries of the synthetic set (default {LLAVA_PRETRAIN_RECORDS})")
    parser.add_argument("--grown-member-bytes", type=int, default=2048,
                        help="bytes per zip entry of the grown zip (default 2048: ~20x the empty-entry zip)")
    parser.add_argument("--images", type=int, default=256, help="the demo's images (default 256, as `neva demo`)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure; medians (default 5)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the synthetic set here for later runs (default: a temporary folder)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="the demo's folder (default: a temporary one; an existing demo folder makes the first "
                             "run cached)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="neva-bench-pipeline-"))
    try:
        demo_dir = args.workdir or scratch / "demo"
        for run in ("cold", "cached"):
            emit(demo_run(demo_dir, args.images, run))
        line, store = fixture_decisions(demo_dir, args.images, args.repeats)
        emit(line)
        root = args.cache_dir or scratch / "synthetic"
        start = time.perf_counter()
        small = synthetic_set(root, args.records, 0, DATASET)
        grown = synthetic_set(root, args.records, args.grown_member_bytes, f"{DATASET}-grown")
        build_s = time.perf_counter() - start
        line = decision_line("llava-pretrain", args.records, small, store, args.repeats)
        line["synthetic_build_s"] = round(build_s, 1)
        emit(line)
        emit(against_line(small, grown, store, args.repeats, line["total_ms"], args.grown_member_bytes))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
