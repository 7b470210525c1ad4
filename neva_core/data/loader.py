"""Training and validation batches from `neva shard` folders, through megatron-energon's savable loader.

Split: by data-parallel rank (`dp_rank`, `dp_size`, optionally the DP process group): every tensor-parallel
rank of one DP group builds its loader with the same DP rank and gets the same batches. Energon hands
each (DP rank, worker) its own shard slices.

Order: energon shuffles the shard slices per epoch and mixes samples in a shuffle buffer, from RNGs seeded
by `seed` and the worker's global id. The order is therefore fixed by (seed, dp_size, num_workers): a
resume with another DP size or worker count is refused (energon cannot replay it).

Work in the worker processes (`num_workers`): reading the tar, decoding the JSON and the image (PIL, RGB),
the caller's `SampleEncoder`, truncation and collation into a `Batch`. The main process only receives
batches.

Encoding: the caller's encoder turns a `RawRecord` (id, conversations, PIL image and its bytes) into an
`EncodedRecord` (input_ids, labels, image tensor). `TemplateEncoder` builds one from a prompt template
function and an image processor. An encoder raising one of `skip_exceptions` (default `SkipRecord`)
skips that sample; so does a sample whose image tokens reach past `max_length`, or one with no trained
label left after truncation. Skips are reported with the sample id on the batch that follows them
(`Batch.skipped`), logged, counted in `TrainLoader.stats`, and fail the run once they exceed
`max_skip_fraction` of the samples drawn.

Exact resume: `TrainLoader.state_dict()` (JSON-serialisable, per DP rank) holds energon's state: each
worker's last internal checkpoint (by default every 2 x num_workers batches) plus how many batches to
replay from it, so a restored loader continues where the saved one stopped without re-reading the epoch.

Training repeats epochs forever; `TrainLoader.epoch` counts them as samples drawn by this rank over its
share of the split. Validation (`ValLoader`) yields the same first `val_batches` batches of the val
split on every pass (energon's LimitDataset over the repeated, unshuffled split, as Megatron does).
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from neva_core.data.energon import INDEX_UUID, META_DIR
from neva_core.data.loader_state import state_from_json, state_to_json
from neva_core.data.templates import IGNORE_INDEX
from neva_core.errors import NevaError

log = logging.getLogger(__name__)

STATE_FORMAT = 1
_IMAGE_MEMBERS = ("jpg", "png")


# --- what the caller provides ----------------------------------------------------------------------


@dataclass
class RawRecord:
    """One sample as read from a shard, handed to the `SampleEncoder` in a worker process."""

    id: str
    conversations: list[dict[str, Any]]
    image: Image.Image | None  # decoded, RGB; None for a text-only record
    image_bytes: bytes | None  # the file as it is stored in the shard
    record: dict[str, Any]  # the whole JSON record (id, image path, conversations, any other keys)


@dataclass
class EncodedRecord:
    """The encoder's output: the spliced token layout (n image tokens per image) and the image tensor."""

    input_ids: list[int]
    labels: list[int]
    image: torch.Tensor | None  # FloatTensor[3, H, W]; None for a text-only record


class SampleEncoder(Protocol):
    def __call__(self, record: RawRecord) -> EncodedRecord: ...


class SkipRecord(Exception):
    """Raised by a `SampleEncoder` for a record that must not be trained; the loader skips and reports it."""


class _TokenLayout(Protocol):  # templates.EncodedSample
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TemplateEncoder:
    """A `SampleEncoder` from a prompt template and an image processor, e.g. for the trainer:

        TemplateEncoder(partial(encode_conversation, "vicuna_v1", tokenizer=tok, image_tokens=576),
                        ImageProcessor.from_folder(vision_dir))

    with `skip_exceptions=(SampleMismatch,)` in the `LoaderConfig`.
    """

    encode_text: Callable[[list[dict[str, Any]]], _TokenLayout]
    process_image: Callable[[Image.Image], torch.Tensor]

    def __call__(self, record: RawRecord) -> EncodedRecord:
        text = self.encode_text(record.conversations)
        image = None if record.image is None else self.process_image(record.image)
        return EncodedRecord(input_ids=list(text.input_ids), labels=list(text.labels), image=image)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that decides the batches; one config serves the train and the val loader."""

    shards: Path  # a `neva shard` output folder
    encoder: SampleEncoder
    batch_size: int  # per DP rank (the micro batch)
    max_length: int  # after splicing: image tokens count
    image_token_id: int
    image_size: int  # the image processor's output side (square)
    pad_token_id: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None  # torch.distributed.ProcessGroup of the data-parallel ranks, if not the world
    num_workers: int = 2
    seed: int = 0
    skip_exceptions: tuple[type[BaseException], ...] = (SkipRecord,)
    max_skip_fraction: float = 0.01  # of the samples drawn, counted as at least `skip_grace_samples`
    skip_grace_samples: int = 1000  # so that a few skips among the first samples do not stop a run
    shuffle_buffer_size: int = 100  # samples mixed across slices; Megatron's examples use 100
    max_samples_per_sequence: int = 100  # samples read from one slice before switching to another
    # How often a worker checkpoints its position (at most every 2 x num_workers batches, energon's floor).
    # A resume replays the batches since the last checkpoint: energon's default of 60 s can mean a minute
    # of decoding per worker; a checkpoint costs little next to decoding one batch of images.
    checkpoint_every_sec: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", Path(self.shards))
        for name in ("batch_size", "max_length", "image_size", "dp_size", "shuffle_buffer_size",
                     "max_samples_per_sequence"):
            _require_int(name, getattr(self, name), minimum=1)
        for name in ("image_token_id", "pad_token_id", "dp_rank", "num_workers", "skip_grace_samples"):
            _require_int(name, getattr(self, name), minimum=0)
        _require_int("seed", self.seed, minimum=None)
        if self.dp_rank >= self.dp_size:
            raise NevaError(f"dp_rank {self.dp_rank} must be below dp_size {self.dp_size}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise NevaError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction!r}")
        if self.checkpoint_every_sec < 0:
            raise NevaError(f"checkpoint_every_sec must be >= 0, got {self.checkpoint_every_sec!r}")
        if not callable(self.encoder):
            raise NevaError(f"encoder must be callable (RawRecord -> EncodedRecord), got {self.encoder!r}")
        if self.dp_group is not None:
            _check_dp_group(self.dp_group, self.dp_rank, self.dp_size)
        if not (self.shards / META_DIR / INDEX_UUID).is_file():
            raise NevaError(
                f"{self.shards} holds no megatron-energon metadata ({META_DIR}/{INDEX_UUID}); "
                "point at a folder written by `neva shard`"
            )


def _require_int(name: str, value: Any, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise NevaError(f"{name} must be an integer{bound}, got {value!r}")


def _check_dp_group(group: Any, dp_rank: int, dp_size: int) -> None:
    group_rank, group_size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    if (group_rank, group_size) != (dp_rank, dp_size):
        raise NevaError(
            f"dp_rank/dp_size {dp_rank}/{dp_size} disagree with the data-parallel group "
            f"(rank {group_rank} of {group_size}); pass the rank and size of that group"
        )


# --- the batch --------------------------------------------------------------------------------------


@dataclass
class SkippedSample:
    id: str
    reason: str


@dataclass
class Batch:
    input_ids: torch.Tensor  # LongTensor[B, T]
    labels: torch.Tensor  # LongTensor[B, T], IGNORE_INDEX at padding and untrained positions
    attention_mask: torch.Tensor  # BoolTensor[B, T], True = real token (right padding)
    images: torch.Tensor  # FloatTensor[B, 3, H, W], zeros for text-only rows
    has_image: torch.Tensor  # BoolTensor[B]
    sample_ids: list[str]
    skipped: list[SkippedSample] = field(default_factory=list)  # skipped by the worker since its last batch

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread when an accelerator is present."""
        return Batch(self.input_ids.pin_memory(), self.labels.pin_memory(), self.attention_mask.pin_memory(),
                     self.images.pin_memory(), self.has_image.pin_memory(), self.sample_ids, self.skipped)


@dataclass
class _Fitted:
    id: str
    input_ids: list[int]
    labels: list[int]
    image: torch.Tensor | None


def fit_sample(sample_id: str, encoded: EncodedRecord, has_image: bool, config: LoaderConfig) -> _Fitted:
    """Check the encoder's output and truncate it to `max_length`; raises `SkipRecord` for unfit samples."""
    if len(encoded.input_ids) != len(encoded.labels):
        raise NevaError(
            f"sample {sample_id!r}: the encoder returned {len(encoded.input_ids)} input ids but "
            f"{len(encoded.labels)} labels; fix the sample encoder"
        )
    image_positions = [i for i, token in enumerate(encoded.input_ids) if token == config.image_token_id]
    if has_image != bool(image_positions) or has_image != (encoded.image is not None):
        raise NevaError(
            f"sample {sample_id!r} {'has' if has_image else 'has no'} image, but the encoder returned "
            f"{len(image_positions)} image tokens (id {config.image_token_id}) and "
            f"{'an' if encoded.image is not None else 'no'} image tensor; fix the sample encoder"
        )
    expected_shape = (3, config.image_size, config.image_size)
    if encoded.image is not None and tuple(encoded.image.shape) != expected_shape:
        raise NevaError(
            f"sample {sample_id!r}: the image processor returned shape {tuple(encoded.image.shape)}, "
            f"expected {expected_shape} (image_size {config.image_size})"
        )
    if image_positions and image_positions[-1] >= config.max_length:
        raise SkipRecord(
            f"its image tokens end at position {image_positions[-1] + 1}, past max_length {config.max_length}"
        )
    labels = encoded.labels[: config.max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise SkipRecord(f"no trained token is left within max_length {config.max_length}")
    return _Fitted(sample_id, encoded.input_ids[: config.max_length], labels, encoded.image)


def collate(samples: Sequence[_Fitted], config: LoaderConfig, skipped: list[SkippedSample]) -> Batch:
    """Right-pad to the longest sample of the batch."""
    length = max(len(sample.input_ids) for sample in samples)
    rows = len(samples)
    input_ids = torch.full((rows, length), config.pad_token_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.bool)
    images = torch.zeros((rows, 3, config.image_size, config.image_size), dtype=torch.float32)
    has_image = torch.zeros(rows, dtype=torch.bool)
    for row, sample in enumerate(samples):
        size = len(sample.input_ids)
        input_ids[row, :size] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, :size] = torch.tensor(sample.labels, dtype=torch.long)
        attention_mask[row, :size] = True
        if sample.image is not None:
            images[row] = sample.image
            has_image[row] = True
    return Batch(input_ids, labels, attention_mask, images, has_image, [s.id for s in samples], skipped)


def read_record(crude: dict[str, Any]) -> RawRecord:
    """A `RawRecord` from energon's crude sample (raw tar members: json, and jpg or png)."""
    key = crude["__key__"]
    record = json.loads(crude["json"])
    image_bytes = next((crude[member] for member in _IMAGE_MEMBERS if member in crude), None)
    image = None
    if image_bytes is not None:
        try:
            with Image.open(io.BytesIO(image_bytes)) as opened:
                image = opened.convert("RGB")
        except (OSError, Image.DecompressionBombError) as exc:  # `neva shard` checked it: the shard is damaged
            raise NevaError(
                f"sample {key!r}: its image does not decode ({exc}), so its shard is damaged; "
                "rerun `neva shard` into a new folder"
            ) from exc
    return RawRecord(id=key, conversations=record["conversations"], image=image, image_bytes=image_bytes,
                     record=record)


# --- energon ----------------------------------------------------------------------------------------


def _task_encoder(config: LoaderConfig) -> Any:
    """energon's task encoder around `config`: decoding, the caller's encoder, fitting and collation."""
    from megatron.energon import Cooker, DefaultTaskEncoder, stateless
    from megatron.energon import SkipSample as EnergonSkip

    @stateless
    def keep_crude(crude: dict[str, Any]) -> dict[str, Any]:
        return crude

    class NevaTaskEncoder(DefaultTaskEncoder):
        decoder = None  # raw bytes: `read_record` decodes, so the encoder also gets the file itself
        cookers = [Cooker(keep_crude)]

        def __init__(self) -> None:
            super().__init__()
            # Samples skipped in this worker since its last batch; `batch` hands them on and clears them.
            self.pending_skips: list[SkippedSample] = []

        # restore_seeds: each sample's RNGs are seeded from its position, so an encoder that draws random
        # numbers (augmentation) gives the same output when the sample is replayed after a resume.
        @stateless(restore_seeds=True)
        def encode_sample(self, crude: dict[str, Any]) -> _Fitted:
            raw = read_record(crude)
            try:
                return fit_sample(raw.id, config.encoder(raw), raw.image is not None, config)
            except config.skip_exceptions + (SkipRecord,) as exc:
                self.pending_skips.append(SkippedSample(raw.id, f"{type(exc).__name__}: {exc}"))
                raise EnergonSkip() from exc

        @stateless
        def batch(self, samples: list[_Fitted]) -> Batch:
            skipped, self.pending_skips = self.pending_skips, []
            return collate(samples, config, skipped)

        @stateless
        def encode_batch(self, batch: Batch) -> Batch:
            return batch

    return NevaTaskEncoder()


def _worker_config(config: LoaderConfig) -> Any:
    from megatron.energon import WorkerConfig, reraise_exception

    # reraise: energon's default handler logs a failing sample and goes on, which would hide an encoder
    # bug behind a run that silently trains on less data.
    return WorkerConfig(rank=config.dp_rank, world_size=config.dp_size, num_workers=config.num_workers,
                        data_parallel_group=config.dp_group, seed_offset=config.seed,
                        global_error_handler=reraise_exception)


def _energon_major() -> int:
    return int(importlib.metadata.version("megatron-energon").split(".")[0])


def _dataset_id(shards: Path) -> str:
    return (shards / META_DIR / INDEX_UUID).read_text().strip()


# --- training ---------------------------------------------------------------------------------------


class TrainLoader:
    """Endless training batches for one DP rank, with exact resume (`state_dict` / `load_state_dict`).

    Iterating yields batches until the caller stops; iterate again and it continues where it stopped.
    Worker processes start on the first batch and stay until `close()` (or the end of a `with` block).
    """

    def __init__(self, config: LoaderConfig) -> None:
        from megatron.energon import get_savable_loader, get_train_dataset

        self.config = config
        dataset = get_train_dataset(
            config.shards, split_part="train", worker_config=_worker_config(config),
            batch_size=config.batch_size, shuffle_buffer_size=config.shuffle_buffer_size,
            max_samples_per_sequence=config.max_samples_per_sequence, task_encoder=_task_encoder(config),
        )
        self.samples_per_epoch = _samples_per_rank(dataset)
        self._loader = get_savable_loader(dataset, checkpoint_every_sec=config.checkpoint_every_sec)
        _clean_worker_exit(self._loader)
        self._iterator: Iterator[Batch] | None = None
        self.batches = 0
        self.samples_drawn = 0  # trained plus skipped
        self.skipped = 0

    @property
    def epoch(self) -> int:
        """Completed passes of this rank over its share of the train split."""
        return self.samples_drawn // self.samples_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        for batch in self._iterator:
            self._count(batch)
            yield batch

    def _count(self, batch: Batch) -> None:
        self.batches += 1
        self.samples_drawn += len(batch.sample_ids) + len(batch.skipped)
        self.skipped += len(batch.skipped)
        for skip in batch.skipped:
            log.warning("skipped sample %r: %s", skip.id, skip.reason)
        limit = self.config.max_skip_fraction * max(self.samples_drawn, self.config.skip_grace_samples)
        if batch.skipped and self.skipped > limit:
            raise NevaError(
                f"{self.skipped} of {self.samples_drawn} samples drawn so far were skipped, more than "
                f"max_skip_fraction {self.config.max_skip_fraction} (last: {batch.skipped[-1].id!r}: "
                f"{batch.skipped[-1].reason}); check the template and the data, or raise the limit"
            )

    def close(self) -> None:
        """Stop the worker processes now (left to garbage collection, each worker was measured to wait
        out torch's 5-second join timeout before being terminated)."""
        if self._iterator is not None:
            self._iterator.close()
        _stop_workers(self._loader)

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "samples_drawn": self.samples_drawn, "skipped": self.skipped,
                "epoch": self.epoch}

    def state_dict(self) -> dict[str, Any]:
        """This DP rank's position, as JSON-serialisable data; save one per DP rank."""
        return {
            "format": STATE_FORMAT,
            "identity": self._identity(),
            "counters": {"batches": self.batches, "samples_drawn": self.samples_drawn, "skipped": self.skipped},
            "energon": state_to_json(self._loader.save_state_rank()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict` of the same DP rank); call before iterating."""
        if self._iterator is not None:
            raise NevaError("load_state_dict must be called before the loader yields its first batch")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise NevaError(f"the data loader state has format {_get(state, 'format')!r}, expected {STATE_FORMAT}")
        self._check_identity(state.get("identity", {}))
        counters = state["counters"]
        self._loader.restore_state_rank(state_from_json(state["energon"]))
        self.batches, self.samples_drawn = counters["batches"], counters["samples_drawn"]
        self.skipped = counters["skipped"]

    def _identity(self) -> dict[str, Any]:
        """What must match for the saved state to replay the same sequence."""
        config = self.config
        return {
            "dataset": _dataset_id(config.shards), "energon_major": _energon_major(),
            "dp_size": config.dp_size, "dp_rank": config.dp_rank, "num_workers": config.num_workers,
            "seed": config.seed, "batch_size": config.batch_size,
            "shuffle_buffer_size": config.shuffle_buffer_size,
            "max_samples_per_sequence": config.max_samples_per_sequence,
        }

    def _check_identity(self, saved: dict[str, Any]) -> None:
        current = self._identity()
        changed = [f"{name} {saved.get(name)!r} (now {value!r})" for name, value in current.items()
                   if saved.get(name) != value]
        if changed:
            raise NevaError(
                f"cannot resume the data loader exactly: it was saved with {', '.join(changed)}; energon "
                "replays a sample order only with the same data, seed, DP size, worker count and batching. "
                "Resume with the saved values, or start the data order afresh without the loader state"
            )


def _get(state: Any, key: str) -> Any:
    return state.get(key) if isinstance(state, dict) else None


def _clean_worker_exit(loader: torch.utils.data.DataLoader) -> None:
    """Make the forked workers drop the threading-exit callbacks they inherit from this process.

    Prefect registers some for its log and event services; run at a worker's exit without their threads,
    they end the worker with status 1, which torch reports as a crashed worker when the loader closes.
    """
    if loader.num_workers > 0:
        loader.worker_init_fn = functools.partial(_init_worker, loader.worker_init_fn)


def _init_worker(energon_init: Callable[[int], None], worker_id: int) -> None:
    threading._threading_atexits.clear()  # type: ignore[attr-defined]  # the list threading._shutdown runs
    energon_init(worker_id)


def _stop_workers(loader: torch.utils.data.DataLoader) -> None:
    workers = getattr(loader, "_iterator", None)  # where torch keeps persistent workers
    if workers is not None and hasattr(workers, "_shutdown_workers"):
        workers._shutdown_workers()
    loader._iterator = None


def _samples_per_rank(dataset: Any) -> int:
    """This rank's share of the split, in samples (energon's length below the batching)."""
    from megatron.energon.wrappers.batch_dataset import BatchDataset

    batching = dataset._find_wrapped_dataset(BatchDataset)
    return max(1, batching.dataset.len_rank())


# --- validation -------------------------------------------------------------------------------------


class ValLoader:
    """The same `val_batches` batches of the val split (this rank's share) on every pass."""

    def __init__(self, config: LoaderConfig, val_batches: int) -> None:
        from megatron.energon import get_loader, get_val_dataset
        from megatron.energon.wrappers import LimitDataset, RepeatDataset

        _require_int("val_batches", val_batches, minimum=1)
        worker_config = _worker_config(config)
        dataset = get_val_dataset(config.shards, split_part="val", worker_config=worker_config,
                                  batch_size=config.batch_size, task_encoder=_task_encoder(config))
        # Repeated so that a val split smaller than val_batches still yields them all; the limit resets
        # the split after each pass, so every pass starts from its first sample.
        dataset = LimitDataset(RepeatDataset(dataset, worker_config=worker_config), length=val_batches,
                               reset_after_epoch=True, worker_config=worker_config)
        self.val_batches = val_batches
        self._loader = get_loader(dataset)
        _clean_worker_exit(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._loader)

    def close(self) -> None:
        """Stop the worker processes now (see `TrainLoader.close`)."""
        _stop_workers(self._loader)

    def __enter__(self) -> ValLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
