"""Test fixtures for the evaluation (a pytest plugin of its test modules): trained-model folders built without
training, whose random projectors differ, so their generations differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.model.projector import build_projector
from neva_core.model.trained import TrainedModelConfig, save_trained_model


def build_trained_model(out: Path, native_llm: Path, neva_fixtures, neva_tokenizer, projector_seed: int,
                        stage: str = "test, untrained") -> Path:
    """A trained-model folder from the fixture LLM and CLIP with a random projector (no training); `stage`
    goes into its provenance, so two folders of the same weights can differ in identity."""
    settings = TrainedModelConfig(family="llama", template="vicuna_v1", projector_type="mlp2x_gelu", image_size=64,
                                  patch_size=16, image_token_id=neva_tokenizer.added["<extra_id_3>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(projector_seed)
        projector = build_projector("mlp2x_gelu", 64, 64)
    return save_trained_model(out, llm=native_llm, projector=projector, vision_dir=neva_fixtures.vision_dir,
                              tokenizer_dir=neva_tokenizer.out_dir, settings=settings,
                              provenance={"stage": stage, "projector_seed": projector_seed})


@pytest.fixture(scope="session")
def eval_native_llm(neva_fixtures, neva_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-llm") / "native"
    convert_hf_checkpoint(neva_fixtures.llm_dir, out, tokenizer=neva_tokenizer.tokenizer_model, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def eval_model(eval_native_llm, neva_fixtures, neva_tokenizer, tmp_path_factory) -> Path:
    return build_trained_model(tmp_path_factory.mktemp("eval-model") / "model", eval_native_llm, neva_fixtures,
                               neva_tokenizer, projector_seed=7)


@pytest.fixture(scope="session")
def other_model(eval_native_llm, neva_fixtures, neva_tokenizer, tmp_path_factory) -> Path:
    """The same LLM and CLIP as eval_model with another random projector."""
    return build_trained_model(tmp_path_factory.mktemp("other-model") / "model", eval_native_llm, neva_fixtures,
                               neva_tokenizer, projector_seed=8)
