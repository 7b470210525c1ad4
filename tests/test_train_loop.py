"""`neva train` in one process: outputs, validation and best-K, a no-op rerun, an extension, SIGKILLs at seeded
points with a bit-identical resume, SIGTERM, a NaN loss; and every bad input, refused before any step.

One uninterrupted reference run is shared by the tests; the interrupted runs are compared with it.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_support import (
    REPO,
    base_config,
    free_port,
    final_tensors,
    make_train_inputs,
    metrics_rows,
    read_json,
    run_training,
    worker_env,
)

from neva_core.errors import NevaError
from neva_core.io import is_temp_name
from neva_core.train.checkpointing import committed_checkpoints
from neva_core.train.loop import check_resumable
from neva_core.train.metrics import COLUMNS
from neva_core.train.preflight import check_inputs
from neva_core.train.setup import same_run_final

STEPS = 8  # save every 3 (and at 8), validate every 4


@pytest.fixture(scope="module")
def inputs(neva_fixtures, neva_tokenizer, tmp_path_factory):
    return make_train_inputs(neva_fixtures, neva_tokenizer.out_dir, tmp_path_factory.mktemp("train-inputs"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    config = base_config(inputs, tmp_path_factory.mktemp("reference") / "out", max_steps=STEPS)
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-4000:]
    return config, done.stdout


def test_run_writes_metrics_checkpoints_and_the_final_model(reference) -> None:
    config, output = reference
    rows = metrics_rows(config.out)
    assert [int(row["step"]) for row in rows] == list(range(1, STEPS + 1))
    assert list(rows[0]) == list(COLUMNS)
    assert all(row["loss"] and row["lr"] and row["grad_norm"] and row["samples_per_s"] for row in rows)
    assert [row["step"] for row in rows if row["val_loss"]] == ["4", "8"]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert (config.out / "loss.png").stat().st_size > 0
    assert list((config.out / "tensorboard").glob("events.out.tfevents.*"))
    # newest (8) plus the best by val loss (of 3: none, 6: none, 8: val): steps 3 and 6 had no val loss
    assert [ckpt.step for ckpt in committed_checkpoints(config.out)] == [8]
    model_json = read_json(config.out / "final" / "model.json")
    provenance = model_json["provenance"]
    val_losses = {int(row["step"]): float(row["val_loss"]) for row in rows if row["val_loss"]}
    best_step = min(val_losses, key=val_losses.get)
    assert provenance["steps"] == STEPS and provenance["best_val_step"] == best_step
    assert provenance["best_val_loss"] == pytest.approx(val_losses[best_step], rel=1e-5)
    assert model_json["template"] == "plain" and model_json["projector_type"] == "mlp2x_gelu"
    logged = [line for line in output.splitlines() if "neva_core.train" in line]
    assert all(line.startswith("INFO neva_core.train:") for line in logged)


def test_rerun_of_a_finished_run_is_a_no_op(reference) -> None:
    config, _ = reference
    before = {p: p.stat().st_mtime_ns for p in (config.out / "final").rglob("*") if p.is_file()}
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "already finished at step 8; nothing to do" in done.stdout
    assert {p: p.stat().st_mtime_ns for p in (config.out / "final").rglob("*") if p.is_file()} == before


def test_final_is_kept_only_for_the_same_step_and_config(reference, tmp_path) -> None:
    # write_final's check of a final/ already there (io.commit_output's reuse): this run's own is kept,
    # another step's (an extended run) or a damaged one is replaced.
    config, _ = reference
    final = config.out / "final"
    provenance = read_json(final / "model.json")["provenance"]
    assert same_run_final(final, provenance) == final
    assert same_run_final(final, provenance | {"steps": STEPS + 2}) is None
    damaged = shutil.copytree(final, tmp_path / "final")
    (damaged / "projector.safetensors").write_bytes(b"damaged")
    assert same_run_final(damaged, provenance) is None


def kill_plan(seed: int) -> list[tuple[str, int]]:
    """Seeded kill points: mid-step after the first save, inside DeepSpeed's save, before the commit."""
    rng = random.Random(seed)
    mid = rng.randint(4, 5)  # the save at 3 came before
    return [("mid-step", mid), ("in-save", 6), ("before-commit", STEPS)]


def stop_with_sigterm_after(config, step: int) -> subprocess.CompletedProcess:
    """Run until step `step` is logged, then SIGTERM the process, as a scheduler would."""
    env = worker_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    process = subprocess.Popen([sys.executable, "-m", "neva_core.train.loop", config.model_dump_json()], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if f"step {step} " in line:
            process.send_signal(signal.SIGTERM)
    return subprocess.CompletedProcess(process.args, process.wait(timeout=120), "".join(lines), "")


def test_sigterm_then_sigkills_at_seeded_points_then_rerun_is_bit_identical(reference, inputs, tmp_path) -> None:
    config, _ = reference
    killed = base_config(inputs, tmp_path / "out", max_steps=STEPS)
    stopped = stop_with_sigterm_after(killed, 1)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "stopped by SIGTERM after saving step" in stopped.stdout
    (saved,) = committed_checkpoints(killed.out)
    assert 1 <= saved.step < STEPS
    for point, step in kill_plan(seed=11):
        done = run_training(killed, module="train_kill", extra_env={"NEVA_TEST_KILL": f"{point}:{step}"})
        assert done.returncode == -signal.SIGKILL, (point, done.stdout[-3000:])
        (resumed,) = re.findall(r"resuming from step (\d+)", done.stdout)
        assert 0 < int(resumed) <= step, done.stdout[-2000:]
        assert not (killed.out / "final").exists()
    done = run_training(killed)
    assert done.returncode == 0, done.stdout[-3000:]
    (resumed,) = re.findall(r"resuming from step (\d+)", done.stdout)
    assert 0 < int(resumed) <= STEPS
    assert "removing" in done.stdout  # the killed save's temporary was found and dropped
    reference_tensors, tensors = final_tensors(config.out), final_tensors(killed.out)
    assert reference_tensors.keys() == tensors.keys()
    for name, tensor in reference_tensors.items():
        assert torch.equal(tensor, tensors[name]), name
    assert [row["loss"] for row in metrics_rows(killed.out)] == [row["loss"] for row in metrics_rows(config.out)]


def test_save_minutes_commits_a_checkpoint_between_save_every_steps(inputs, tmp_path) -> None:
    # A minute per step: 3 minutes have passed at step 3, the only save before the last (step 4) that is
    # killed before its commit, so the step-3 checkpoint is the one left; --save-every 0 alone saves only at 4.
    config = base_config(inputs, tmp_path / "out", max_steps=4, save_every=0, val_every=0, save_minutes=2.5)
    done = run_training(config, module="train_kill",
                        extra_env={"NEVA_TEST_STEP_SECONDS": "60", "NEVA_TEST_KILL": "before-commit:4"})
    assert done.returncode == -signal.SIGKILL, done.stdout[-3000:]
    assert [ckpt.step for ckpt in committed_checkpoints(config.out)] == [3]


def test_a_finished_run_extends_with_a_higher_max_steps(reference, inputs, tmp_path) -> None:
    config, _ = reference
    out = tmp_path / "out"
    shutil.copytree(config.out, out)
    extended = base_config(inputs, out, max_steps=STEPS + 2)
    done = run_training(extended)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resuming from step {STEPS}" in done.stdout
    assert read_json(out / "final" / "model.json")["provenance"]["steps"] == STEPS + 2
    assert not [entry.name for entry in out.iterdir() if is_temp_name(entry)]  # the old final/ went with its swap
    ckpt = committed_checkpoints(out)[-1]
    with pytest.raises(NevaError, match=r"--lr 0.01 -> 0.005"):
        check_resumable(base_config(inputs, out, max_steps=STEPS + 4, lr=5e-3), ckpt, 1)
    with pytest.raises(NevaError, match="saved by 1 processes, this run has 2"):
        check_resumable(base_config(inputs, out, max_steps=STEPS + 4), ckpt, 2)


def test_a_nan_loss_stops_the_run_before_the_update_and_saves_nothing(inputs, tmp_path) -> None:
    config = base_config(inputs, tmp_path / "out", max_steps=4, lr=1e30, warmup_steps=2, clip_grad=0.0)
    done = run_training(config)
    assert done.returncode == 2, done.stdout[-3000:]
    assert re.search(r"step \d: the loss is (nan|inf)", done.stdout), done.stdout[-3000:]
    failed_at = int(re.search(r"step (\d): the loss", done.stdout)[1])
    assert all(ckpt.step < failed_at for ckpt in committed_checkpoints(config.out))
    assert not (config.out / "final").exists()


# --- bad inputs, refused before any process starts ---------------------------------------------------------


def _copy_llm_with_tp(llm: Path, dest: Path, tp: int) -> Path:
    from neva_core.checkpoint.repartition import repartition

    repartition(llm, dest, tp=tp)
    return dest


@pytest.fixture(scope="module")
def bad_inputs(inputs, tmp_path_factory, neva_fixtures):
    from neva_core.checkpoint.convert import convert_hf_checkpoint
    from neva_core.data.shards import shard_dataset

    root = tmp_path_factory.mktemp("bad-inputs")
    other_vocab = root / "llm-no-extension"
    convert_hf_checkpoint(neva_fixtures.llm_dir, other_vocab, dtype="fp32")
    no_val = root / "shards-no-val"
    shard_dataset(neva_fixtures.pretrain_json, neva_fixtures.pretrain_zip, no_val, maxcount=64, workers=1)
    return {"other_vocab": other_vocab, "no_val": no_val, "tp2": _copy_llm_with_tp(inputs.llm, root / "llm-tp2", 2),
            "empty": root / "empty"}


@pytest.mark.parametrize("case, message", [
    ("batch", r"--global-batch 10 is not micro-batch 4 x gradient-accumulation x data-parallel 1"),
    ("vocab", r"--tokenizer .* has 392 tokens but --llm .* has a vocabulary of 384"),
    ("tp", r"--tp 1 differs from --llm .*tp=2"),
    ("missing shards", r"--shards .*missing.* does not exist"),
    ("empty shards", r"--shards .*empty"),
    ("no val split", r"--val-every 4 needs a val split"),
    ("vision", r"--vision .* not a CLIP model"),
    ("template", r"--template 'chatml'"),
    ("max length", r"--max-length 16 cannot hold the 16 image tokens"),
    ("lr", r"--lr 'fast'"),
])
def test_bad_input_is_refused_naming_the_flag(case: str, message: str, inputs, bad_inputs, tmp_path) -> None:
    from neva_core.train.config import make_train_config

    values = base_config(inputs, tmp_path / "out").model_dump()
    changes = {
        "batch": {"global_batch": 10}, "vocab": {"llm": bad_inputs["other_vocab"]}, "tp": {"llm": bad_inputs["tp2"]},
        "missing shards": {"shards": tmp_path / "missing"}, "empty shards": {"shards": bad_inputs["empty"]},
        "no val split": {"shards": bad_inputs["no_val"]}, "vision": {"vision": inputs.llm.parent / "llm"},
        "template": {"template": "chatml"}, "max length": {"max_length": 16}, "lr": {"lr": "fast"},
    }[case]
    if case == "empty shards":
        bad_inputs["empty"].mkdir(exist_ok=True)
    if case == "vision":
        fake = tmp_path / "not-clip"
        fake.mkdir()
        (fake / "config.json").write_text('{"model_type": "llama"}')
        changes = {"vision": fake}
    with pytest.raises(NevaError, match=message):
        check_inputs(make_train_config(values | changes))
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_input_with_exit_2_and_no_traceback(inputs, tmp_path) -> None:
    args = ["--shards", str(inputs.pretrain_shards), "--llm", str(inputs.llm), "--vision", str(inputs.vision),
            "--tokenizer", str(inputs.tokenizer), "--out", str(tmp_path / "out"), "--config",
            str(REPO / "configs" / "tiny-pretrain.yaml"), "--global-batch", "12"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "neva_core.cli", "train", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--global-batch 12 is not micro-batch 16" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and time.perf_counter() - started < 60


def test_cli_passes_sigterm_to_its_workers_which_save_and_leave_no_process(inputs, tmp_path) -> None:
    import os

    import yaml

    config = base_config(inputs, tmp_path / "out", max_steps=200, save_every=0, val_every=0)
    preset = tmp_path / "run.yaml"
    preset.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    process = subprocess.Popen([sys.executable, "-m", "neva_core.cli", "train", "--config", str(preset)], cwd=REPO,
                               env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "step 2 " in line:
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    output = "".join(lines)
    assert "stopped by SIGTERM after saving step" in output, output[-3000:]
    (saved,) = committed_checkpoints(config.out)
    assert 2 <= saved.step < 200
    leftover = subprocess.run(["pgrep", "-f", str(config.out)], capture_output=True, text=True).stdout.split()
    assert [pid for pid in leftover if int(pid) != os.getpid()] == []
