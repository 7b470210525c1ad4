"""The NeVA model's parts: CLIP tower loading, projector layout, stage freezing, TP=2 against TP=1 (gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model_support import run_distributed
from neva_core.errors import NevaError
from neva_core.model.llm import gather_logits
from neva_core.model.neva import Stage
from neva_core.model.projector import build_projector, hf_projector_activation, hf_projector_tensors
from neva_core.model.trained import (
    TrainedModelConfig,
    load_trained_model,
    read_trained_config,
    save_trained_model,
)
from neva_core.model.vision import VisionTower
from neva_support import mixed_batch, neva_from_hf, tiny_llava

# -- vision tower ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_model_folder(tmp_path_factory: pytest.TempPathFactory, neva_fixtures) -> Path:
    """A full CLIPModel (text + vision, model_type clip) whose vision tower is the fixture CLIP's,
    stored as pytorch_model.bin with the `vision_model.` prefix, as openai/clip-vit-large-patch14-336."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(neva_fixtures.vision_dir)
    config = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=vision.config.to_dict(), projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_model.")}
    state.update({f"vision_model.{k}": v for k, v in vision.state_dict().items()})
    folder = tmp_path_factory.mktemp("clip-full")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_vision_tower_takes_the_penultimate_layer_without_cls(neva_fixtures) -> None:
    from transformers import CLIPVisionModel

    tower = VisionTower.from_folder(neva_fixtures.vision_dir)
    reference = CLIPVisionModel.from_pretrained(neva_fixtures.vision_dir).eval()
    images = torch.randn(2, 3, 64, 64)
    features = tower(images)
    assert tower.num_patches == 16 and features.shape == (2, 16, 64)
    expected = reference(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(features, expected)
    assert not features.requires_grad and not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.clip.training


def test_full_clip_model_bin_gives_the_same_tower(neva_fixtures, clip_model_folder: Path) -> None:
    images = torch.randn(1, 3, 64, 64)
    from_full = VisionTower.from_folder(clip_model_folder)
    torch.testing.assert_close(from_full(images), VisionTower.from_folder(neva_fixtures.vision_dir)(images))


def test_vision_tower_refuses_pickled_objects_non_clip_and_empty_folders(tmp_path: Path, neva_fixtures) -> None:
    evil = tmp_path / "evil"
    shutil.copytree(neva_fixtures.vision_dir, evil)
    (evil / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(1), "payload": Path("/")}, evil / "pytorch_model.bin")
    with pytest.raises(NevaError, match="refused for safety.*safetensors"):
        VisionTower.from_folder(evil)
    with pytest.raises(NevaError, match=f"{neva_fixtures.llm_dir}.*not a CLIP model"):
        VisionTower.from_folder(neva_fixtures.llm_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(neva_fixtures.vision_dir / "config.json", empty)
    with pytest.raises(NevaError, match=f"{empty} holds no CLIP weights"):
        VisionTower.from_folder(empty)
    with pytest.raises(NevaError, match="no config.json"):
        VisionTower.from_folder(tmp_path)


# -- projector ---------------------------------------------------------------------------------------


def test_projector_keys_are_llava_mm_projector_names_and_export_exactly() -> None:
    mlp = build_projector("mlp2x_gelu", 24, 32)
    assert set(mlp.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(3, 24)
    state = mlp.state_dict()
    expected = F.linear(F.gelu(F.linear(x, state["0.weight"], state["0.bias"])), state["2.weight"], state["2.bias"])
    torch.testing.assert_close(mlp(x), expected)
    linear = build_projector("linear", 24, 32)
    assert set(linear.state_dict()) == {"weight", "bias"}
    hf = hf_projector_tensors("linear", linear.state_dict())  # as HF LLaVA computes it, identity activation
    assert hf_projector_activation("linear") == "linear"
    via_hf = F.linear(F.linear(x, hf["linear_1.weight"], hf["linear_1.bias"]), hf["linear_2.weight"], hf["linear_2.bias"])
    torch.testing.assert_close(via_hf, linear(x))
    with pytest.raises(NevaError, match="projector type 'mlp3x'"):
        build_projector("mlp3x", 24, 32)


# -- stages ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return neva_from_hf(tiny_llava("llama"))


def test_pretrain_trains_only_the_projector(model) -> None:
    model.set_stage(Stage.PRETRAIN)
    batch = mixed_batch()
    loss_sum, tokens = model.loss_terms(batch["input_ids"], batch["images"], batch["labels"])
    (loss_sum / tokens).backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) for p in model.projector.parameters())
    assert all(p.grad is None for p in model.llm.parameters()) and all(p.grad is None for p in model.vision.parameters())
    summary = model.parameter_summary(Stage.PRETRAIN)
    projector_size = sum(p.numel() for p in model.projector.parameters())
    assert summary["projector"] == {"trainable": projector_size, "frozen": 0}
    assert summary["llm"]["trainable"] == 0 and summary["vision"]["trainable"] == 0
    assert {id(p) for p in model.trainable_parameters(Stage.PRETRAIN)} == {id(p) for p in model.parameters()
                                                                          if p.requires_grad}
    model.zero_grad(set_to_none=True)


def test_finetune_trains_projector_and_llm_never_the_tower(model) -> None:
    model.set_stage(Stage.FINETUNE)
    model.train()
    assert not model.vision.training
    summary = model.parameter_summary(Stage.FINETUNE)
    assert summary["vision"]["trainable"] == 0 and summary["vision"]["frozen"] > 0
    assert summary["llm"] == {"trainable": sum(p.numel() for p in model.llm.parameters()), "frozen": 0}
    batch = mixed_batch()
    loss_sum, _ = model.loss_terms(batch["input_ids"], batch["images"], batch["labels"])
    loss_sum.backward()
    assert model.llm.embedding.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())
    model.zero_grad(set_to_none=True)
    model.set_stage(Stage.PRETRAIN)
    model.eval()


def test_loss_terms_weight_tokens_across_batches(model) -> None:
    """Summing (loss_sum, tokens) over micro-batches gives the loss of the whole batch."""
    batch = mixed_batch()
    with torch.no_grad():
        whole = model.loss_terms(batch["input_ids"], batch["images"], batch["labels"])
        parts = [model.loss_terms(batch["input_ids"][i:i + 1], batch["images"][i:i + 1], batch["labels"][i:i + 1])
                 for i in range(3)]
    torch.testing.assert_close(sum(p[0] for p in parts) / sum(p[1] for p in parts), whole[0] / whole[1])


def test_image_token_outside_the_vocabulary_is_refused(model) -> None:
    from neva_core.model.neva import NevaModel

    with pytest.raises(NevaError, match="image_token_id=-200"):
        NevaModel(model.vision, model.projector, model.llm, image_token_id=-200, projector_type="mlp2x_gelu")


# -- tensor parallelism ------------------------------------------------------------------------------


def neva_step(group: Any, trained: str | None = None) -> dict[str, Any]:
    """Pretrain-stage forward and backward; gathered logits, loss terms and projector gradients.

    The model is converted in memory from the HF test model, or loaded from the trained-model folder
    `trained` (written at TP=1, so a TP=2 rank merges and re-splits it on load)."""
    model = neva_from_hf(tiny_llava("llama"), group) if trained is None else load_trained_model(trained, group)
    model.set_stage(Stage.PRETRAIN)
    batch = mixed_batch()
    logits = model(batch["input_ids"], batch["images"], batch["attention_mask"])
    loss_sum, tokens = model.loss_terms(batch["input_ids"], batch["images"], batch["labels"], batch["attention_mask"])
    (loss_sum / tokens).backward()
    real = batch["attention_mask"]
    return {"logits": gather_logits(logits.detach(), group)[..., : model.llm.config.vocab_size][real],
            "loss_sum": loss_sum.detach(), "tokens": tokens,
            "grads": {name: p.grad for name, p in model.projector.named_parameters()}}


def tp2_worker(rank: int, world: int, group: Any, trained: str, saved: str) -> dict[str, Any]:
    results = {"converted": neva_step(group), "loaded": neva_step(group, trained)}
    model, settings = load_trained_model(trained, group), read_trained_config(trained)[1]
    save_trained_model(saved, llm=model.llm, projector=model.projector, vision_dir=Path(trained) / "vision",
                       tokenizer_dir=Path(trained) / "tokenizer", settings=settings)
    return results


@pytest.fixture(scope="module")
def trained_tp1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-model folder (TP=1 rank file) holding the HF test model's weights."""
    model = neva_from_hf(tiny_llava("llama"))
    work = tmp_path_factory.mktemp("neva-trained-tp1")
    model.vision.clip.save_pretrained(work / "vision")
    (work / "tokenizer").mkdir()
    (work / "tokenizer" / "tokenizer_config.json").write_text("{}")  # not read by these tests
    settings = TrainedModelConfig(family="llama", template="plain", projector_type=model.projector_type,
                                  image_size=model.vision.image_size, patch_size=model.vision.patch_size,
                                  image_token_id=model.image_token_id)
    return save_trained_model(work / "model", llm=model.llm, projector=model.projector, vision_dir=work / "vision",
                              tokenizer_dir=work / "tokenizer", settings=settings)


@pytest.fixture(scope="module")
def saved_at_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("neva-tp-save") / "model"


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory: pytest.TempPathFactory, trained_tp1: Path, saved_at_tp2: Path) -> list[dict[str, Any]]:
    return run_distributed(tp2_worker, 2, tmp_path_factory.mktemp("neva-tp") / "out", str(trained_tp1),
                           str(saved_at_tp2))


@pytest.mark.parametrize("source", ["converted", "loaded"])
def test_tp2_logits_loss_and_projector_gradients_equal_tp1(tp2_results: list, source: str) -> None:
    reference = neva_step(None)
    for rank_results in tp2_results:
        result = rank_results[source]
        torch.testing.assert_close(result["logits"], reference["logits"])
        torch.testing.assert_close(result["loss_sum"], reference["loss_sum"])
        assert result["tokens"] == reference["tokens"]
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_tp2_model_saves_the_same_trained_folder(tp2_results: list, trained_tp1: Path, saved_at_tp2: Path) -> None:
    from neva_core.checkpoint.layout import load_native_rank

    assert read_trained_config(saved_at_tp2, deep=True)[1] == read_trained_config(trained_tp1)[1]
    original, saved = load_native_rank(trained_tp1 / "llm", 0), load_native_rank(saved_at_tp2 / "llm", 0)
    assert original.keys() == saved.keys()
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), name
