"""Hugging Face LLaVA interop: export a trained-model folder as a `LlavaForConditionalGeneration` folder,
and import LLaVA weights (an `llava-hf/*` folder, or LLaVA's `mm_projector.bin`) into a trained-model folder.

The export holds what `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
read: config.json (LlavaConfig: CLIP vision config, the LLM's HF config, image token, feature layer),
safetensors weights under the names LLaVA's converter and the `llava-hf` repos use (TP merged, vocabulary
padding trimmed, streamed one tensor at a time like the LLM-only export), and the processor files
(image processor config, tokenizer, `processor_config.json` with the image token and patch size, and the
prompt templates' chat template, which renders the prompt the model was trained with).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from neva_core.checkpoint.convert import HFCheckpointReader, source_dtype
from neva_core.checkpoint.hf import DTYPES, hf_config_from_llm, hf_tensor_shapes
from neva_core.checkpoint.layout import (
    NativeReader,
    Provenance,
    read_native_config,
    save_native,
    verify_native,
)
from neva_core.checkpoint.safetensors_stream import (
    SafetensorsReader,
    StreamingWriter,
    TensorSpec,
    prefetched,
)
from neva_core.data.templates import chat_template
from neva_core.data.text_tokenizer import load_text_tokenizer
from neva_core.errors import NevaError
from neva_core.export import DEFAULT_MAX_SHARD_BYTES, write_hf_weights
from neva_core.io import (
    atomic_dir,
    file_entry,
    read_manifest,
    remove_stale_temps,
    sha256_file,
    temp_name,
    verify_files,
    write_json_atomic,
    write_manifest,
)
from neva_core.model.llava_hf import (
    FILE_PREFIXES,
    LlavaParts,
    hf_llm_file_tensors,
    llava_parts,
)
from neva_core.model.neva import NevaModel
from neva_core.model.parallel import TPGroup
from neva_core.model.projector import (
    hf_projector_activation,
    hf_projector_tensors,
    projector_type_of,
)
from neva_core.model.trained import (
    LLM_DIR,
    PROJECTOR_FILE,
    TOKENIZER_DIR,
    VISION_DIR,
    TrainedModelConfig,
    assemble_model,
    build_llm,
    rank_tensors_from_full,
    read_projector,
    read_trained_config,
    save_trained_model,
)
from neva_core.model.vision import (
    VisionTower,
    read_bin,
    read_vision_config,
    read_vision_weights,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT = "neva-llava-export"

# ---------------------------------------------------------------------------------------------
# Export


def export_llava(in_dir: Path | str, out_dir: Path | str, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the trained-model folder `in_dir` as an HF LLaVA folder `out_dir`; return it.

    The chat template is the prompt templates' own (`neva_core.data.templates.chat_template`), which
    reproduces the training prompt's ids. A `plain` (pretraining) model with a sentencepiece tokenizer
    has none (no text gives its prompt, see there): it is exported without one, with a warning.
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
    template = _chat_template(settings, folder / TOKENIZER_DIR)
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder / VISION_DIR),
        tokenizer=tokenizer,
        patch_size=settings.patch_size,
        vision_feature_select_strategy="default",
        chat_template=template,
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


def _chat_template(settings: TrainedModelConfig, tokenizer_dir: Path) -> str | None:
    text_tokenizer = load_text_tokenizer(tokenizer_dir)
    if text_tokenizer.image_token_id != settings.image_token_id:
        raise NevaError(
            f"the model's image token id is {settings.image_token_id}, but the image_patch token of "
            f"{tokenizer_dir} is id {text_tokenizer.image_token_id}; the tokenizer does not belong to this model"
        )
    try:
        return chat_template(settings.template, text_tokenizer)
    except NevaError as exc:
        if settings.template != "plain":
            raise
        log.warning("exporting without a chat template: %s", exc)
        return None


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


# ---------------------------------------------------------------------------------------------
# Import


def model_from_llava_state(state: Mapping[str, torch.Tensor], llava_config: Mapping[str, Any], *,
                           template: str, tp_group: TPGroup = None, source: str = "the LLaVA weights") -> NevaModel:
    """A NevaModel (this rank of `tp_group`) holding an in-memory HF LLaVA model's weights."""
    parts = llava_parts(state, llava_config, source)
    llm = build_llm(parts.llm_config, rank_tensors_from_full(parts.llm_tensors(), parts.llm_config, tp_group), tp_group)
    vision = VisionTower.from_state(parts.vision_config, parts.vision_tensors, parts.vision_select_layer,
                                    source=source)
    settings = TrainedModelConfig(family=parts.llm_config.family, template=template,
                                  projector_type=parts.projector_type, image_size=vision.image_size,
                                  patch_size=vision.patch_size, image_token_id=parts.image_token_id,
                                  vision_select_layer=parts.vision_select_layer)
    return assemble_model(llm, vision, settings, parts.projector_tensors)


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")
_MM_PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")


class _CheckpointTensors(Mapping[str, torch.Tensor]):
    """An HF checkpoint folder as a mapping whose tensors are read from disk when looked up."""

    def __init__(self, reader: HFCheckpointReader) -> None:
        self._reader, self._names = reader, reader.names()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._reader.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def import_llava_hf(hf_dir: Path | str, out_dir: Path | str, *, template: str) -> Path:
    """An `llava-hf/*`-style folder (LlavaForConditionalGeneration) as a trained-model folder `out_dir`.

    `template` is the prompt template the model was finetuned with (LLaVA-1.5: vicuna_v1). The LLM is
    streamed tensor by tensor into its native rank file, in the checkpoint's dtype.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise NevaError(f"{hf_dir} has no config.json; pass an HF LLaVA model folder")
    if out_dir.exists():
        raise NevaError(f"{out_dir} already exists; remove it or choose another output path")
    llava_config = json.loads(config_path.read_text())
    tokenizer_files = [name for name in _TOKENIZER_FILES if (hf_dir / name).is_file()]
    if not {"tokenizer.model", "tokenizer.json"} & set(tokenizer_files):
        raise NevaError(f"{hf_dir} holds no tokenizer (tokenizer.model or tokenizer.json)")
    image_processor = _image_processor_config(hf_dir)
    with HFCheckpointReader(hf_dir) as reader:
        parts = llava_parts(_CheckpointTensors(reader), llava_config, str(hf_dir))
        dtype = source_dtype(llava_config, _RenamedReader(reader, parts))
        settings = TrainedModelConfig(
            family=parts.llm_config.family, template=template, projector_type=parts.projector_type,
            image_size=parts.vision_config.image_size, patch_size=parts.vision_config.patch_size,
            image_token_id=parts.image_token_id, vision_select_layer=parts.vision_select_layer,
        )
        staging_name = f"{out_dir.name}-import"
        remove_stale_temps(out_dir.parent, staging_name)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging_dir = temp_name(out_dir.with_name(staging_name))  # beside out_dir, so the files hard-link
        staging_dir.mkdir()
        try:
            save_native(staging_dir / LLM_DIR, parts.llm_config, tp=1, dtype=dtype,
                        provenance=Provenance(source={"llava_hf": str(hf_dir.resolve())},
                                              original_vocab_size=parts.llm_config.vocab_size,
                                              hf_config=llava_config["text_config"]),
                        tensors=((name, t.to(DTYPES[dtype])) for name, t in parts.llm_tensors()),
                        wanted={"tp": 1, "dtype": dtype})
            vision_dir = staging_dir / VISION_DIR
            _write_vision_folder(vision_dir, parts.vision_config, parts.vision_tensors, image_processor)
            tokenizer_dir = staging_dir / TOKENIZER_DIR
            tokenizer_dir.mkdir()
            for name in tokenizer_files:
                shutil.copy2(hf_dir / name, tokenizer_dir / name)
            return save_trained_model(out_dir, llm=staging_dir / LLM_DIR, projector=parts.projector_tensors,
                                      vision_dir=vision_dir, tokenizer_dir=tokenizer_dir, settings=settings,
                                      dtype=dtype, provenance={"imported_from": str(hf_dir.resolve())})
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)


class _RenamedReader:
    """`spec` of the LLM's causal-LM names, for `source_dtype` when config.json declares no dtype."""

    def __init__(self, reader: HFCheckpointReader, parts: LlavaParts) -> None:
        self._reader, self._names = reader, parts.llm_hf.source_names

    def spec(self, name: str) -> TensorSpec:
        return self._reader.spec(self._names[name])


def import_mm_projector(
    projector_file: Path | str,
    out_dir: Path | str,
    *,
    llm_dir: Path | str,
    vision_dir: Path | str,
    tokenizer_dir: Path | str,
    template: str,
    image_token_id: int,
    vision_select_layer: int = -2,
) -> Path:
    """LLaVA's pretrained `mm_projector.bin` with a native LLM, a CLIP folder and a tokenizer, as a
    trained-model folder: the starting point of a finetune (`train --init`)."""
    projector_file, llm_dir, vision_dir = Path(projector_file), Path(llm_dir), Path(vision_dir)
    state = read_bin(projector_file) if projector_file.suffix == ".bin" else _read_safetensors_file(projector_file)
    projector: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix = next((p for p in _MM_PROJECTOR_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            raise NevaError(f"{projector_file}: tensor {name!r} is not a LLaVA mm_projector tensor")
        projector[name[len(prefix):]] = tensor
    projector_type = projector_type_of(projector, str(projector_file))
    verify_native(llm_dir, deep=False)
    llm_config = read_native_config(llm_dir)[0]
    vision_config = read_vision_config(vision_dir)
    first = projector["weight" if projector_type == "linear" else "0.weight"]
    last = projector["weight" if projector_type == "linear" else "2.weight"]
    if first.shape[1] != vision_config.hidden_size or last.shape[0] != llm_config.hidden_size:
        raise NevaError(
            f"{projector_file} maps {first.shape[1]} -> {last.shape[0]} features; {vision_dir} gives "
            f"{vision_config.hidden_size} and {llm_dir} takes {llm_config.hidden_size}: a projector from another model pair"
        )
    settings = TrainedModelConfig(
        family=llm_config.family, template=template, projector_type=projector_type,
        image_size=vision_config.image_size, patch_size=vision_config.patch_size, image_token_id=image_token_id,
        vision_select_layer=vision_select_layer,
    )
    return save_trained_model(out_dir, llm=llm_dir, projector=projector, vision_dir=vision_dir,
                              tokenizer_dir=tokenizer_dir, settings=settings,
                              provenance={"mm_projector": str(projector_file.resolve())})


def _read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NevaError(f"{path} does not exist")
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.names()}


def _image_processor_config(hf_dir: Path) -> dict[str, Any]:
    """The CLIP image processor settings: preprocessor_config.json, or (transformers 5) processor_config.json's
    `image_processor` entry."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (hf_dir / name).is_file():
            document = json.loads((hf_dir / name).read_text())
            found = document if key is None else document.get(key)
            if found:
                return found
    raise NevaError(f"{hf_dir} has no image processor settings (preprocessor_config.json or processor_config.json)")


def _write_vision_folder(dest: Path, vision_config: Any, tensors: dict[str, torch.Tensor],
                         image_processor: dict[str, Any]) -> None:
    """A CLIPVisionModel folder: config.json, model.safetensors (`vision_model.` names, which every
    transformers release reads), preprocessor_config.json."""
    dest.mkdir(parents=True)
    config = {k: v for k, v in vision_config.to_dict().items() if k != "transformers_version"}
    write_json_atomic(dest / "config.json", {**config, "model_type": "clip_vision_model",
                                             "architectures": ["CLIPVisionModel"]})
    named = {f"vision_model.{name}": t.contiguous() for name, t in tensors.items()}
    with StreamingWriter(dest / "model.safetensors", [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in named.items()],
                         {"format": "pt"}) as writer:
        for name, tensor in named.items():
            writer.write(name, tensor)
    write_json_atomic(dest / "preprocessor_config.json", image_processor)


def image_patch_token_id(tokenizer_dir: Path | str) -> int:
    """The id of the image_patch role token, from the `extension.json` that `neva tokenizer extend` wrote."""
    from neva_core.tokenizer import NEVA_TOKEN_ROLES

    path = Path(tokenizer_dir) / "extension.json"
    if not path.is_file():
        raise NevaError(f"{tokenizer_dir} has no extension.json (not extended by `neva tokenizer extend`); "
                        f"pass the image token's id explicitly")
    extension = json.loads(path.read_text())
    token = extension.get("roles", NEVA_TOKEN_ROLES)["image_patch"]
    ids = {**extension.get("already_present", {}), **extension.get("added", {})}
    if token not in ids:
        raise NevaError(f"{path} does not list the image_patch token {token!r}; pass the image token's id explicitly")
    return int(ids[token])
