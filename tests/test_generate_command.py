"""`neva generate` on a trained-model folder built from the fixtures (random projector) against transformers'
LlavaForConditionalGeneration.generate on the same model exported by `neva export`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.cli import main
from neva_core.data.preprocess import ImageProcessor
from neva_core.data.templates import build_generation_prompt
from neva_core.data.text_tokenizer import load_text_tokenizer
from neva_core.fixtures import draw_shape_image
from neva_core.generate import generate_answers
from neva_core.model.projector import build_projector
from neva_core.model.trained import TrainedModelConfig, load_trained_model, save_trained_model

QUESTION = "What is shown?"
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def trained(neva_fixtures, neva_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("generate-model")
    convert_hf_checkpoint(neva_fixtures.llm_dir, root / "native", tokenizer=neva_tokenizer.tokenizer_model, dtype="fp32")
    torch.manual_seed(7)
    settings = TrainedModelConfig(family="llama", template="vicuna_v1", projector_type="mlp2x_gelu", image_size=64,
                                  patch_size=16, image_token_id=neva_tokenizer.added["<extra_id_3>"])
    return save_trained_model(root / "model", llm=root / "native", projector=build_projector("mlp2x_gelu", 64, 64),
                              vision_dir=neva_fixtures.vision_dir, tokenizer_dir=neva_tokenizer.out_dir,
                              settings=settings)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "red-circle.png"
    draw_shape_image(np.random.default_rng(0), "red", "circle", 80).save(path)  # square: `pad` adds nothing
    return path


def hf_export_tokens(trained: Path, image_file: Path, out: Path) -> list[int]:
    """transformers' greedy new tokens for QUESTION on the HF LLaVA export, prompted through the export's
    own chat template and processor, cut before EOS."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from neva_core.llava import export_llava

    export_llava(trained, out)
    hf_model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_file).convert("RGB"), text=prompt, return_tensors="pt")
    tokenizer = load_text_tokenizer(trained / "tokenizer")
    # The export reproduces the training prompt; were it not so, the comparison below would mean little.
    assert inputs["input_ids"][0].tolist() == build_generation_prompt("vicuna_v1", QUESTION, tokenizer, 16)
    with torch.no_grad():
        output = hf_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    eos = hf_model.generation_config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_neva_generate_prints_what_the_hf_export_generates(trained: Path, image_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", str(trained), "--image", str(image_file), "--prompt", QUESTION,
            "--max-new-tokens", str(MAX_NEW_TOKENS)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()  # the answer alone: the fixture LLM's may run over several lines
    expected = hf_export_tokens(trained, image_file, tmp_path / "llava")
    assert len(expected) >= 3  # a real continuation, not an immediate EOS
    assert printed == load_text_tokenizer(trained / "tokenizer").decode(expected).strip()


def test_batched_answers_equal_single_answers(trained: Path, image_file: Path, neva_fixtures) -> None:
    model = load_trained_model(trained).eval()
    tokenizer = load_text_tokenizer(trained / "tokenizer")
    processor = ImageProcessor.from_folder(trained / "vision", aspect="pad")
    from PIL import Image

    wide = draw_shape_image(np.random.default_rng(1), "blue", "square", 64).resize((96, 64))
    images = torch.stack([processor(Image.open(image_file).convert("RGB")), processor(wide)])
    questions = [QUESTION, "Describe the picture in detail, please."]  # different prompt lengths
    batched = generate_answers(model, tokenizer, "vicuna_v1", questions, images, MAX_NEW_TOKENS)
    singles = [generate_answers(model, tokenizer, "vicuna_v1", [q], images[i : i + 1], MAX_NEW_TOKENS)[0]
               for i, q in enumerate(questions)]
    assert batched == singles and all(batched)


def test_neva_generate_names_a_missing_image(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.png"
    assert main(["generate", "--model", str(trained), "--image", str(missing), "--prompt", QUESTION]) == 2
    assert f"image {missing} does not exist" in capsys.readouterr().err
