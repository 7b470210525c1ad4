"""`neva train` over several processes (gloo, CPU): pretraining (the projector into the frozen fixture LLM) at DP=2
and at TP=2 lowers the loss by 30%; finetunes from those outputs, TP=2 against TP=1 step by step and a DP=2 ZeRO-2
one, lower it by 30% too; SIGKILLs of the whole process group with a bit-identical resume at TP=2 and at DP=2, and
two one-process "nodes" against one node of two processes.

One reference run per topology is shared by the tests.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import torch
from train_support import (
    REPO,
    base_config,
    final_tensors,
    free_port,
    make_train_inputs,
    metrics_rows,
    run_training,
    worker_env,
)

from neva_core.checkpoint.repartition import repartition
from neva_core.train.launch import launch_command

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def inputs(neva_fixtures, neva_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-distributed")
    made = make_train_inputs(neva_fixtures, neva_tokenizer.out_dir, root)
    repartition(made.llm, root / "llm-tp2", tp=2)
    return made, root / "llm-tp2"


def pretrain_config(inputs, out, **changes):
    made, _ = inputs
    return base_config(made, out, **({"max_steps": STEPS, "save_every": 0, "val_every": 0} | changes))


def finetune_config(inputs, out, **changes):
    made, _ = inputs
    values = dict(shards=made.instruct_shards, stage="finetune", template="mistral", max_length=96, max_steps=STEPS,
                  lr=5e-3, save_every=4, val_every=6)
    return base_config(made, out, **(values | changes))


def assert_same_final(expected, got) -> None:
    expected_tensors, tensors = final_tensors(expected), final_tensors(got)
    assert expected_tensors.keys() == tensors.keys()
    for name, tensor in expected_tensors.items():
        assert torch.equal(tensor, tensors[name]), name


def losses(out) -> list[float]:
    return [float(row["loss"]) for row in metrics_rows(out)]


def kill_chain(config, points) -> str:
    """SIGKILL the run's process group at each point in turn, then rerun to the end; returns the last output."""
    for point, step in points:
        done = run_training(config, module="train_kill", extra_env={"NEVA_TEST_KILL": f"{point}:{step}"})
        assert done.returncode == -signal.SIGKILL, (point, done.stdout[-3000:])
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def pretrained_tp2(inputs, tmp_path_factory):
    config = pretrain_config(inputs, tmp_path_factory.mktemp("pretrain-tp2") / "out", llm=inputs[1], tp=2, nproc=2)
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-3000:]
    return config.out


@pytest.fixture(scope="module")
def pretrained_dp2(inputs, tmp_path_factory):
    config = pretrain_config(inputs, tmp_path_factory.mktemp("pretrain-dp2") / "out", nproc=2)
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-3000:]
    return config.out


@pytest.mark.parametrize("topology", ["pretrained_dp2", "pretrained_tp2"])
def test_pretraining_the_projector_lowers_the_loss_by_30_percent(topology, request) -> None:
    # The fixture LLM is a language model of the fixture text (make_fixtures pretrains it), frozen here: the
    # projector learns to hand it what the image shows, as LLaVA's alignment stage does with a real LLM.
    out = request.getfixturevalue(topology)
    assert losses(out)[-1] < 0.7 * losses(out)[0]


@pytest.fixture(scope="module")
def tp1(inputs, pretrained_tp2, tmp_path_factory):
    config = finetune_config(inputs, tmp_path_factory.mktemp("tp1") / "out", init=pretrained_tp2)
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-3000:]
    return config


@pytest.fixture(scope="module")
def tp2(inputs, pretrained_tp2, tmp_path_factory):
    config = finetune_config(inputs, tmp_path_factory.mktemp("tp2") / "out", init=pretrained_tp2, llm=inputs[1],
                             tp=2, nproc=2)
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "resuming" not in done.stdout
    return config


def test_tp2_equals_tp1_step_by_step(tp1, tp2) -> None:
    assert losses(tp2.out) == pytest.approx(losses(tp1.out), rel=1e-4)
    assert losses(tp2.out)[-1] < 0.7 * losses(tp2.out)[0]  # finetuning the LLM: the loss falls by more than 30%


def test_tp2_sigkill_of_the_process_group_then_rerun_is_bit_identical(tp2, inputs, tmp_path) -> None:
    config = tp2.model_copy(update={"out": tmp_path / "out"})
    output = kill_chain(config, [("in-save", 8), ("mid-step", 10)])
    (resumed,) = re.findall(r"resuming from step (\d+)", output)
    assert 0 < int(resumed) <= 10
    assert_same_final(tp2.out, config.out)


@pytest.fixture(scope="module")
def dp2(inputs, pretrained_dp2, tmp_path_factory):
    config = finetune_config(inputs, tmp_path_factory.mktemp("dp2") / "out", init=pretrained_dp2, nproc=2, zero=2,
                             global_batch=16)
    done = run_training(config)
    assert done.returncode == 0, done.stdout[-3000:]
    return config


def test_dp2_zero2_finetune_from_a_pretrain_output(dp2, pretrained_dp2) -> None:
    from safetensors.torch import load_file

    rows = metrics_rows(dp2.out)
    assert losses(dp2.out)[-1] < 0.7 * losses(dp2.out)[0]
    assert [row["step"] for row in rows if row["val_loss"]] == ["6", "12"]
    started = load_file(pretrained_dp2 / "final" / "projector.safetensors")
    finished = load_file(dp2.out / "final" / "projector.safetensors")
    assert started.keys() == finished.keys() and any(not torch.equal(started[k], finished[k]) for k in started)


def test_dp2_sigkill_between_deepspeed_files_and_commit_then_rerun_is_bit_identical(dp2, tmp_path) -> None:
    config = dp2.model_copy(update={"out": tmp_path / "out"})
    output = kill_chain(config, [("before-commit", 8), ("in-save", 8)])
    (resumed,) = re.findall(r"resuming from step (\d+)", output)
    assert resumed == "4"
    assert_same_final(dp2.out, config.out)


def test_two_nodes_of_one_process_equal_one_node_of_two(dp2, tmp_path) -> None:
    port = free_port()
    nodes = [dp2.model_copy(update={"out": tmp_path / "out", "nproc": 1, "nnodes": 2, "node_rank": rank,
                                    "master_addr": "127.0.0.1", "master_port": port}) for rank in (0, 1)]
    processes = [subprocess.Popen(launch_command(node, "neva_core.train.loop", [node.model_dump_json()]),
                                  env=worker_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True) for node in nodes]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_final(dp2.out, tmp_path / "out")
