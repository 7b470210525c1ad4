"""The native checkpoint directory: one safetensors file per tensor-parallel rank, config, manifest.

    <dir>/config.json                          architecture (LLMConfig), tp, dtype, vocab sizes, provenance
    <dir>/model-tp00-of-04.safetensors ...     rank r's tensors under Megatron-core names, rank layout
    <dir>/manifest.json                        every file's size and sha256; written last

Writers stream (`save_native` consumes full tensors one at a time and splits each into every rank file
at once); readers verify the manifest. See docs/checkpoint-format.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from neva_core.checkpoint.hf import DTYPES, dtype_name
from neva_core.checkpoint.partition import merge_tensor, shard_shape, split_tensor, tensor_names
from neva_core.checkpoint.safetensors_stream import (
    SafetensorsReader,
    StreamingWriter,
    TensorSpec,
    configure_allocator_for_streaming,
    prefetched,
)
from neva_core.errors import NevaError
from neva_core.io import (
    MANIFEST_NAME,
    commit_output,
    file_entry,
    read_manifest,
    sha256_file,
    verify_files,
    write_json_atomic,
    write_manifest,
)
from neva_core.model.config import LLMConfig

log = logging.getLogger(__name__)

FORMAT = "neva-native-llm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"


def rank_file_name(rank: int, tp: int) -> str:
    return f"model-tp{rank:02d}-of{tp:02d}.safetensors"


@dataclass(frozen=True)
class Provenance:
    """Where a native checkpoint's weights came from; stored in its config.json."""

    source: dict[str, Any]  # the HF source: path, repo, revision, commit, fingerprint
    original_vocab_size: int  # the source checkpoint's vocabulary, before any growth
    hf_config: dict[str, Any] | None = None  # the source config.json, so that export restores it
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # producing stages, oldest first
    parent: dict[str, Any] | None = None  # the native checkpoint this one was derived from (repartition)


@dataclass(frozen=True)
class NativeCheckpoint:
    """A finished native checkpoint, small and JSON-able: what the stages hand to each other."""

    path: str
    tp: int
    dtype: str
    vocab_size: int  # real tokens
    original_vocab_size: int  # the source checkpoint's vocabulary
    padded_vocab_size: int  # embedding rows over all ranks
    manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NativeCheckpoint:
        return cls(**data)


def rank_plan(config: LLMConfig, tp: int, dtype: str) -> list[TensorSpec]:
    """Every tensor of one rank file, in canonical order, with its shape at TP=tp."""
    torch_dtype = DTYPES[dtype_name(dtype)]
    return [TensorSpec(name, torch_dtype, shard_shape(name, config, tp)) for name in tensor_names(config)]


# ---------------------------------------------------------------------------------------------
# Writing


def save_native(
    out_dir: Path,
    config: LLMConfig,
    *,
    tp: int,
    dtype: str,
    provenance: Provenance,
    tensors: Iterable[tuple[str, torch.Tensor]],
    wanted: dict[str, Any],
) -> NativeCheckpoint:
    """Write a native checkpoint from canonical full tensors, given lazily in `tensor_names` order, unless
    `out_dir` already holds one whose config.json matches `wanted` (see `reuse_existing`).

    Each full tensor is split into all `tp` rank files as soon as it arrives and then dropped, so memory
    holds one tensor and its shards. Everything is written into a temporary folder renamed at the end
    (`io.commit_output`); a checkpoint of other settings there is replaced only then.
    """
    config = config.with_tp(tp)

    def build(tmp: Path) -> None:
        configure_allocator_for_streaming()
        files = _write_rank_files(tmp, config, tp, dtype, tensors)
        write_json_atomic(tmp / CONFIG_NAME, _config_document(config, tp, dtype, provenance, list(files)))
        files[CONFIG_NAME] = file_entry(tmp / CONFIG_NAME)
        write_manifest(tmp, {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files})

    commit_output(out_dir, reuse=lambda found: reuse_existing(found, wanted), build=build)
    return describe_native(out_dir)


def _write_rank_files(
    folder: Path, config: LLMConfig, tp: int, dtype: str, tensors: Iterable[tuple[str, torch.Tensor]]
) -> dict[str, dict[str, Any]]:
    specs = rank_plan(config, tp, dtype)
    writers: list[StreamingWriter] = []
    try:
        for rank in range(tp):
            metadata = {"format": "pt", "neva_format": FORMAT, "tp_rank": str(rank), "tp_size": str(tp)}
            writers.append(StreamingWriter(folder / rank_file_name(rank, tp), specs, metadata))
        for name, full in prefetched(tensors):
            shards = split_tensor(name, full, config, tp)
            del full  # the generator forms the next tensor before this loop variable is rebound
            for writer, shard in zip(writers, shards):
                writer.write(name, shard)
            del shards
        return {writer.path.name: writer.close() for writer in writers}
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def _config_document(
    config: LLMConfig, tp: int, dtype: str, provenance: Provenance, rank_files: list[str]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "tp": tp,
        "dtype": dtype,
        "vocab": {
            "original": provenance.original_vocab_size,
            "real": config.vocab_size,
            "padded": config.padded_vocab_size,
        },
        "rank_files": rank_files,
        "source": provenance.source,
        "hf_config": provenance.hf_config,
        "history": list(provenance.history),
        "parent": provenance.parent,
    }


# ---------------------------------------------------------------------------------------------
# Reading and verification


def read_native_config(folder: Path | str) -> tuple[LLMConfig, dict[str, Any]]:
    """The model config and the whole config.json of a complete native checkpoint.

    Refuses a folder without a manifest (incomplete) and a config.json that does not match it.
    """
    folder = Path(folder)
    manifest = _read_native_manifest(folder)
    verify_files(folder, {CONFIG_NAME: manifest["files"][CONFIG_NAME]})
    meta = json.loads((folder / CONFIG_NAME).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise NevaError(
            f"{folder / CONFIG_NAME} is format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this neva reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return LLMConfig.from_dict(meta["model"]), meta


def _read_native_manifest(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise NevaError(f"native checkpoint {folder} does not exist; run `neva convert` first")
    manifest = read_manifest(folder)
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or CONFIG_NAME not in files:
        raise NevaError(
            f"{folder / MANIFEST_NAME} is not a complete native checkpoint manifest; "
            f"delete {folder} and run the stage again"
        )
    return manifest


def verify_native(folder: Path | str, deep: bool = True) -> None:
    """Check a native checkpoint against its manifest: sizes, tensor names/shapes, and sha256 when `deep`.

    The cheap mode (deep=False) reads only headers and file sizes; it is the cache-hit check.
    """
    folder = Path(folder)
    config, meta = read_native_config(folder)
    manifest = _read_native_manifest(folder)
    tp, dtype = int(meta["tp"]), meta["dtype"]
    expected_files = {rank_file_name(rank, tp) for rank in range(tp)} | {CONFIG_NAME}
    if set(manifest["files"]) != expected_files:
        raise NevaError(
            f"{folder / MANIFEST_NAME} lists {sorted(manifest['files'])}, expected {sorted(expected_files)}; "
            f"delete {folder} and run the stage again"
        )
    verify_files(folder, manifest["files"], check_hash=deep)
    for rank in range(tp):
        with SafetensorsReader(folder / rank_file_name(rank, tp)) as reader:
            _check_rank_header(reader, config, tp, dtype)


def _check_rank_header(reader: SafetensorsReader, config: LLMConfig, tp: int, dtype: str) -> None:
    expected = rank_plan(config, tp, dtype)
    found = [reader.spec(name) for name in reader.names()]
    for want, have in itertools.zip_longest(expected, found):
        if want != have:
            raise NevaError(
                f"{reader.path} does not hold the tensors its config.json describes "
                f"(expected {want}, found {have}); delete the checkpoint and run the stage again"
            )


def _hash_mismatch(path: Path, folder: Path) -> NevaError:
    return NevaError(
        f"{path} does not match its sha256 in the manifest: the file is damaged; "
        f"delete {folder} and run the stage again"
    )


def load_native_rank(folder: Path | str, rank: int, verify: bool = True, deep: bool = True) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors under native names, ready for `NevaLLM.load_state_dict`.

    With `verify`, the manifest is checked (sizes and headers first; with `deep` also the file's sha256,
    computed while reading) and nothing is returned from a damaged file.
    """
    folder = Path(folder)
    config, meta = read_native_config(folder)
    tp = int(meta["tp"])
    if not 0 <= rank < tp:
        raise NevaError(f"rank {rank} does not exist in {folder}: it was written for tp={tp} (ranks 0..{tp - 1})")
    path = folder / rank_file_name(rank, tp)
    if verify:
        verify_native(folder, deep=False)
    with SafetensorsReader(path, track_hash=True) as reader:
        tensors = {name: reader.read(name) for name in reader.names()}
        if verify and deep and reader.sha256() != _read_native_manifest(folder)["files"][path.name]["sha256"]:
            raise _hash_mismatch(path, folder)
    return tensors


def describe_native(folder: Path | str) -> NativeCheckpoint:
    """The NativeCheckpoint value of a complete native checkpoint folder."""
    folder = Path(folder)
    config, meta = read_native_config(folder)
    return NativeCheckpoint(
        path=str(folder.resolve()),
        tp=int(meta["tp"]),
        dtype=meta["dtype"],
        vocab_size=config.vocab_size,
        original_vocab_size=int(meta["vocab"]["original"]),
        padded_vocab_size=config.padded_vocab_size,
        manifest_sha256=sha256_file(folder / MANIFEST_NAME),
    )


class NativeReader:
    """Stream a native checkpoint's canonical full tensors, merged from every rank file.

    Sizes and headers are verified on open; the sha256 of each rank file is computed while its tensors
    are read (in file order) and compared with the manifest after the last tensor, before the consumer
    publishes anything, so the data is read once, not twice.
    """

    def __init__(self, folder: Path | str, *, deep: bool = True):
        self.folder = Path(folder)
        verify_native(self.folder, deep=False)
        self.config, self.meta = read_native_config(self.folder)
        self.tp, self.dtype = int(self.meta["tp"]), self.meta["dtype"]
        self._manifest = _read_native_manifest(self.folder)
        self._deep = deep
        self._readers = [
            SafetensorsReader(self.folder / rank_file_name(r, self.tp), track_hash=deep) for r in range(self.tp)
        ]

    @property
    def provenance(self) -> Provenance:
        return Provenance(
            source=self.meta["source"],
            original_vocab_size=int(self.meta["vocab"]["original"]),
            hf_config=self.meta.get("hf_config"),
            history=tuple(self.meta.get("history", ())),
        )

    def manifest_sha256(self) -> str:
        return sha256_file(self.folder / MANIFEST_NAME)

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, canonical full tensor) in canonical order; raises after the last one if a hash differs."""
        for name in tensor_names(self.config):
            shards = [reader.read(name) for reader in self._readers]
            try:
                full = merge_tensor(name, shards, self.config)
            except NevaError:
                # Damaged bytes can surface as mismatched replicated tensors; name the real cause.
                self.check_hashes()
                raise
            del shards
            yield name, full
        self.check_hashes()

    def check_hashes(self) -> None:
        if not self._deep:
            return
        for reader in self._readers:
            if reader.sha256() != self._manifest["files"][reader.path.name]["sha256"]:
                raise _hash_mismatch(reader.path, self.folder)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> NativeReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def reuse_existing(out_dir: Path, wanted: dict[str, Any]) -> NativeCheckpoint | None:
    """The checkpoint at `out_dir` if it is complete and was made from the same inputs and settings, else
    None (it is then rebuilt). A folder that is not a native checkpoint at all is an error: never replaced.

    `wanted` maps config.json keys (dotted for nested ones, e.g. "source.fingerprint") to values.
    """
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_NAME).is_file() and not (out_dir / MANIFEST_NAME).is_file():
        raise NevaError(f"{out_dir} already exists and is not a native checkpoint; remove it or choose another "
                        "output folder")
    try:
        verify_native(out_dir, deep=False)
        _, meta = read_native_config(out_dir)
    except NevaError as exc:
        log.warning("%s is not a complete native checkpoint (%s); writing it again", out_dir, exc)
        return None
    differences = [
        f"{key}={_lookup(meta, key)!r} (wanted {value!r})" for key, value in wanted.items() if _lookup(meta, key) != value
    ]
    if differences:
        log.info("%s holds a different checkpoint: %s", out_dir, "; ".join(differences))
        return None
    log.info("%s already holds this checkpoint; nothing to do", out_dir)
    return describe_native(out_dir)


def _lookup(meta: dict[str, Any], dotted: str) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
