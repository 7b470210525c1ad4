"""Benchmark the training loader on LCS-558K-shaped shards; prints ONE JSON line.

Builds N photo-like 336-px JPEG records (bench/shard.py's generator) and shards them with `neva shard`.
The encoder does per sample what the trainer's does: decode, CLIP-style resize of the short side to
336 px + centre crop + normalisation, 576 image tokens, character ids for the text. Measured:

  * throughput (samples/s) with num_workers 0, 1 and 2, over --batches batches of 16 after one warm-up
    batch (which holds the worker start);
  * resume: seconds to the first batch for a fresh loader and for one restored near the end of an epoch,
    and how many batches energon replays to get there (the epoch itself is not re-read).

    python bench/loader.py [--images N] [--batches N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shard import build_dataset  # noqa: E402

from neva_core.data.loader import EncodedRecord, LoaderConfig, RawRecord, TrainLoader  # noqa: E402
from neva_core.data.templates import IGNORE_INDEX  # noqa: E402
from neva_core.data.loader_state import state_from_json  # noqa: E402
from neva_core.data.shards import shard_dataset  # noqa: E402

SIDE, IMAGE_TOKENS, IMAGE_TOKEN_ID, BATCH = 336, 576, 3, 16
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def clip_like(image: Image.Image) -> torch.Tensor:
    scale = SIDE / min(image.size)
    resized = image.resize((max(SIDE, round(image.width * scale)), max(SIDE, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - SIDE) // 2, (resized.height - SIDE) // 2
    pixels = np.asarray(resized.crop((left, top, left + SIDE, top + SIDE)), dtype=np.float32) / 255.0
    return torch.from_numpy((pixels - CLIP_MEAN) / CLIP_STD).permute(2, 0, 1).contiguous()


def encode(record: RawRecord) -> EncodedRecord:
    input_ids, labels = [1], [IGNORE_INDEX]
    for turn in record.conversations:
        before, tag, after = turn["value"].partition("<image>")
        ids = [10 + ord(c) % 200 for c in before] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS * bool(tag)
        ids += [10 + ord(c) % 200 for c in after]
        input_ids += ids
        labels += ids if turn["from"] == "gpt" else [IGNORE_INDEX] * len(ids)
    return EncodedRecord(input_ids, labels, None if record.image is None else clip_like(record.image))


def loader_config(shards: Path, workers: int) -> LoaderConfig:
    return LoaderConfig(shards=shards, encoder=encode, batch_size=BATCH, max_length=2048,
                        image_token_id=IMAGE_TOKEN_ID, image_size=SIDE, num_workers=workers)


def throughput(shards: Path, workers: int, batches: int) -> dict[str, float]:
    with TrainLoader(loader_config(shards, workers)) as loader:
        iterator = iter(loader)
        start = time.perf_counter()
        next(iterator)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        elapsed = time.perf_counter() - start
    return {"first_batch_s": round(first, 3), "samples_per_s": round(batches * BATCH / elapsed, 1)}


def resume(shards: Path, workers: int) -> dict[str, float]:
    with TrainLoader(loader_config(shards, workers)) as loader:
        at = int(0.9 * loader.samples_per_epoch) // BATCH
        iterator = iter(loader)
        for _ in range(at):
            next(iterator)
        state = json.loads(json.dumps(loader.state_dict()))
        expected = next(iterator).sample_ids
    replayed = sum(worker.offset for worker in state_from_json(state["energon"]).worker_states)
    with TrainLoader(loader_config(shards, workers)) as restored:
        start = time.perf_counter()
        restored.load_state_dict(state)
        batch = next(iter(restored))
        elapsed = time.perf_counter() - start
    if batch.sample_ids != expected:
        raise SystemExit("the restored loader did not continue with the saved run's next batch")
    return {"resumed_at_batch": at, "first_batch_after_restore_s": round(elapsed, 3),
            "replayed_batches": replayed, "state_json_bytes": len(json.dumps(state))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/loader"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        json_path, zip_path, mean_bytes = build_dataset(args.workdir, args.images)
        shards = args.workdir / "shards"
        shard_dataset(json_path, zip_path, shards, maxcount=500, workers=2)
        result = {"images": args.images, "mean_jpeg_bytes": round(mean_bytes), "batch": BATCH, "side": SIDE}
        for workers in (0, 1, 2):
            result[f"workers_{workers}"] = throughput(shards, workers, args.batches)
        result["resume_workers_2"] = resume(shards, 2)
        print(json.dumps(result))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
