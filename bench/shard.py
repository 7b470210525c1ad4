"""Benchmark: `neva shard` from images.zip against the recipe it replaces and against the disk.

Builds a synthetic LCS-558K-shaped dataset (N photo-like 336-px JPEGs of ~49 KB, a LLaVA JSON list,
a stored images.zip with 00000/ sub-folders; the default N = 100,000 gives a 5 GB zip, 1-2 minutes of
baseline, and needs ~17 GB of free disk at the peak), then times, each in a fresh subprocess with the
peak resident memory of its whole process tree (/proc polled every 20 ms, RSS summed over descendants):

  (a) baseline: full `unzip`, then one process writing every record with webdataset's
      ShardWriter(maxcount=10000), reading the images from disk (Megatron-LM's
      convert_llava_pretrain_to_wds.py);
  (b) ours: `neva shard` straight from images.zip, default workers, at N and at N/4;
  (c) disk floor: a durable copy of images.zip (`dd bs=4M conv=fsync`; cp stops at the page cache).

Prints one JSON line. Usage: python bench/shard.py [--images N] [--workdir DIR] [--workers N]
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
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DISTINCT_IMAGES = 64  # encoding is the slow part of the setup; entries cycle through this many pictures
SIDE = 336
JPEG_QUALITY = 89  # lands the synthetic pictures near LCS-558K's 49 KB average
POLL_SECONDS = 0.02
MAXCOUNT = 10000  # both the baseline's and neva's samples per shard

BASELINE = """
import json, os, sys, webdataset as wds
images, data, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
with wds.ShardWriter(os.path.join(out, "pretrain-%d.tar"), maxcount=MAXCOUNT, verbose=0) as writer:
    for entry in data:
        with open(os.path.join(images, entry["image"]), "rb") as f:
            image = f.read()
        writer.write({"__key__": entry["id"], "jpg": image,
                      "json": json.dumps(entry["conversations"]).encode("utf-8")})
"""


def photo_like_jpeg(rng: np.random.Generator, index: int) -> bytes:
    """Smooth gradients, blocky mid-frequency texture and fine noise: compresses like a photo."""
    height, width = SIDE, SIDE + 16 * (index % 5)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x * (0.3 + index % 3 * 0.2), y * 0.7, (x + y) * 0.35], axis=-1) % 256
    texture = rng.normal(0, 40, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    pixels = np.clip(base + texture + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def build_dataset(workdir: Path, count: int) -> tuple[Path, Path, float]:
    """data.json and a stored images.zip of `count` images; returns their paths and the mean image size."""
    rng = np.random.default_rng(0)
    pictures = [photo_like_jpeg(rng, i) for i in range(DISTINCT_IMAGES)]
    records, total = [], 0
    zip_path = workdir / f"images-{count}.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:  # LLaVA's zip holds JPEGs as stored
        for i in range(count):
            name = f"{i // 1000:05d}/{i:09d}.jpg"
            data = pictures[i % DISTINCT_IMAGES]
            archive.writestr(name, data)
            total += len(data)
            tag_first = i % 2 == 0
            human = "<image>\nRender a clear and concise summary of the photo." if tag_first else \
                "Render a clear and concise summary of the photo.\n<image>"
            records.append({"id": f"{i:09d}", "image": name, "conversations": [
                {"from": "human", "value": human},
                {"from": "gpt", "value": f"select luxury furniture {i} - inch gel memory foam mattress topper"}]})
    json_path = workdir / f"data-{count}.json"
    json_path.write_text(json.dumps(records))
    return json_path, zip_path, total / count


def descendants_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def timed(command: list[str]) -> tuple[float, float]:
    """Seconds and peak tree RSS (MB) of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        peak = max(peak, descendants_rss(process.pid))
        time.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{command} failed with exit code {process.returncode}")
    return seconds, peak / 2**20


def baseline(workdir: Path, json_path: Path, zip_path: Path) -> tuple[float, float, float]:
    """(a): unzip, then one ShardWriter process; returns total seconds, peak MB and the unzip's share."""
    extracted, shards = workdir / "a-images", workdir / "a-shards"
    for path in (extracted, shards):
        shutil.rmtree(path, ignore_errors=True)
    shards.mkdir()
    unzip = ["unzip", "-q", str(zip_path), "-d", str(extracted)] if shutil.which("unzip") else \
        [sys.executable, "-c", f"import zipfile; zipfile.ZipFile({str(zip_path)!r}).extractall({str(extracted)!r})"]
    unzip_s, unzip_mb = timed(unzip)
    script = BASELINE.replace("MAXCOUNT", str(MAXCOUNT))
    write_s, write_mb = timed([sys.executable, "-c", script, str(extracted), str(json_path), str(shards)])
    shutil.rmtree(extracted)
    shutil.rmtree(shards)
    return unzip_s + write_s, max(unzip_mb, write_mb), unzip_s


def ours(workdir: Path, json_path: Path, zip_path: Path, workers: int | None) -> tuple[float, float]:
    out = workdir / f"b-{zip_path.stem}"
    shutil.rmtree(out, ignore_errors=True)
    # The library call behind `neva shard` (the command only parses arguments and prints the result).
    call = f"shard_dataset({str(json_path)!r}, {str(zip_path)!r}, {str(out)!r}, workers={workers!r})"
    result = timed([sys.executable, "-c", f"from neva_core.data.shards import shard_dataset; {call}"])
    shutil.rmtree(out)
    return result


def durable_copy(workdir: Path, zip_path: Path, repeats: int = 3) -> float:
    """(c): median seconds of `dd ... conv=fsync` (the disk's write limit for the same bytes)."""
    copy = workdir / "c-copy.zip"
    runs = []
    for _ in range(repeats):
        runs.append(timed(["dd", f"if={zip_path}", f"of={copy}", "bs=4M", "conv=fsync", "status=none"])[0])
        copy.unlink()
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100000,
                        help="images in the synthetic set (default 100000: 1-2 minutes of the baseline here)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=None, help="workers for ours (default: neva's default)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="neva-bench-shard-")) if args.workdir is None else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        json_path, zip_path, mean_bytes = build_dataset(workdir, args.images)
        zip_mb = zip_path.stat().st_size / 1e6
        quarter_json, quarter_zip, _ = build_dataset(workdir, args.images // 4)
        dd_s = durable_copy(workdir, zip_path)
        base_s, base_mb, unzip_s = baseline(workdir, json_path, zip_path)
        ours_s, ours_mb = ours(workdir, json_path, zip_path, args.workers)
        quarter_s, quarter_mb = ours(workdir, quarter_json, quarter_zip, args.workers)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({
        "images": args.images,
        "mean_image_kb": round(mean_bytes / 1000, 1),
        "zip_mb": round(zip_mb, 1),
        "cpus": os.cpu_count(),
        "baseline_s": round(base_s, 2), "baseline_unzip_s": round(unzip_s, 2), "baseline_peak_rss_mb": round(base_mb),
        "ours_s": round(ours_s, 2), "ours_peak_rss_mb": round(ours_mb),
        "ours_shards": -(-args.images // MAXCOUNT),
        "ours_quarter_images": args.images // 4, "ours_quarter_shards": -(-(args.images // 4) // MAXCOUNT),
        "ours_quarter_s": round(quarter_s, 2),
        "ours_quarter_peak_rss_mb": round(quarter_mb),
        "dd_fsync_s": round(dd_s, 2),
        "ours_over_baseline": round(ours_s / base_s, 3),
        "ours_over_dd": round(ours_s / dd_s, 3),
    }))


if __name__ == "__main__":
    main()
