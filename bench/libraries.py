"""Benchmark: each hand-written replacement against the library it replaces, on the real workload; prints
ONE JSON line.

The rule (README): a replacement stays only where the library is >= 1.5x slower or takes >= 2x the memory.

* jpeg: `check_image` on LCS-558K-like JPEGs (bench/shard.py's synthetic 336-px photos, ~49 KB): the
  marker walk against Pillow's lazy open and its checks (the same function with the walk switched off,
  which gives the same verdicts). CPU per image.
* tar: writing shard samples (that jpg + its JSON record) into the same hashing, O_DIRECT sink
  (`ChunkedWriter`): `TarShardWriter` against `tarfile` (fixed metadata, the energon layout taken from
  tarfile's offsets) and webdataset's `TarWriter`. CPU per sample, all threads.
* energon: energon's index (index.sqlite, .tar.idx) of a `neva shard` output: ours, from the layouts the
  shard writer recorded, against energon's own `WebdatasetPreparator.prepare_dataset` (which re-reads the
  tars); each in a fresh process: wall seconds and peak RSS of its process tree (the other metadata files
  are the same few small files either way).
* safetensors, streaming: `neva convert` of a TinyLlama-1.1B-shaped checkpoint (2.2 GB, warm in the page
  cache) reading its input with `SafetensorsReader` against `safetensors.safe_open(...).get_tensor`;
  fresh process each: wall seconds and peak RSS (which counts the file pages a mapping holds). The
  hashing reads of native checkpoints (`hash_name`) have no library counterpart (safe_open would need a
  second pass over the file).
* safetensors, whole file: every tensor of that file loaded into a dict, ours against `safe_open`.

Runs are interleaved and repeated (`--repeats`, medians): the machine is shared.

    python bench/libraries.py [--images N] [--checkpoint HF_DIR] [--workdir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

KEEP_IF_SLOWER, KEEP_IF_MEMORY = 1.5, 2.0
TAR_SAMPLES = 4000


def verdict(time_ratio: float, memory_ratio: float | None = None) -> str:
    """'keep ours' when the library is >= 1.5x slower or >= 2x the memory, else 'use the library'."""
    if time_ratio >= KEEP_IF_SLOWER or (memory_ratio is not None and memory_ratio >= KEEP_IF_MEMORY):
        return "keep ours"
    return "use the library"


def median_cpu_us(run: Callable[[], int], repeats: int) -> float:
    """Median CPU microseconds (all threads of this process) per item; `run` returns its item count."""
    results = []
    for _ in range(repeats):
        start = time.process_time()
        items = run()
        results.append((time.process_time() - start) / items * 1e6)
    return round(statistics.median(results), 2)


# --- jpeg --------------------------------------------------------------------------------------------------


def bench_jpeg(pictures: list[bytes], repeats: int) -> dict[str, Any]:
    from neva_core.data import images

    names = [f"{i:09d}.jpg" for i in range(len(pictures))]

    def check_all() -> int:
        for _ in range(20):
            for data, name in zip(pictures, names):
                images.check_image(data, name)
        return 20 * len(pictures)

    real_walk = images._plain_jpeg_scan_start
    ours, pillow = [], []
    for _ in range(repeats):
        ours.append(median_cpu_us(check_all, 1))
        images._plain_jpeg_scan_start = lambda data: None  # every header goes to Pillow
        try:
            pillow.append(median_cpu_us(check_all, 1))
        finally:
            images._plain_jpeg_scan_start = real_walk
    result = {"ours_us_per_image": statistics.median(ours), "pillow_us_per_image": statistics.median(pillow)}
    result["library_vs_ours"] = round(result["pillow_us_per_image"] / result["ours_us_per_image"], 2)
    result["verdict"] = verdict(result["library_vs_ours"])
    return result


# --- tar ---------------------------------------------------------------------------------------------------


class _Sink:
    """The file-like face of our O_DIRECT, hashing writer, for the libraries' tar writers."""

    def __init__(self, path: Path) -> None:
        from neva_core.data.direct_writer import ChunkedWriter

        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.out = ChunkedWriter(self.fd)
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def close(self) -> str:
        digest = self.out.flush()
        os.fsync(self.fd)
        self.out.close()
        os.close(self.fd)
        return digest


def _samples(pictures: list[bytes]) -> list[tuple[str, bytes, bytes]]:
    return [(f"{i:09d}", pictures[i % len(pictures)],
             json.dumps({"id": f"{i:09d}", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                               {"from": "gpt", "value": f"a photo {i}"}]}).encode())
            for i in range(TAR_SAMPLES)]


def _write_ours(samples: list[tuple[str, bytes, bytes]], path: Path) -> int:
    from neva_core.data.tar_writer import TarShardWriter

    with TarShardWriter(path) as writer:
        for key, image, record in samples:
            writer.add(key, record, "jpg", image)
        writer.commit()
    return len(samples)


def _write_tarfile(samples: list[tuple[str, bytes, bytes]], path: Path) -> int:
    sink = _Sink(path)
    offsets, parts = [], []  # what energon's index needs, as ours records it
    with tarfile.TarFile(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
        for key, image, record in samples:
            offsets.append(tar.offset)
            for extension, data in (("jpg", image), ("json", record)):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                parts.append(tar.offset)
                tar.addfile(info, io.BytesIO(data))
    sink.close()
    return len(samples)


def _write_webdataset(samples: list[tuple[str, bytes, bytes]], path: Path) -> int:
    from webdataset import TarWriter

    sink = _Sink(path)
    with TarWriter(sink, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
        for key, image, record in samples:
            writer.write({"__key__": key, "jpg": image, "json": record})
    sink.close()
    return len(samples)


def bench_tar(pictures: list[bytes], work: Path, repeats: int) -> dict[str, Any]:
    samples = _samples(pictures)
    writers = {"ours": _write_ours, "tarfile": _write_tarfile, "webdataset_TarWriter": _write_webdataset}
    runs: dict[str, list[float]] = {name: [] for name in writers}
    for _ in range(repeats):
        for name, write in writers.items():
            path = work / f"{name}.tar"
            runs[name].append(median_cpu_us(lambda: write(samples, path), 1))
            path.unlink()
    result: dict[str, Any] = {f"{name}_us_per_sample": statistics.median(times) for name, times in runs.items()}
    best_library = min(result["tarfile_us_per_sample"], result["webdataset_TarWriter_us_per_sample"])
    result["library_vs_ours"] = round(best_library / result["ours_us_per_sample"], 2)
    result["verdict"] = verdict(result["library_vs_ours"])
    return result


# --- processes: energon index, safetensors reads --------------------------------------------------------------


def measure(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS of the child's process tree, polled from /proc (ru_maxrss would start at this
    parent's RSS: a forked child inherits it)."""
    from shard import timed

    seconds, peak_mb = timed(command)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1)}


def child(step: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", step, *args]


def run_child(step: str, args: list[str]) -> None:
    if step == "index-ours":
        from neva_core.data.energon import SampleIndexWriter, write_tar_index
        from neva_core.data.shard_manifest import load_shard_record

        folder = Path(args[0])
        names = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"]
        with SampleIndexWriter(folder) as index:
            for name in names:
                layout = load_shard_record(folder, name)["layout"]
                index.add_shard(layout)
                write_tar_index(folder / name, layout["offsets"], layout["end"])
            index.commit(len(names))
    elif step == "index-energon":
        from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

        folder = Path(args[0])
        names = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"]
        WebdatasetPreparator.prepare_dataset(folder, names, split_parts_patterns=[("train", r"^train-.*")],
                                             workers=int(args[1]))
    elif step == "load-ours":
        from neva_core.checkpoint.safetensors_stream import SafetensorsReader

        with SafetensorsReader(Path(args[0])) as reader:
            print(len({name: reader.read(name) for name in reader.names()}))
    elif step == "load-safe_open":
        from neva_core.checkpoint.safetensors_stream import load_safetensors

        print(len(load_safetensors(Path(args[0]))))
    elif step.startswith("convert-"):
        from neva_core.checkpoint import convert

        if step == "convert-safe_open":
            convert.SafetensorsReader = SafeOpenReader  # type: ignore[misc]
        convert.convert_hf_checkpoint(Path(args[0]), Path(args[1]), tp=1)


class SafeOpenReader:
    """The HF input reader's interface over safetensors' own `safe_open`."""

    def __init__(self, path: Path) -> None:
        from neva_core.checkpoint.safetensors_stream import open_safetensors

        self.opened = open_safetensors(path)

    def names(self) -> list[str]:
        return list(self.opened.keys())

    def spec(self, name: str) -> Any:
        from neva_core.checkpoint.safetensors_stream import _CODE_DTYPES, TensorSpec

        stored = self.opened.get_slice(name)
        return TensorSpec(name, _CODE_DTYPES[stored.get_dtype()], tuple(stored.get_shape()))

    def read(self, name: str) -> Any:
        return self.opened.get_tensor(name)

    def close(self) -> None:
        self.opened = None

    def __enter__(self) -> SafeOpenReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _shard_copy(source: Path, dest: Path) -> None:
    """The shard folder without energon's files, tars hard-linked: what each indexer starts from."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for entry in source.iterdir():
        if entry.name.endswith(".tar"):
            os.link(entry, dest / entry.name)
        elif entry.name in ("manifest.json", ".neva-shard"):
            (shutil.copytree if entry.is_dir() else shutil.copy)(entry, dest / entry.name)


def bench_energon(shards: Path, work: Path, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "energon": []}
    workers = str(os.cpu_count() or 1)
    for _ in range(repeats):
        for name, command in (("ours", "index-ours"), ("energon", "index-energon")):
            _shard_copy(shards, work / "index")
            runs[name].append(measure(child(command, str(work / "index"), workers)))
    shutil.rmtree(work / "index")
    return _process_result(runs, "ours", "energon", samples=json.loads((shards / "manifest.json").read_text())["written"])


def _warm(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):  # our reader drops what it read from the cache
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def bench_safetensors(checkpoint: Path, work: Path, repeats: int) -> dict[str, Any]:
    path = next(checkpoint.glob("*.safetensors"))
    streaming: dict[str, list[dict[str, float]]] = {"ours": [], "safe_open": []}
    whole: dict[str, list[dict[str, float]]] = {"ours": [], "safe_open": []}
    for _ in range(repeats):
        for name in streaming:
            _warm(checkpoint)
            streaming[name].append(measure(child(f"convert-{name}", str(checkpoint), str(work / "native"))))
            shutil.rmtree(work / "native")
            _warm(checkpoint)
            whole[name].append(measure(child(f"load-{name}", str(path))))
    return {"file_gb": round(path.stat().st_size / 1e9, 2),
            "streaming_convert_input": _process_result(streaming, "ours", "safe_open"),
            "whole_file_load": _process_result(whole, "ours", "safe_open")}


def _process_result(runs: dict[str, list[dict[str, float]]], ours: str, library: str, **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = dict(extra)
    for name, measured in runs.items():
        result[f"{name}_s"] = statistics.median(m["seconds"] for m in measured)
        result[f"{name}_peak_rss_mb"] = statistics.median(m["peak_rss_mb"] for m in measured)
    result["library_vs_ours"] = round(result[f"{library}_s"] / result[f"{ours}_s"], 2)
    result["library_vs_ours_memory"] = round(result[f"{library}_peak_rss_mb"] / result[f"{ours}_peak_rss_mb"], 2)
    result["verdict"] = verdict(result["library_vs_ours"], result["library_vs_ours_memory"])
    return result


# --- setup -----------------------------------------------------------------------------------------------------


def make_shards(work: Path, images: int) -> tuple[Path, list[bytes]]:
    from shard import DISTINCT_IMAGES, build_dataset, photo_like_jpeg

    import numpy as np

    json_path, zip_path, _ = build_dataset(work, images)
    command = [sys.executable, "-c", "import sys; from neva_core.data.shards import shard_dataset; "
               "shard_dataset(sys.argv[1], sys.argv[2], sys.argv[3])", str(json_path), str(zip_path), str(work / "shards")]
    subprocess.run(command, cwd=REPO, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    zip_path.unlink()
    rng = np.random.default_rng(0)
    return work / "shards", [photo_like_jpeg(rng, i) for i in range(DISTINCT_IMAGES)]


def make_checkpoint(work: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "bench" / "convert.py"), "--child", "synthetic", str(work / "1b-hf"),
                    "1b", "22"], cwd=REPO, check=True)
    return work / "1b-hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="images in the synthetic shard set")
    parser.add_argument("--checkpoint", type=Path, help="an HF folder with one .safetensors (else a 1.1B one is made)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-out", help="scratch folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1:])
        return
    work = args.workdir / f"libraries-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        shards, pictures = make_shards(work, args.images)
        result = {
            "bench": "libraries",
            "jpeg": bench_jpeg(pictures, args.repeats),
            "tar": bench_tar(pictures, work, args.repeats),
            "energon_index": bench_energon(shards, work, args.repeats),
            "safetensors": bench_safetensors(args.checkpoint or make_checkpoint(work), work, args.repeats),
            "rule": {"keep_if_library_slower_by": KEEP_IF_SLOWER, "keep_if_library_memory_by": KEEP_IF_MEMORY},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
