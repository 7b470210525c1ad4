"""Streaming conversion of a Hugging Face LLaMA-family checkpoint into the native format.

One pass over the native tensor names: each native tensor is formed from its HF tensors (read lazily,
one at a time), cast, grown to the requested vocabulary if needed, split for every tensor-parallel rank
and appended to the rank files at once. Memory holds a few tensors, never the model.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from neva_core.checkpoint.hf import (
    DTYPES,
    HF_DTYPE_NAMES,
    IGNORED_HF_TENSORS,
    TIED_OUTPUT_HF_NAME,
    dtype_from_torch,
    dtype_name,
    hf_tensor_shapes,
    llm_config_from_hf,
    tensor_recipe,
    to_native,
)
from neva_core.checkpoint.layout import NativeCheckpoint, Provenance, save_native
from neva_core.checkpoint.partition import Split, split_kind, tensor_names
from neva_core.checkpoint.safetensors_stream import SafetensorsReader, TensorSpec
from neva_core.errors import NevaError
from neva_core.fingerprint import path_fingerprint
from neva_core.io import MANIFEST_NAME
from neva_core.model.config import LLMConfig

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_HF_DTYPES = {hf_name: name for name, hf_name in HF_DTYPE_NAMES.items()}


class HFCheckpointReader:
    """Lazy, one-tensor-at-a-time access to an HF checkpoint folder.

    Handles model.safetensors, sharded safetensors (via model.safetensors.index.json), pytorch_model.bin
    and sharded .bin. Safetensors are read with plain reads (see safetensors_stream); .bin files are
    opened with `torch.load(weights_only=True, mmap=True)`, one shard at a time.
    """

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        self.weight_map, self.is_safetensors = _weight_map(hf_dir)
        self._safetensors: dict[str, SafetensorsReader] = {}
        self._bin_shard: tuple[str, dict[str, torch.Tensor]] | None = None

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def names(self) -> list[str]:
        return list(self.weight_map)

    def spec(self, name: str) -> TensorSpec:
        if self.is_safetensors:
            return self._safetensors_reader(self.weight_map[name]).spec(name)
        tensor = self._bin_tensors(self.weight_map[name])[name]
        return TensorSpec(name, tensor.dtype, tuple(tensor.shape))

    def read(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise NevaError(f"{self.hf_dir} has no tensor {name!r}; the checkpoint is incomplete or of another model")
        if self.is_safetensors:
            return self._safetensors_reader(self.weight_map[name]).read(name)
        return self._bin_tensors(self.weight_map[name])[name]

    def _safetensors_reader(self, file: str) -> SafetensorsReader:
        if file not in self._safetensors:
            self._safetensors[file] = SafetensorsReader(self.hf_dir / file)
        return self._safetensors[file]

    def _bin_tensors(self, file: str) -> dict[str, torch.Tensor]:
        # Only one .bin shard is mapped at a time: pages touched through a mapping count as this
        # process's memory until it is unmapped.
        if self._bin_shard is None or self._bin_shard[0] != file:
            self._bin_shard = None
            self._bin_shard = (file, _load_bin(self.hf_dir / file))
        return self._bin_shard[1]

    def close(self) -> None:
        for reader in self._safetensors.values():
            reader.close()
        self._safetensors.clear()
        self._bin_shard = None

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _weight_map(hf_dir: Path) -> tuple[dict[str, str], bool]:
    """tensor name -> file, and whether the files are safetensors."""
    for index_name, single_name, is_safetensors in (
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, True),
        (BIN_INDEX, BIN_SINGLE, False),
    ):
        if (hf_dir / index_name).is_file():
            return _read_index(hf_dir / index_name), is_safetensors
        if (hf_dir / single_name).is_file():
            return dict.fromkeys(_tensor_names_of(hf_dir / single_name, is_safetensors), single_name), is_safetensors
    raise NevaError(
        f"{hf_dir} holds no model weights: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}"
    )


def _tensor_names_of(path: Path, is_safetensors: bool) -> list[str]:
    if is_safetensors:
        with SafetensorsReader(path) as reader:
            return reader.names()
    return list(_load_bin(path))


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NevaError(f"{path} is not a valid checkpoint index (no weight_map): {exc}") from exc
    for file in sorted(set(weight_map.values())):
        if not (path.parent / file).is_file():
            raise NevaError(f"{path} lists {file}, which is missing from {path.parent}; download the checkpoint again")
    return dict(weight_map)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise NevaError(f"{path} holds objects other than tensors and is refused for safety: {exc}") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise NevaError(f"cannot read {path} (damaged, or a pre-1.6 torch save format?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NevaError(f"{path} is not a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------
# Inputs: config, vocabulary, dtype, provenance


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise NevaError(f"{path} is missing: {hf_dir} is not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NevaError(f"{path} is not valid JSON: {exc}") from exc


def tokenizer_vocab_size(tokenizer: Path) -> int:
    """The number of ids of a tokenizer: a sentencepiece .model, a tokenizer.json, or a folder holding one
    (an extended tokenizer folder, a model snapshot: its tokenizer.model when present)."""
    from neva_core.tokenizer import find_tokenizer

    path = Path(tokenizer)
    if path.is_dir():
        path = find_tokenizer(path)
    if not path.is_file():
        raise NevaError(f"tokenizer {path} does not exist")
    if path.suffix == ".json":
        from neva_core.tokenizer_fast import id_count, load_fast_tokenizer

        return id_count(load_fast_tokenizer(path.read_bytes(), path))
    return sentencepiece_vocab_size(path)


def check_tensor_parallel(hf_dir: Path, tp: int) -> None:
    """Refuse, naming every factor, a TP size that the HF checkpoint in `hf_dir` cannot be split into,
    before any stage spends time on it."""
    try:
        llm_config_from_hf(read_hf_config(hf_dir), None, tp)
    except NevaError as exc:
        raise NevaError(f"model.tp={tp} does not fit {hf_dir}: {exc}") from exc


def sentencepiece_vocab_size(model_file: Path) -> int:
    """The number of pieces of a sentencepiece model (the extended tokenizer's vocabulary)."""
    import sentencepiece

    try:
        return int(sentencepiece.SentencePieceProcessor(model_file=str(model_file)).get_piece_size())
    except (RuntimeError, OSError) as exc:
        raise NevaError(f"{model_file} is not a sentencepiece model: {exc}") from exc


def requested_vocab_size(vocab_size: int | None, tokenizer: Path | None, checkpoint_vocab: int) -> int | None:
    """The vocabulary to convert to. A tokenizer grows it to its size; one whose ids all fit already keeps the
    checkpoint's rows (Qwen2 pads its embedding past its tokenizer)."""
    if vocab_size is not None and tokenizer is not None:
        raise NevaError("give either vocab_size (--vocab-size) or tokenizer (--tokenizer), not both")
    if tokenizer is not None:
        return max(tokenizer_vocab_size(Path(tokenizer)), checkpoint_vocab)
    if vocab_size is not None and vocab_size <= 0:
        raise NevaError(f"--vocab-size must be positive, got {vocab_size}")
    return vocab_size


def source_dtype(hf_config: dict[str, Any], reader: HFCheckpointReader) -> str:
    """The checkpoint's own dtype: config.json's dtype/torch_dtype, else the stored embedding's."""
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if declared is None:
        return dtype_from_torch(reader.spec("model.embed_tokens.weight").dtype)
    if declared not in _HF_DTYPES:
        raise NevaError(f"HF config.json dtype {declared!r} is not supported; pass --dtype bf16, fp16 or fp32")
    return _HF_DTYPES[declared]


def hf_source(hf_dir: Path) -> dict[str, Any]:
    """Provenance of an HF folder: its path and fingerprint, plus the Hub repo, revision and commit when
    the download stage left its snapshot manifest there."""
    source: dict[str, Any] = {"type": "huggingface", "path": str(hf_dir.resolve()), "fingerprint": path_fingerprint(hf_dir)}
    manifest_path = hf_dir / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise NevaError(f"{manifest_path} is not valid JSON ({exc}); download the checkpoint again") from exc
        if manifest.get("stage") == "download":
            source.update({key: manifest[name] for key, name in (("repo", "repo_id"), ("revision", "revision"),
                                                                  ("commit", "commit")) if manifest.get(name)})
    return source


def check_hf_tensors(reader: HFCheckpointReader, config: LLMConfig, source_vocab: int) -> None:
    """Every tensor the conversion needs exists with the expected shape; nothing unknown is dropped silently."""
    expected = hf_tensor_shapes(config, vocab_rows=source_vocab)
    for name, shape in expected.items():
        if name not in reader.weight_map:
            raise NevaError(f"{reader.hf_dir} has no tensor {name!r}, which this {config.family} config needs")
        spec = reader.spec(name)
        if spec.shape != shape:
            raise NevaError(
                f"tensor {name!r} in {reader.hf_dir / reader.weight_map[name]} has shape {spec.shape}, "
                f"but config.json implies {shape}"
            )
        if not spec.dtype.is_floating_point:
            raise NevaError(f"tensor {name!r} in {reader.hf_dir} has dtype {spec.dtype}; expected floating point")
    for name in reader.names():
        ignorable = IGNORED_HF_TENSORS.fullmatch(name) or (config.tie_embeddings and name == TIED_OUTPUT_HF_NAME)
        if name not in expected and not ignorable:
            raise NevaError(
                f"tensor {name!r} in {reader.hf_dir / reader.weight_map[name]} is not part of a supported "
                f"{config.family} model (an unsupported feature such as an extra bias?); refusing to drop it"
            )


# ---------------------------------------------------------------------------------------------
# Forming native tensors


def grow_vocab_rows(rows: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """`rows` extended to `vocab_size` rows; each new token's row is the mean of the existing rows.

    The mean (computed in fp32 from the stored values) starts new tokens at the centre of the known
    embeddings, so their logits are average rather than extreme. Padding rows stay zero (added on split).
    """
    mean = rows.float().mean(dim=0, keepdim=True).to(dtype)
    return torch.cat([rows.to(dtype), mean.expand(vocab_size - rows.shape[0], -1)], dim=0)


def form_native_tensor(
    name: str, read: Callable[[str], torch.Tensor], config: LLMConfig, dtype: torch.dtype
) -> torch.Tensor:
    """The canonical full native tensor `name` in `dtype`, from HF tensors fetched with `read`."""
    hf_names = tensor_recipe(name, config.family).hf_names
    if split_kind(name, config) is Split.VOCAB:
        rows = read(hf_names[0])
        if rows.shape[0] < config.vocab_size:
            return grow_vocab_rows(rows, config.vocab_size, dtype)
        return rows.to(dtype)
    # Cast each part before fusing: converting fp32 to bf16 first halves the fused copy.
    return to_native(name, [read(hf_name).to(dtype) for hf_name in hf_names], config)


def native_tensors(
    read: Callable[[str], torch.Tensor], config: LLMConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every native tensor, formed lazily in canonical order."""
    for name in tensor_names(config):
        yield name, form_native_tensor(name, read, config, dtype)


# ---------------------------------------------------------------------------------------------


def convert_hf_checkpoint(
    hf_dir: Path | str,
    out_dir: Path | str,
    *,
    tp: int = 1,
    dtype: str | None = None,
    vocab_size: int | None = None,
    tokenizer: Path | str | None = None,
) -> NativeCheckpoint:
    """Convert an HF LLaMA/Mistral/Qwen2 checkpoint folder into a native checkpoint at `out_dir`.

    `dtype` (bf16, fp16, fp32) defaults to the checkpoint's own; `vocab_size` or `tokenizer` (a sentencepiece
    model, a tokenizer.json or a folder with either) grows the vocabulary. An identical finished output is
    reused; one of other settings or another source is replaced once the new one is complete.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = read_hf_config(hf_dir)
    requested = requested_vocab_size(vocab_size, Path(tokenizer) if tokenizer else None,
                                     int(hf_config.get("vocab_size") or 0))
    config = llm_config_from_hf(hf_config, requested, tp)
    source = hf_source(hf_dir)
    with HFCheckpointReader(hf_dir) as reader:
        out_dtype = dtype_name(dtype) if dtype is not None else source_dtype(hf_config, reader)
        wanted = {"source.fingerprint": source["fingerprint"], "tp": tp, "dtype": out_dtype, "vocab.real": config.vocab_size}
        source_vocab = int(hf_config["vocab_size"])
        check_hf_tensors(reader, config, source_vocab)
        provenance = Provenance(
            source=source,
            original_vocab_size=source_vocab,
            hf_config=hf_config,
            history=({"stage": "convert", "tp": tp, "dtype": out_dtype, "vocab_size": config.vocab_size},),
        )
        log.info("converting %s -> %s (tp=%d, %s, vocab %d)", hf_dir, out_dir, tp, out_dtype, config.vocab_size)
        return save_native(
            out_dir,
            config,
            tp=tp,
            dtype=out_dtype,
            provenance=provenance,
            tensors=native_tensors(reader.read, config, DTYPES[out_dtype]),
            wanted=wanted,
        )
