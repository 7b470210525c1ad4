"""The synthetic fixtures: determinism, LLaVA-shaped layout, captions that match the pixels, loadable models."""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neva_core import cli
from neva_core.errors import NevaError
from neva_core.fixtures import Fixtures, load_fixtures, make_fixtures, write_tiny_llama
from neva_core.fixtures.datasets import PRETRAIN_INSTRUCTIONS, conversation_text
from neva_core.fixtures.images import COLOURS, SHAPES, caption_for, draw_shape_image
from neva_core.fixtures.models import TOKENIZER_VOCAB_SIZE

SEED_DEPENDENT = (
    "pretrain/images.zip",
    "pretrain/blip_laion_cc_sbu_558k.json",
    "pretrain/heldout.json",
    "instruct/images.zip",
    "instruct/llava_instruct.json",
    "models/tiny-llama/model.safetensors",
    "models/tiny-clip/model.safetensors",
)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_fixtures(fixtures: Fixtures, dest: Path) -> Fixtures:
    shutil.copytree(fixtures.root, dest)
    return Fixtures.at(dest)


def classify(image: Image.Image) -> tuple[str, str]:
    """The colour and shape seen in an image: the saturated pixels (the background is grey), their mean colour
    and how much of their bounding box they fill (square ~1, circle ~pi/4, triangle ~1/2)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = pixels.max(axis=2) - pixels.min(axis=2) > 60
    mean = pixels[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda name: np.linalg.norm(mean - np.array(COLOURS[name])))
    rows, cols = np.nonzero(mask)
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return colour, shape


def zip_images(path: Path) -> dict[str, Image.Image]:
    with zipfile.ZipFile(path) as archive:
        return {
            name: Image.open(io.BytesIO(archive.read(name)))
            for name in archive.namelist()
            if not name.endswith("/")
        }


def test_same_seed_gives_identical_bytes_and_another_seed_differs(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    again = make_fixtures(tmp_path / "again", seed=0)
    assert all_files(again.root) == all_files(neva_fixtures.root)

    other = all_files(make_fixtures(tmp_path / "other", seed=1).root)
    reference = all_files(neva_fixtures.root)
    for name in SEED_DEPENDENT:
        assert other[name] != reference[name], name
    # the tokenizer is trained on the fixed wording of the fixtures, not on the sampled records
    assert other["tokenizer/tokenizer.model"] == reference["tokenizer/tokenizer.model"]


def test_index_lists_every_file_with_counts(neva_fixtures: Fixtures) -> None:
    index = json.loads(neva_fixtures.index.read_text())
    assert index["seed"] == 0 and index["images"] == 64 and index["image_size"] == 64
    assert index["counts"] == {
        "pretrain": 64, "heldout": 16, "instruct": 64, "instruct_images": 56, "instruct_text_only": 8,
    }
    on_disk = {name for name in all_files(neva_fixtures.root) if name != "fixtures.json"}
    assert set(index["files"]) == on_disk
    assert index["paths"]["llm_dir"] == "models/tiny-llama"
    assert index["tokenizer_vocab_size"] == TOKENIZER_VOCAB_SIZE
    assert load_fixtures(neva_fixtures.root) == neva_fixtures


def test_rerun_into_complete_folder_writes_nothing(neva_fixtures: Fixtures) -> None:
    before = {p: p.stat().st_mtime_ns for p in neva_fixtures.root.rglob("*")}
    assert make_fixtures(neva_fixtures.root, seed=0) == neva_fixtures
    assert {p: p.stat().st_mtime_ns for p in neva_fixtures.root.rglob("*")} == before


def test_killed_run_is_redone(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    fixtures = copy_fixtures(neva_fixtures, tmp_path / "fx")
    fixtures.index.unlink()  # a run killed before its last write
    fixtures.pretrain_json.write_text("[")  # damaged
    shutil.rmtree(fixtures.vision_dir)
    (fixtures.root / "models" / ".tiny-llama.tmp-123-abcdef12").mkdir()  # a killed run's temporary folder
    make_fixtures(fixtures.root, seed=0)
    rebuilt = {k: v for k, v in all_files(fixtures.root).items() if ".tmp-" not in k}
    assert rebuilt == all_files(neva_fixtures.root)


def test_damaged_file_in_complete_folder_is_rebuilt(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    fixtures = copy_fixtures(neva_fixtures, tmp_path / "fx")
    (fixtures.llm_dir / "config.json").write_text("{}")
    make_fixtures(fixtures.root, seed=0)
    assert all_files(fixtures.root) == all_files(neva_fixtures.root)


def test_other_parameters_into_complete_folder_are_refused(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    fixtures = copy_fixtures(neva_fixtures, tmp_path / "fx")
    with pytest.raises(NevaError, match="seed"):
        make_fixtures(fixtures.root, seed=1)
    assert all_files(fixtures.root) == all_files(neva_fixtures.root)


@pytest.mark.parametrize("kwargs", [{"images": 0}, {"image_size": 40}, {"image_size": 0}])
def test_bad_parameters_are_clear_errors(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(NevaError, match="images|image-size"):
        make_fixtures(tmp_path / "fx", **kwargs)
    assert not (tmp_path / "fx").exists()


def test_pretrain_zip_has_llava_layout(neva_fixtures: Fixtures) -> None:
    with zipfile.ZipFile(neva_fixtures.pretrain_zip) as archive:
        infos = archive.infolist()
    folders = {i.filename for i in infos if i.is_dir()}
    files = [i.filename for i in infos if not i.is_dir()]
    assert len(files) == 64 + 16 and len(folders) > 1
    assert all(re.fullmatch(r"\d{5}/", name) for name in folders)  # no root folder above NNNNN/
    for name in files:
        match = re.fullmatch(r"(\d{5})/(\d{9})\.jpg", name)
        assert match and match.group(2).startswith(match.group(1)), name
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}

    training = json.loads(neva_fixtures.pretrain_json.read_text())
    heldout = json.loads(neva_fixtures.heldout_json.read_text())
    assert len(training) == 64 and len(heldout) == 16
    assert {r["image"] for r in training} | {r["image"] for r in heldout} == set(files)
    assert not {r["id"] for r in training} & {r["id"] for r in heldout}


def test_instruct_zip_is_flat_with_coco_names(neva_fixtures: Fixtures) -> None:
    with zipfile.ZipFile(neva_fixtures.instruct_zip) as archive:
        names = archive.namelist()
    assert all(re.fullmatch(r"\d{12}\.jpg", name) for name in names)
    records = json.loads(neva_fixtures.instruct_json.read_text())
    assert {r["image"] for r in records if "image" in r} == set(names)


def test_captions_and_answers_match_the_drawn_pixels(neva_fixtures: Fixtures) -> None:
    images = zip_images(neva_fixtures.pretrain_zip)
    records = json.loads(neva_fixtures.pretrain_json.read_text()) + json.loads(neva_fixtures.heldout_json.read_text())
    assert {r["conversations"][1]["value"] for r in records} == {caption_for(c, s) for c in COLOURS for s in SHAPES}
    for record in records:
        image = images[record["image"]]
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
        assert caption_for(*classify(image)) == record["conversations"][1]["value"], record["id"]

    instruct_images = zip_images(neva_fixtures.instruct_zip)
    for record in json.loads(neva_fixtures.instruct_json.read_text()):
        if "image" not in record:
            continue
        colour, shape = classify(instruct_images[record["image"]])
        answers = {turn["value"] for turn in record["conversations"][1::2]}
        assert answers <= {colour, shape, caption_for(colour, shape)}, record["id"]


def test_draw_shape_image_parameters() -> None:
    image = draw_shape_image(np.random.default_rng(3), "yellow", "triangle", size=128)
    assert image.size == (128, 128) and classify(image) == ("yellow", "triangle")
    with pytest.raises(NevaError, match="purple"):
        draw_shape_image(np.random.default_rng(0), "purple", "circle")
    with pytest.raises(NevaError, match="too small"):
        draw_shape_image(np.random.default_rng(0), "red", "circle", size=8)


def test_pretrain_records_are_llava_shaped(neva_fixtures: Fixtures) -> None:
    records = json.loads(neva_fixtures.pretrain_json.read_text())
    positions = set()
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert re.fullmatch(r"\d{9}", record["id"]) and record["image"] == f"{record['id'][:5]}/{record['id']}.jpg"
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count("<image>") == 1
        if human["value"].startswith("<image>\n"):
            positions.add("before")
            instruction = human["value"].removeprefix("<image>\n")
        else:
            positions.add("after")
            instruction = human["value"].removesuffix("\n<image>")
        assert instruction in PRETRAIN_INSTRUCTIONS
    assert positions == {"before", "after"}
    assert len({r["conversations"][0]["value"] for r in records}) > 8  # varied instructions


def test_instruct_records_are_multi_turn_with_text_only_ones(neva_fixtures: Fixtures) -> None:
    records = json.loads(neva_fixtures.instruct_json.read_text())
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == 8
    assert max(len(r["conversations"]) for r in records) >= 4
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        image_turns = [i for i, t in enumerate(turns) if "<image>" in t["value"]]
        assert image_turns == ([] if record in text_only else [0]), record["id"]
        if "image" in record:
            assert record["image"] == f"{record['id']}.jpg"


def test_tiny_llama_loads_and_runs(neva_fixtures: Fixtures) -> None:
    import sentencepiece
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(neva_fixtures.llm_dir)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == TOKENIZER_VOCAB_SIZE and not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)

    processor = sentencepiece.SentencePieceProcessor(model_file=str(neva_fixtures.llm_dir / "tokenizer.model"))
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    assert processor.vocab_size() == TOKENIZER_VOCAB_SIZE
    assert processor.id_to_piece(3) == "<0x00>"  # byte fallback pieces, like LLaMA's
    text = "Describe the image concisely.\na red circle"
    ids = AutoTokenizer.from_pretrained(neva_fixtures.llm_dir)(text).input_ids
    assert ids == processor.encode(text, add_bos=True)

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), TOKENIZER_VOCAB_SIZE) and torch.isfinite(logits).all()


def test_tiny_llama_has_learned_the_fixture_language(neva_fixtures: Fixtures) -> None:
    """The LLM that pretraining freezes knows the fixture text: the written records (drawn apart from its own
    training text) read at a low loss, where a random LLaMA of this shape reads at about ln(vocab); and after
    a pretraining instruction it goes on with a caption of the fixture classes."""
    import math

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(neva_fixtures.llm_dir)
    model = LlamaForCausalLM.from_pretrained(neva_fixtures.llm_dir).eval()
    records = json.loads(neva_fixtures.instruct_json.read_text())
    with torch.no_grad():
        losses = [model(ids, labels=ids).loss.item() for ids in
                  (tokenizer(conversation_text(record), return_tensors="pt").input_ids for record in records)]
    assert sum(losses) / len(losses) < 0.25 * math.log(TOKENIZER_VOCAB_SIZE)
    captions = [caption_for(colour, shape) for colour in COLOURS for shape in SHAPES]
    for instruction in PRETRAIN_INSTRUCTIONS[:3]:
        ids = tokenizer(f"{instruction}\n", return_tensors="pt").input_ids
        with torch.no_grad():
            answer = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        text = tokenizer.decode(answer, skip_special_tokens=True)
        assert any(text.startswith(caption) for caption in captions), (instruction, text)


def test_write_tiny_llama_accepts_architecture_overrides(neva_fixtures: Fixtures, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    out = write_tiny_llama(tmp_path / "mha", 300, seed=5, num_key_value_heads=4, tie_word_embeddings=True)
    config = LlamaConfig.from_pretrained(out)
    assert (config.num_key_value_heads, config.tie_word_embeddings, config.vocab_size) == (4, True, 300)
    assert not (out / "tokenizer.model").exists()
    with pytest.raises(NevaError, match="already exists"):
        write_tiny_llama(out, 300, seed=5)


def test_tiny_clip_loads_and_runs_on_a_fixture_image(neva_fixtures: Fixtures) -> None:
    import torch
    from transformers import AutoImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(neva_fixtures.vision_dir)
    processor = AutoImageProcessor.from_pretrained(neva_fixtures.vision_dir)
    assert list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(processor.image_std) == [0.26862954, 0.26130258, 0.27577711]
    image = next(iter(zip_images(neva_fixtures.pretrain_zip).values()))
    pixels = processor(images=image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 64, 64)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and hidden[-2].shape == (1, 1 + 16, 64)  # CLS + (64/16)^2 patches


def test_cli_help_and_run(neva_fixtures: Fixtures, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fixtures", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--seed", "--images", "--image-size", "OUT_DIR"):
        assert option in help_text

    fixtures = copy_fixtures(neva_fixtures, tmp_path / "fx")
    assert cli.main(["fixtures", str(fixtures.root), "--seed", "0", "--images", "64"]) == 0
    assert str(fixtures.index) in capsys.readouterr().out

    assert cli.main(["fixtures", str(tmp_path / "bad"), "--image-size", "30"]) == 2
    assert "--image-size" in capsys.readouterr().err
