"""The trained-model folder: built from the fixtures without training (random projector), loaded back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.checkpoint.layout import load_native_rank
from neva_core.errors import NevaError
from neva_core.io import MANIFEST_NAME
from neva_core.model.llm import gather_logits
from neva_core.model.projector import build_projector
from neva_core.model.trained import (
    PROJECTOR_FILE,
    TrainedModelConfig,
    load_trained_model,
    read_trained_config,
    save_trained_model,
)
from neva_core.model.vision import VisionTower


@pytest.fixture(scope="module")
def native_llm(neva_fixtures, neva_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained-llm") / "native"
    convert_hf_checkpoint(neva_fixtures.llm_dir, out, tokenizer=neva_tokenizer.tokenizer_model, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def settings(neva_tokenizer) -> TrainedModelConfig:
    return TrainedModelConfig(family="llama", template="vicuna_v1", projector_type="mlp2x_gelu", image_size=64,
                              patch_size=16, image_token_id=neva_tokenizer.added["<extra_id_3>"])


@pytest.fixture(scope="module")
def projector() -> torch.nn.Module:
    torch.manual_seed(7)
    return build_projector("mlp2x_gelu", 64, 64)


@pytest.fixture(scope="module")
def trained(native_llm, settings, projector, neva_fixtures, neva_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "model"
    return save_trained_model(out, llm=native_llm, projector=projector, vision_dir=neva_fixtures.vision_dir,
                              tokenizer_dir=neva_tokenizer.out_dir, settings=settings,
                              provenance={"stage": "test, untrained"})


def test_folder_is_self_contained_with_config_and_manifest_last(trained: Path, settings) -> None:
    manifest = json.loads((trained / MANIFEST_NAME).read_text())
    listed = set(manifest["files"])
    present = {str(p.relative_to(trained)) for p in trained.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert listed == present
    assert {"model.json", PROJECTOR_FILE, "llm/config.json", "llm/manifest.json", "llm/model-tp00-of01.safetensors",
            "vision/config.json", "vision/model.safetensors", "vision/preprocessor_config.json",
            "tokenizer/tokenizer.model", "tokenizer/extension.json"} <= listed
    model_json = json.loads((trained / "model.json").read_text())
    assert model_json["image_tokens"] == 16 and model_json["image_token_id"] == settings.image_token_id
    assert model_json["vision_select_layer"] == -2 and model_json["template"] == "vicuna_v1"
    moved = trained.parent / "moved"
    shutil.copytree(trained, moved)  # self-contained: a copy elsewhere loads alone
    _, moved_settings, _ = read_trained_config(moved, deep=True)
    assert moved_settings == settings


def test_loaded_model_holds_exactly_the_saved_parts(trained: Path, native_llm: Path, projector, neva_fixtures) -> None:
    model = load_trained_model(trained, deep=True)
    for name, tensor in load_native_rank(native_llm, 0).items():
        assert torch.equal(model.llm.state_dict()[name], tensor), name
    for name, tensor in projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[name], tensor), name
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.vision(images), VisionTower.from_folder(neva_fixtures.vision_dir)(images))
    assert getattr(model.llm.decoder.layers[0].mlp.linear_fc1.weight, "partition_dim", None) == 0  # re-applied


def test_run_output_folder_means_its_final(trained: Path, tmp_path: Path, settings) -> None:
    run = tmp_path / "run"
    (run).mkdir()
    os.symlink(trained, run / "final")
    assert read_trained_config(run)[1] == settings


def test_model_in_memory_saves_and_reloads_to_the_same_logits(trained: Path, tmp_path: Path, neva_fixtures,
                                                             neva_tokenizer, settings) -> None:
    model = load_trained_model(trained)
    with torch.no_grad():
        model.projector[0].weight.mul_(3.0)  # "trained"
    again = save_trained_model(tmp_path / "again", llm=model.llm, projector=model.projector,
                               vision_dir=trained / "vision", tokenizer_dir=trained / "tokenizer", settings=settings)
    reloaded = load_trained_model(again)
    input_ids = torch.randint(3, 380, (2, 24))
    input_ids[0, 1:17] = settings.image_token_id
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gather_logits(reloaded(input_ids, images)), gather_logits(model(input_ids, images)))


def test_damaged_or_incomplete_folders_are_refused(trained: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged)
    data = bytearray((damaged / PROJECTOR_FILE).read_bytes())
    data[-1] ^= 0xFF
    (damaged / PROJECTOR_FILE).unlink()  # break the hard link before writing
    (damaged / PROJECTOR_FILE).write_bytes(bytes(data))
    with pytest.raises(NevaError, match="projector.safetensors does not match its sha256"):
        load_trained_model(damaged, deep=True)
    (damaged / MANIFEST_NAME).unlink()
    with pytest.raises(NevaError, match="manifest.json is missing"):
        load_trained_model(damaged)


def test_mismatched_parts_are_refused(native_llm, projector, neva_fixtures, neva_tokenizer, tmp_path: Path) -> None:
    wrong_size = TrainedModelConfig(family="llama", template="plain", projector_type="mlp2x_gelu", image_size=336,
                                    patch_size=14, image_token_id=387)
    with pytest.raises(NevaError, match="336 px / patch 14"):
        save_trained_model(tmp_path / "x", llm=native_llm, projector=projector, vision_dir=neva_fixtures.vision_dir,
                           tokenizer_dir=neva_tokenizer.out_dir, settings=wrong_size)
    wrong_projector = TrainedModelConfig(family="llama", template="plain", projector_type="linear", image_size=64,
                                         patch_size=16, image_token_id=387)
    with pytest.raises(NevaError, match="not a linear projector"):
        save_trained_model(tmp_path / "y", llm=native_llm, projector=projector, vision_dir=neva_fixtures.vision_dir,
                           tokenizer_dir=neva_tokenizer.out_dir, settings=wrong_projector)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(NevaError, match="prompt template 'vicuna' is not one of"):
        TrainedModelConfig(family="llama", template="vicuna", projector_type="linear", image_size=64, patch_size=16,
                           image_token_id=387)


# -- HF LLaVA export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from neva_core.cli import main

    out = tmp_path_factory.mktemp("export") / "llava"
    assert main(["export", "--in", str(trained), "--out", str(out)]) == 0
    return out


def test_export_loads_in_transformers_with_the_same_logits(exported: Path, trained: Path, neva_fixtures) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from neva_core.fixtures import draw_shape_image

    hf_model = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    processor = AutoProcessor.from_pretrained(exported)
    image = draw_shape_image(np.random.default_rng(0), "red", "circle", 80)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    ours = load_trained_model(trained)
    assert int((inputs["input_ids"] == ours.image_token_id).sum()) == ours.image_tokens
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        logits = gather_logits(ours(inputs["input_ids"], inputs["pixel_values"]))[..., : ours.llm.config.vocab_size]
    torch.testing.assert_close(logits, expected)


def test_export_is_reused_and_a_different_folder_is_refused(exported: Path, trained: Path, tmp_path: Path) -> None:
    from neva_core.llava import export_llava

    assert export_llava(trained, exported) == exported
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST_NAME).write_text("{}")
    with pytest.raises(NevaError, match="not an export of this trained model"):
        export_llava(trained, other)


def test_export_chat_template_gives_the_training_prompt_ids(exported: Path, trained: Path) -> None:
    from transformers import AutoProcessor

    from neva_core.data.templates import build_generation_prompt
    from neva_core.data.text_tokenizer import load_text_tokenizer
    from neva_core.fixtures import draw_shape_image

    processor = AutoProcessor.from_pretrained(exported)
    question = "What is shown?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(images=draw_shape_image(np.random.default_rng(0), "red", "circle", 64), text=prompt,
                    return_tensors="pt")["input_ids"][0].tolist()
    tokenizer = load_text_tokenizer(trained / "tokenizer")
    assert ids == build_generation_prompt("vicuna_v1", question, tokenizer, 16)


# -- import ------------------------------------------------------------------------------------------


def test_llava_hf_folder_imports_to_the_same_model(trained: Path, tmp_path: Path) -> None:
    from neva_core.cli import main
    from neva_core.llava import export_llava

    sharded = export_llava(trained, tmp_path / "sharded", max_shard_bytes=100_000)  # read through its index
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    out = tmp_path / "imported"
    assert main(["import", "--llava-hf", str(sharded), "--out", str(out), "--template", "vicuna_v1"]) == 0
    original, imported = load_trained_model(trained), load_trained_model(out, deep=True)
    for part in ("llm", "projector", "vision"):
        left, right = getattr(original, part).state_dict(), getattr(imported, part).state_dict()
        assert left.keys() == right.keys()
        for name in left:
            assert torch.equal(left[name], right[name]), (part, name)
    assert read_trained_config(out)[1] == read_trained_config(trained)[1]


def test_mm_projector_bin_imports_with_the_llm_tower_and_tokenizer(trained: Path, native_llm: Path, neva_fixtures,
                                                                   neva_tokenizer, projector, tmp_path: Path) -> None:
    from neva_core.cli import main

    mm_projector = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}, mm_projector)
    out = tmp_path / "init"
    assert main(["import", "--mm-projector", str(mm_projector), "--llm", str(native_llm),
                 "--vision", str(neva_fixtures.vision_dir), "--tokenizer", str(neva_tokenizer.out_dir),
                 "--template", "vicuna_v1", "--out", str(out)]) == 0
    imported = load_trained_model(out)
    for name, tensor in projector.state_dict().items():
        assert torch.equal(imported.projector.state_dict()[name], tensor)
    assert imported.image_token_id == neva_tokenizer.added["<extra_id_3>"]
    wrong = tmp_path / "wrong.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32), "model.mm_projector.0.bias": torch.zeros(64),
                "model.mm_projector.2.weight": torch.zeros(64, 64), "model.mm_projector.2.bias": torch.zeros(64)}, wrong)
    assert main(["import", "--mm-projector", str(wrong), "--llm", str(native_llm),
                 "--vision", str(neva_fixtures.vision_dir), "--tokenizer", str(neva_tokenizer.out_dir),
                 "--template", "vicuna_v1", "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


def test_greedy_generation_of_the_export_equals_ours(exported: Path, trained: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from neva_core.fixtures import draw_shape_image
    from neva_core.generate import greedy_generate

    hf_model = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    processor = AutoProcessor.from_pretrained(exported)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=draw_shape_image(np.random.default_rng(1), "blue", "square", 64), text=prompt,
                       return_tensors="pt")
    expected = hf_model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    ours = load_trained_model(trained)
    with torch.no_grad():
        embeds = ours.embed(inputs["input_ids"], inputs["pixel_values"])
    tokens = greedy_generate(ours.llm, prompt_embeds=embeds, eos_id=2, max_new_tokens=12)
    new = expected[0, inputs["input_ids"].shape[1]:].tolist()
    assert tokens[0] == [t for t in new[: new.index(2) if 2 in new else len(new)]]


def test_bf16_and_activation_checkpointing_pass_through_on_load(trained: Path, settings) -> None:
    from neva_core.model.neva import Stage

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 380, (2, 24), generator=generator)
    input_ids[:, 1:17] = settings.image_token_id
    labels = input_ids.masked_fill(input_ids == settings.image_token_id, -100)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    reference = load_trained_model(trained)
    half = load_trained_model(trained, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        expected = gather_logits(reference(input_ids, images))
        actual = gather_logits(half(input_ids, images)).float()
    # bf16 keeps about 3 significant digits, and the error grows through the layers: judged over the whole
    # logits tensor (a few of its 24576 values can be off by more than any elementwise bound that stays tight)
    assert ((actual - expected).norm() / expected.norm()).item() < 0.02
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean().item() > 0.9
    checkpointed = load_trained_model(trained, activation_checkpointing=True)
    assert checkpointed.llm.activation_checkpointing
    grads = []
    for model in (reference, checkpointed):
        model.set_stage(Stage.FINETUNE)
        loss_sum, _ = model.loss_terms(input_ids, images, labels)
        loss_sum.backward()
        grads.append(model.llm.decoder.layers[0].mlp.linear_fc1.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_a_plain_pretraining_model_exports_without_a_chat_template(trained: Path, tmp_path: Path, settings,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    from neva_core.llava import export_llava

    plain = save_trained_model(tmp_path / "plain", llm=trained / "llm", projector=load_trained_model(trained).projector,
                               vision_dir=trained / "vision", tokenizer_dir=trained / "tokenizer",
                               settings=dataclasses.replace(settings, template="plain"))
    with caplog.at_level("WARNING"):
        out = export_llava(plain, tmp_path / "plain-hf")
    assert "without a chat template" in caplog.text
    assert not (out / "chat_template.jinja").exists() and (out / "model.safetensors").is_file()
