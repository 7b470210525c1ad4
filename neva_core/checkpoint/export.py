"""Export a native checkpoint back to a Hugging Face folder (LlamaForCausalLM / MistralForCausalLM /
Qwen2ForCausalLM): the inverse of `neva convert`.

Streaming, like the converter: each native tensor is merged from the rank files (vocab padding trimmed),
un-fused into its HF tensors and appended to the HF safetensors file that the plan assigns it to
(sharded with an index past `max_shard_bytes`). The HF config.json is rebuilt from the native model
config on top of the source checkpoint's own config.json, so token ids and other settings survive.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from neva_core.checkpoint.hf import DTYPES, from_native, hf_config_from_llm, hf_tensor_shapes
from neva_core.checkpoint.layout import NativeReader
from neva_core.checkpoint.safetensors_stream import (
    StreamingWriter,
    TensorSpec,
    configure_allocator_for_streaming,
    prefetched,
)
from neva_core.errors import NevaError
from neva_core.io import (
    commit_output,
    file_entry,
    read_own_manifest,
    verify_files,
    write_json_atomic,
    write_manifest,
)
from neva_core.model.config import LLMConfig

log = logging.getLogger(__name__)

EXPORT_FORMAT = "neva-hf-export"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the Hub's customary 5 GB shards
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def export_hf(in_dir: Path | str, out_dir: Path | str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the native checkpoint `in_dir` (any TP size) as an HF model folder `out_dir`; return it.

    The input is verified against its manifest while it is read; an export of the same input already at
    `out_dir` is reused, an export of another checkpoint is replaced once the new one is complete, and
    a folder that is no export is refused.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if max_shard_bytes <= 0:
        raise NevaError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    with NativeReader(in_dir, deep=True) as reader:
        parent = {"path": str(in_dir.resolve()), "manifest_sha256": reader.manifest_sha256()}
        config = reader.config
        hf_config = hf_config_from_llm(config, reader.dtype, base=reader.meta.get("hf_config"))
        specs = [TensorSpec(n, DTYPES[reader.dtype], s) for n, s in hf_tensor_shapes(config).items()]

        def build(tmp: Path) -> Path:
            log.info("exporting %s -> %s (%s, %s)", in_dir, out_dir, hf_config["architectures"][0], reader.dtype)
            configure_allocator_for_streaming()
            files = write_hf_weights(tmp, specs, prefetched(_hf_tensors(reader, config)), max_shard_bytes)
            write_json_atomic(tmp / "config.json", hf_config)
            files["config.json"] = file_entry(tmp / "config.json")
            write_manifest(tmp, {"format": EXPORT_FORMAT, "parent": parent, "files": files})
            return out_dir

        return commit_output(out_dir, reuse=lambda found: _finished_export(found, parent["manifest_sha256"]),
                             build=build)


def _hf_tensors(reader: NativeReader, config: LLMConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for name, full in reader.full_tensors():
        yield from from_native(name, full, config)


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into files of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_hf_weights(
    folder: Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> dict[str, dict[str, Any]]:
    """Stream `tensors` (in `specs` order) into HF safetensors files (+ index when sharded); return
    the manifest entries of the files written."""
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    writers: list[StreamingWriter] = []
    try:
        for name, shard in zip(names, shards):
            writers.append(StreamingWriter(folder / name, shard, {"format": "pt"}))
        owner = {spec.name: writer for writer, shard in zip(writers, shards) for spec in shard}
        for name, tensor in tensors:
            if name not in owner:
                raise NevaError(f"tensor {name!r} is not in the export plan")
            owner[name].write(name, tensor)
        files = {writer.path.name: writer.close() for writer in writers}
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    if len(names) > 1:
        weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)}, "weight_map": weight_map}
        write_json_atomic(folder / INDEX_FILE, index)
        files[INDEX_FILE] = file_entry(folder / INDEX_FILE)
    return files


def _finished_export(out_dir: Path, parent_manifest_sha256: str) -> Path | None:
    """`out_dir` if it is a complete export of the same native checkpoint; None if it is an export of
    another one or damaged (it is rebuilt); raise if it is no export at all."""
    manifest = read_own_manifest(out_dir, "a neva export", "format", EXPORT_FORMAT)
    if manifest.get("parent", {}).get("manifest_sha256") != parent_manifest_sha256:
        log.info("%s holds an export of another native checkpoint; exporting again", out_dir)
        return None
    try:
        verify_files(out_dir, manifest["files"], check_hash=False)
    except NevaError as exc:
        log.warning("%s; exporting again", exc)
        return None
    log.info("%s already holds this export; nothing to do", out_dir)
    return out_dir
