"""TrainConfig, its flags and the presets: validation messages name the flags; flags override --config."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_core.errors import NevaError
from neva_core.train.arguments import build_train_parser, train_config_from_args
from neva_core.train.config import TrainConfig, flag

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PATHS = ["--shards", "s", "--llm", "l", "--vision", "v", "--tokenizer", "t", "--out", "o"]
MINIMAL = [*PATHS, "--stage", "pretrain", "--template", "plain", "--max-steps", "100", "--micro-batch", "4",
           "--global-batch", "16", "--lr", "1e-3", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def parser():
    return build_train_parser()


def config_from(parser, argv: list[str], env: dict[str, str] | None = None) -> TrainConfig:
    return train_config_from_args(parser.parse_args(argv), env={} if env is None else env)


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_preset_loads(parser, preset: Path) -> None:
    config = config_from(parser, [*PATHS, "--config", str(preset)])
    plan = config.plan(config.nnodes * config.nproc)
    assert plan.micro_batch * plan.grad_accum * plan.dp == config.global_batch
    assert config.out == Path("o")


def test_presets_carry_the_documents_numbers(parser) -> None:
    tp4 = config_from(parser, [*PATHS, "--config", str(CONFIGS / "neva-llama2-7b-chat-tp4.yaml")])
    assert (tp4.tp, tp4.micro_batch, tp4.global_batch, tp4.lr, tp4.min_lr) == (4, 32, 256, 2e-3, 2e-5)
    assert (tp4.betas, tp4.warmup_steps, tp4.clip_grad, tp4.max_steps) == ((0.9, 0.95), 140, 1.0, 4650)
    tp2 = config_from(parser, [*PATHS, "--config", str(CONFIGS / "neva-llama2-7b-chat-tp2.yaml")])
    assert tp2.plan(2).grad_accum == 8  # trainer.devices 2 at TP 2: data-parallel 1
    pretrain = config_from(parser, [*PATHS, "--config", str(CONFIGS / "llava-1.5-pretrain.yaml")])
    finetune = config_from(parser, [*PATHS, "--config", str(CONFIGS / "llava-1.5-finetune.yaml")])
    assert (pretrain.lr, pretrain.global_batch, pretrain.zero, pretrain.resolved_warmup_steps) == (1e-3, 256, 2, 66)
    assert (finetune.lr, finetune.global_batch, finetune.zero, finetune.image_aspect) == (2e-5, 128, 2, "pad")
    assert pretrain.projector == finetune.projector == "mlp2x_gelu"


def test_flags_override_the_config_file(parser, tmp_path: Path) -> None:
    preset = tmp_path / "run.yaml"
    preset.write_text("micro-batch: 2\nglobal_batch: 8\nlr: 2e-3\nnproc: 2\n")  # YAML 1.1 reads 2e-3 as text
    config = config_from(parser, [*MINIMAL, "--config", str(preset), "--micro-batch", "8"])
    assert (config.micro_batch, config.global_batch, config.lr, config.nproc) == (8, 16, 1e-3, 2)
    assert config.plan(2).grad_accum == 1
    no_flags = train_config_from_args(parser.parse_args([*PATHS, "--stage", "finetune", "--template", "llama_2",
                                                         "--max-steps", "9", "--config", str(preset)]), env={})
    assert (no_flags.micro_batch, no_flags.lr, no_flags.stage) == (2, 2e-3, "finetune")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--global-batch", "100", "--micro-batch", "16", "--nproc", "2"],
         "--global-batch 100 is not micro-batch 16 x gradient-accumulation x data-parallel 2"),
        (["--lr", "fast"], "--lr 'fast'"),
        (["--lr", "inf"], "--lr 'inf'"),
        (["--tp", "2", "--nproc", "3"], "--tp 2 does not divide the world size 3 (--nnodes 1 x --nproc 3)"),
        (["--warmup-steps", "10", "--warmup-ratio", "0.1"], "either --warmup-steps or --warmup-ratio"),
        (["--warmup-steps", "100"], "--warmup-steps gives 100 warmup steps"),
        (["--warmup-steps", "1"], "--warmup-steps '1'"),
        (["--max-steps", "2"], "the default --warmup-ratio 0.03 gives 2 warmup steps"),
        (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr"),
        (["--dtype", "bf16", "--zero", "0"], "--dtype bf16 needs --zero 1"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "a"], "--node-rank 2 is not below --nnodes 2"),
        (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --master-addr"),
        (["--no-ssh"], "--no-ssh needs --hostfile"),
        (["--hostfile", "h", "--node-rank", "1"], "--node-rank with --hostfile needs --no-ssh"),
        (["--betas", "0.9", "1.5"], "each AdamW beta must be in [0, 1)"),
        (["--max-steps", "ten"], "--max-steps 'ten'"),
    ],
)
def test_bad_options_name_the_flag(parser, extra: list[str], message: str) -> None:
    with pytest.raises(NevaError) as caught:
        config_from(parser, [*MINIMAL, *extra])
    assert message in str(caught.value)


def test_config_file_errors_name_the_file(parser, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\nmicro_bach: 4\n")
    with pytest.raises(NevaError) as caught:
        config_from(parser, [*PATHS, "--config", str(bad)])
    text = str(caught.value)
    assert f"lr in {bad} 'fast'" in text and f"micro_bach in {bad}: unknown option" in text
    assert "--stage is required" in text
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(NevaError, match="must be a mapping"):
        config_from(parser, [*PATHS, "--config", str(listing)])
    with pytest.raises(NevaError, match="cannot read it"):
        config_from(parser, [*PATHS, "--config", str(tmp_path / "missing.yaml")])


def test_unknown_choice_exits_2_naming_the_flag(parser, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        parser.parse_args([*MINIMAL, "--template", "chatml"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--template: invalid choice: 'chatml'" in err and "Traceback" not in err


def test_help_explains_every_option(parser) -> None:
    text = parser.format_help()
    for name, info in TrainConfig.model_fields.items():
        assert info.description, name
        option = "--ssh" if name == "ssh" else flag(name)
        assert option in text, option
    assert "--config FILE" in text and "(default: 0.9 0.999)" in text


def test_pytorchjob_environment_places_the_node(parser) -> None:
    env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "3", "MASTER_ADDR": "job-master-0",
           "MASTER_PORT": "23456", "WORLD_SIZE": "4", "RANK": "3"}
    config = config_from(parser, [*MINIMAL, "--global-batch", "128"], env)
    assert (config.nnodes, config.node_rank, config.nproc) == (4, 3, 8)
    assert (config.master_addr, config.master_port) == ("job-master-0", 23456)
    with pytest.raises(NevaError, match="--node-rank 1 contradicts the PyTorchJob environment, which gives 3"):
        config_from(parser, [*MINIMAL, "--global-batch", "128", "--node-rank", "1"], env)


def test_max_length_must_hold_the_image_tokens(parser) -> None:
    config = config_from(parser, [*MINIMAL, "--max-length", "300"])
    config.check_max_length(256)
    with pytest.raises(NevaError, match="--max-length 300 cannot hold the 576 image tokens"):
        config.check_max_length(576)


def test_resume_refuses_changed_options_but_not_neutral_ones(parser) -> None:
    saved = config_from(parser, MINIMAL).model_dump(mode="json")
    config_from(parser, [*MINIMAL, "--max-steps", "200", "--save-every", "7", "--shards", "elsewhere"]) \
        .check_resume(saved)
    with pytest.raises(NevaError, match=r"--lr 0\.001 -> 0\.002; --betas \[0\.9, 0\.999\] -> \[0\.9, 0\.95\]"):
        config_from(parser, [*MINIMAL, "--lr", "2e-3", "--betas", "0.9", "0.95"]).check_resume(saved)
