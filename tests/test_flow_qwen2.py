"""The `neva` flow with a Qwen2 LLM, whose tokenizer is a tokenizer.json (no tokenizer.model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.neva import neva
from neva_core.checkpoint.layout import load_native_rank, read_native_config
from neva_core.config import DatasetConfig, ModelConfig, PipelineConfig
from neva_core.fixtures import Fixtures

pytestmark = pytest.mark.slow


def test_flow_extends_a_fast_tokenizer_and_grows_the_vocabulary(neva_fixtures: Fixtures, qwen2_dir: Path,
                                                                tmp_path: Path) -> None:
    config = PipelineConfig(
        workdir=tmp_path / "work",
        dataset=DatasetConfig(name="fixture", json_source=str(neva_fixtures.pretrain_json),
                              images_source=str(neva_fixtures.pretrain_zip), maxcount=64, workers=1),
        model=ModelConfig(llm_source=str(qwen2_dir), vision_source=str(neva_fixtures.vision_dir), tp=2,
                          dtype="fp32"),
        train=None,  # the data and checkpoint stages only
    )
    state = neva(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()

    model_root = tmp_path / "work" / "checkpoints" / "tiny-qwen2"
    (hf_dir,) = model_root.glob("hf-*")
    assert sorted(p.name for p in hf_dir.iterdir() if p.suffix != ".json") == [".neva-download", "model.safetensors"]
    tokenizer = result["tokenizer"]
    tokenizer_dir = Path(tokenizer["out_dir"])
    assert tokenizer_dir.parent == model_root and tokenizer_dir.name.startswith("tokenizer-")
    assert tokenizer["kind"] == "hf-fast" and tokenizer["tokenizer_file"] == str(tokenizer_dir / "tokenizer.json")
    assert (tokenizer["old_vocab_size"], tokenizer["vocab_size"]) == (403, 411)
    roles = json.loads((tokenizer_dir / "extension.json").read_text())["roles"]
    assert roles["image_patch"] == "<extra_id_3>" and tokenizer["added"]["<extra_id_3>"] == 406

    native = Path(result["llm"]["path"])
    assert native.parent == model_root and native.name.startswith("native-tpn-")
    llm_config, meta = read_native_config(native)
    assert (llm_config.family, meta["tp"], llm_config.vocab_size) == ("qwen2", 2, 411)
    rank0 = load_native_rank(native, 0)
    assert rank0["embedding.word_embeddings.weight"].shape == (llm_config.padded_vocab_size // 2,
                                                               llm_config.hidden_size)
    assert Path(result["vision"]["dest"], "model.safetensors").is_file()
