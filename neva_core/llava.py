"""Hugging Face LLaVA interop: export a trained-model folder as a `LlavaForConditionalGeneration` folder,
and import LLaVA weights (an `llava-hf/*` folder, or LLaVA's `mm_projector.bin`) into a trained-model folder.

The export holds what `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
read: config.json (LlavaConfig: CLIP vision config, the LLM's HF config, image token, feature layer),
safetensors weights under the names LLaVA's converter and the `llava-hf` repos use (TP merged, vocabulary
padding trimmed, streamed one tensor at a time like the LLM-only export), and the processor files
(image processor config, tokenizer, `processor_config.json` with the image token and patch size, and a
chat template that renders the prompt the model was trained with).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from neva_core.checkpoint.hf import DTYPES, hf_config_from_llm, hf_tensor_shapes
from neva_core.checkpoint.layout import NativeReader, Provenance, read_native_config, save_native, verify_native
from neva_core.checkpoint.safetensors_stream import SafetensorsReader, TensorSpec, prefetched
from neva_core.errors import NevaError
from neva_core.export import DEFAULT_MAX_SHARD_BYTES, write_hf_weights
from neva_core.io import (
    atomic_dir,
    file_entry,
    read_manifest,
    remove_stale_temps,
    sha256_file,
    verify_files,
    write_json_atomic,
    write_manifest,
)
from neva_core.model.llava_hf import FILE_PREFIXES, hf_llm_file_tensors, llava_parts
from neva_core.model.projector import hf_projector_activation, hf_projector_tensors, projector_type_of
from neva_core.model.trained import (
    LLM_DIR,
    PROJECTOR_FILE,
    TOKENIZER_DIR,
    VISION_DIR,
    TrainedModelConfig,
    read_projector,
    read_trained_config,
    save_trained_model,
)
from neva_core.model.vision import read_vision_config, read_vision_weights, vision_tensors

log = logging.getLogger(__name__)

EXPORT_FORMAT = "neva-llava-export"
IMPORT_FORMAT_NOTE = "imported from HF LLaVA"

# ---------------------------------------------------------------------------------------------
# Chat templates: the finetune prompt of each training template as a transformers chat template.
# Messages are {"role": "system"|"user"|"assistant", "content": str | [{"type": "image"}, {"type": "text", ...}]};
# an image item renders as the processor's image token (expanded to n copies by the processor).

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

_CONTENT_MACRO = (
    "{%- macro render(content, image_token, with_text) -%}"
    "{%- if content is string -%}{%- if with_text -%}{{ content }}{%- endif -%}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{ image_token }}{%- endfor -%}"
    "{%- if with_text -%}{%- for item in content if item['type'] == 'text' -%}"
    "{%- if loop.first and content | selectattr('type', 'equalto', 'image') | list -%}{{ '\\n' }}{%- endif -%}"
    "{{ item['text'] }}{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)


def hf_chat_template(template: str, image_token: str) -> str:
    """A Jinja chat template that renders `template`'s prompt (the literal LLaVA strings).

    vicuna_v1: "{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:" (the generation
    prompt ends at "ASSISTANT:"). plain: the image tokens, then the caption and "\\n" (user text dropped).
    The BOS token is left to the tokenizer, which adds it as in training.
    """
    token = json.dumps(image_token)
    if template == "vicuna_v1":
        return (
            _CONTENT_MACRO
            + "{%- set ns = namespace(system=" + json.dumps(VICUNA_V1_SYSTEM) + ") -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] if messages[0]['content'] is string "
            "else messages[0]['content'][0]['text'] -%}{%- endif -%}"
            "{{ ns.system }}"
            "{%- for message in messages if message['role'] != 'system' -%}"
            "{%- if message['role'] == 'user' -%}{{ ' USER: ' if loop.first else 'USER: ' }}"
            "{{ render(message['content'], " + token + ", true) }}"
            "{%- else -%}{{ ' ASSISTANT: ' }}{{ render(message['content'], " + token + ", true) }}{{ '</s>' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
        )
    if template == "plain":
        return (
            _CONTENT_MACRO
            + "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{ render(message['content'], " + token + ", false) }}"
            "{%- elif message['role'] == 'assistant' -%}{{ render(message['content'], " + token + ", true) }}{{ '\\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )
    raise NevaError(f"no chat template for the {template!r} prompt template yet; supported: vicuna_v1, plain")


# ---------------------------------------------------------------------------------------------
# Export


def export_llava(in_dir: Path | str, out_dir: Path | str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the trained-model folder `in_dir` as an HF LLaVA folder `out_dir`; return it.

    The same export already at `out_dir` is reused; anything else there is refused.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if max_shard_bytes <= 0:
        raise NevaError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    folder, settings, _ = read_trained_config(in_dir, deep=True)
    parent = {"path": str(folder.resolve()), "manifest_sha256": sha256_file(folder / "manifest.json")}
    if _finished_export(out_dir, parent["manifest_sha256"]):
        return out_dir
    vision_dir = folder / VISION_DIR
    vision_config = read_vision_config(vision_dir)
    vision = {FILE_PREFIXES["vision"] + name: t for name, t in read_vision_weights(vision_dir).items()}
    projector = {FILE_PREFIXES["projector"] + name: t for name, t in
                 hf_projector_tensors(settings.projector_type, read_projector(folder / PROJECTOR_FILE)).items()}
    remove_stale_temps(out_dir.parent, out_dir.name)
    with NativeReader(folder / LLM_DIR, deep=True) as reader:
        dtype = DTYPES[reader.dtype]
        llm_specs = [TensorSpec(FILE_PREFIXES["llm"] + name, dtype, shape)
                     for name, shape in hf_tensor_shapes(reader.config).items()]
        extra_specs = [TensorSpec(name, dtype, tuple(t.shape)) for name, t in {**vision, **projector}.items()]
        config = _llava_config(settings, reader, vision_config)
        log.info("exporting %s -> %s (LlavaForConditionalGeneration, %s)", folder, out_dir, reader.dtype)
        with atomic_dir(out_dir) as tmp:
            tensors = _export_tensors(reader, {**vision, **projector}, dtype)
            files = write_hf_weights(tmp, llm_specs + extra_specs, prefetched(tensors), max_shard_bytes)
            write_json_atomic(tmp / "config.json", config)
            processor_files = _write_processor(tmp, folder, settings)
            files.update({name: file_entry(tmp / name) for name in ["config.json", *processor_files]})
            write_manifest(tmp, {"format": EXPORT_FORMAT, "parent": parent, "files": files})
    return out_dir


def _export_tensors(reader: NativeReader, extra: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, full in reader.full_tensors():
        yield from hf_llm_file_tensors(name, full, reader.config)
    for name, tensor in extra.items():
        yield name, tensor.to(dtype).contiguous()


def _llava_config(settings: TrainedModelConfig, reader: NativeReader, vision_config: Any) -> dict[str, Any]:
    text = hf_config_from_llm(reader.config, reader.dtype, base=reader.meta.get("hf_config"))
    vision = {k: v for k, v in vision_config.to_dict().items() if k not in ("transformers_version",)}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": {**vision, "model_type": "clip_vision_model"},
        "image_token_index": settings.image_token_id,
        "image_seq_length": settings.image_tokens,
        "projector_hidden_act": hf_projector_activation(settings.projector_type),
        "multimodal_projector_bias": True,
        "vision_feature_layer": settings.vision_select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": reader.config.tie_embeddings,
        "dtype": text["dtype"],
        "torch_dtype": text["dtype"],
    }


def _write_processor(dest: Path, folder: Path, settings: TrainedModelConfig) -> list[str]:
    """Save a LlavaProcessor (image processor, tokenizer, image token, chat template) into `dest`;
    return the names of the files written."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    image_token = image_token_string(tokenizer, settings.image_token_id, folder / TOKENIZER_DIR)
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder / VISION_DIR),
        tokenizer=tokenizer,
        patch_size=settings.patch_size,
        vision_feature_select_strategy="default",
        chat_template=hf_chat_template(settings.template, image_token),
        image_token=image_token,
        num_additional_image_tokens=1,  # the CLS token, which the "default" strategy drops again
    )
    before = {p.name for p in dest.iterdir()}
    with tempfile.TemporaryDirectory(dir=dest) as staging:
        processor.save_pretrained(staging)
        written = sorted(p.name for p in Path(staging).iterdir())
        for name in written:
            shutil.move(str(Path(staging) / name), dest / name)
    if before & set(written):
        raise NevaError(f"the processor files {sorted(before & set(written))} clash with the model files")
    return written


def image_token_string(tokenizer: Any, image_token_id: int, tokenizer_dir: Path) -> str:
    """The image token's text, checked to tokenize as exactly one id per copy."""
    token = tokenizer.convert_ids_to_tokens(image_token_id)
    if token is None or tokenizer.tokenize(token * 3).count(token) != 3:
        raise NevaError(
            f"token id {image_token_id} of {tokenizer_dir} is not a single added token ({token!r}); "
            f"the image token must be the tokenizer's image_patch role token"
        )
    return token


def _finished_export(out_dir: Path, parent_manifest_sha256: str) -> bool:
    if not out_dir.exists():
        return False
    manifest = read_manifest(out_dir)
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("parent", {}).get("manifest_sha256") != parent_manifest_sha256:
        raise NevaError(f"{out_dir} already exists and is not an export of this trained model; "
                        f"delete it or choose another output folder")
    verify_files(out_dir, manifest["files"], check_hash=False)
    log.info("%s already holds this export; nothing to do", out_dir)
    return True
