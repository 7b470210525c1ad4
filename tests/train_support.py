"""Inputs and runners for the training tests: the fixtures made into shards, a native LLM and a tokenizer,
and `neva train` runs as subprocesses (one process directly, several through the real launcher)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.data.shards import shard_dataset
from neva_core.fixtures import Fixtures
from neva_core.train.config import TrainConfig
from neva_core.train.launch import launch_command, launch_environment

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
EXTENSIONS = REPO / ".torch_extensions"  # DeepSpeed's shm-comm JIT build, kept between runs (gitignored)


@dataclass(frozen=True)
class TrainInputs:
    pretrain_shards: Path
    instruct_shards: Path
    llm: Path
    vision: Path
    tokenizer: Path
    heldout_json: Path
    pretrain_zip: Path


def make_train_inputs(fixtures: Fixtures, tokenizer_dir: Path, root: Path) -> TrainInputs:
    llm = root / "llm"
    convert_hf_checkpoint(fixtures.llm_dir, llm, tokenizer=tokenizer_dir / "tokenizer.model", dtype="fp32")
    pretrain = root / "pretrain-shards"
    shard_dataset(fixtures.pretrain_json, fixtures.pretrain_zip, pretrain, maxcount=32, workers=1, val_fraction=0.1)
    instruct = root / "instruct-shards"
    shard_dataset(fixtures.instruct_json, fixtures.instruct_zip, instruct, maxcount=32, workers=1, val_fraction=0.1)
    return TrainInputs(pretrain, instruct, llm, fixtures.vision_dir, tokenizer_dir, fixtures.heldout_json,
                       fixtures.pretrain_zip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = launch_environment(os.environ, cpu=True)
    env.update({"TORCH_EXTENSIONS_DIR": str(EXTENSIONS), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])})
    env.update(extra)
    return env


def run_training(config: TrainConfig, *, module: str = "neva_core.train.loop", extra_env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """One `neva train` run in its own process group: one process directly, more through torchrun."""
    args = [config.model_dump_json()]
    if config.nproc * config.nnodes == 1:
        argv = [sys.executable, "-m", module, *args]
        env = worker_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port()), **(extra_env or {}))
    else:
        argv = launch_command(config, module, args)
        env = worker_env(**(extra_env or {}))
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, cwd=REPO)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, process.returncode, output, "")


def base_config(inputs: TrainInputs, out: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        shards=inputs.pretrain_shards, llm=inputs.llm, vision=inputs.vision, tokenizer=inputs.tokenizer, out=out,
        stage="pretrain", template="plain", projector="mlp2x_gelu", max_length=64, max_steps=8, micro_batch=4,
        global_batch=8, lr=1e-2, min_lr=1e-4, warmup_steps=2, betas=(0.9, 0.95), seed=0, dtype="fp32", zero=0,
        save_every=3, val_every=4, val_batches=2, keep_best=1, log_every=1,
    )
    values.update(changes)
    return TrainConfig(**values)


def metrics_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def final_tensors(out: Path) -> dict[str, Any]:
    """Every trained tensor of OUT/final (projector and LLM rank files), by name."""
    from safetensors.torch import load_file

    final = out / "final"
    tensors = {f"projector.{k}": v for k, v in load_file(final / "projector.safetensors").items()}
    for path in sorted((final / "llm").glob("*.safetensors")):
        tensors |= {f"{path.name}.{k}": v for k, v in load_file(path).items()}
    return tensors


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def heldout_accuracy(out: Path, heldout_json: Path, images_zip: Path) -> tuple[float, list[tuple[str, str]]]:
    """Share of held-out images whose greedy answer (each record's own question, through the model's
    training template) contains the true caption; and the (caption, answer) misses."""
    import io
    import zipfile

    import torch
    from PIL import Image

    from neva_core.data.preprocess import ImageProcessor
    from neva_core.data.text_tokenizer import load_text_tokenizer
    from neva_core.generate import generate_answers
    from neva_core.model.trained import load_trained_model, read_trained_config

    folder, settings, document = read_trained_config(out)
    model = load_trained_model(folder).eval()
    tokenizer = load_text_tokenizer(folder / "tokenizer")
    processor = ImageProcessor.from_folder(folder / "vision", aspect=document["provenance"]["config"]["image_aspect"])
    records = read_json(heldout_json)
    with zipfile.ZipFile(images_zip) as archive:
        images = torch.stack([processor(Image.open(io.BytesIO(archive.read(r["image"])))) for r in records])
    questions = [r["conversations"][0]["value"] for r in records]
    truths = [r["conversations"][1]["value"] for r in records]
    answers = generate_answers(model, tokenizer, settings.template, questions, images, max_new_tokens=12)
    misses = [(truth, answer) for truth, answer in zip(truths, answers) if truth not in answer]
    return 1 - len(misses) / len(records), misses
