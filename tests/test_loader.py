"""The training/validation loader over `neva shard` output: layout, DP split, shuffle, skips, exact resume.

References are independent of the loader: the expected rows come from the source JSON and images.zip
(not from the shards), and resumed runs are compared with one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_support import IMAGE_SIZE, IMAGE_TOKEN_ID, IMAGE_TOKENS, PAD_ID, CharEncoder, char_ids, tiny_image
from PIL import Image

from neva_core.data.loader import (
    IGNORE_INDEX,
    EncodedRecord,
    LoaderConfig,
    RawRecord,
    TemplateEncoder,
    TrainLoader,
    ValLoader,
)
from neva_core.data.loader_state import state_from_json, state_to_json
from neva_core.data.shards import shard_dataset
from neva_core.errors import NevaError

COPIES = 4  # the 64 instruct records, four times under new ids: epochs long enough to resume inside
BATCH = 2
WORKERS = 2
AUGMENTING = CharEncoder(augment=True)  # random numbers in the encoder: a resume must replay them too


@pytest.fixture(scope="module")
def source(neva_fixtures, tmp_path_factory) -> dict[str, Any]:
    """The shard folder, and every record with its image bytes, read from the JSON and the zip."""
    tmp = tmp_path_factory.mktemp("loader")
    base = json.loads(neva_fixtures.instruct_json.read_text())
    records = [dict(record, id=f"{record['id']}-{copy}") for copy in range(COPIES) for record in base]
    json_path = tmp / "records.json"
    json_path.write_text(json.dumps(records))
    shard_dataset(json_path, neva_fixtures.instruct_zip, tmp / "shards", maxcount=16, workers=1, val_fraction=0.25)
    with zipfile.ZipFile(neva_fixtures.instruct_zip) as archive:
        images = {record["id"]: archive.read(record["image"]) for record in records if "image" in record}
    manifest = json.loads((tmp / "shards" / "manifest.json").read_text())
    splits = {split: set() for split in ("train", "val")}
    for shard in manifest["shards"]:
        splits[shard["split"]].update(_keys_in(tmp / "shards" / shard["name"]))
    return {"shards": tmp / "shards", "records": {r["id"]: r for r in records}, "images": images, "splits": splits}


def _keys_in(tar: Path) -> set[str]:
    import tarfile

    with tarfile.open(tar) as archive:
        return {member.name.split(".", 1)[0] for member in archive}


def config(source: dict[str, Any], **overrides: Any) -> LoaderConfig:
    values: dict[str, Any] = dict(
        shards=source["shards"], encoder=CharEncoder(), batch_size=BATCH, max_length=512,
        image_token_id=IMAGE_TOKEN_ID, image_size=IMAGE_SIZE, pad_token_id=PAD_ID, num_workers=WORKERS,
        seed=0, shuffle_buffer_size=8, max_samples_per_sequence=4,
    )
    return LoaderConfig(**(values | overrides))


def take(loader: TrainLoader, count: int) -> list:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("the training loader ended")


def expected_row(source: dict[str, Any], sample_id: str, max_length: int) -> tuple[str | None, EncodedRecord]:
    """(skip reason or None, the row truncated to max_length) computed from the source files."""
    record = source["records"][sample_id]
    data = source["images"].get(sample_id)
    image = None if data is None else Image.open(io.BytesIO(data)).convert("RGB")
    encoded = CharEncoder()(RawRecord(sample_id, record["conversations"], image, data, record))
    positions = [i for i, token in enumerate(encoded.input_ids) if token == IMAGE_TOKEN_ID]
    if positions and positions[-1] >= max_length:
        return "image tokens end", encoded
    if all(label == IGNORE_INDEX for label in encoded.labels[:max_length]):
        return "no trained token", encoded
    return None, EncodedRecord(encoded.input_ids[:max_length], encoded.labels[:max_length], encoded.image)


# --- one uninterrupted DP=2 run with workers, its states saved along the way -------------------------


@pytest.fixture(scope="module")
def reference(source) -> dict[str, Any]:
    loaders = [TrainLoader(config(source, dp_rank=rank, dp_size=2, encoder=AUGMENTING)) for rank in range(2)]
    per_epoch = [loader.samples_per_epoch for loader in loaders]
    epoch = min(per_epoch) // BATCH  # batches
    save_at = [epoch // 2, epoch, epoch + epoch // 2]
    # How far each resumed run is compared: from mid-epoch 1 on past the epoch's end, else 8 batches.
    horizon = {save_at[0]: epoch // 2 + 4, save_at[1]: 8, save_at[2]: 8}
    total = save_at[-1] + 8
    runs, states, stats = [], [], []
    for loader in loaders:
        batches, saved, counted = [], {}, {}
        for batch in loader:
            batches.append(batch)
            if len(batches) in save_at:
                saved[len(batches)] = json.dumps(loader.state_dict())  # JSON on disk in a real run
                counted[len(batches)] = loader.stats
            if len(batches) == total:
                break
        loader.close()
        runs.append(batches)
        states.append(saved)
        stats.append(counted)
    return {"runs": runs, "states": states, "stats": stats, "save_at": save_at, "total": total,
            "horizon": horizon, "samples_per_epoch": per_epoch}


def test_dp_ranks_split_the_train_split_between_them(reference, source):
    drawn = [{sid for batch in run for sid in batch.sample_ids} for run in reference["runs"]]
    assert not drawn[0] & drawn[1]  # a sample belongs to one DP rank only
    assert drawn[0] | drawn[1] == source["splits"]["train"]  # more than an epoch: every sample was drawn
    assert sum(reference["samples_per_epoch"]) == len(source["splits"]["train"])


@pytest.mark.parametrize("point", range(3), ids=["mid-epoch-1", "at-epoch-end", "mid-epoch-2"])
def test_resumed_loaders_continue_exactly_as_the_uninterrupted_run(reference, source, point, tmp_path):
    at = reference["save_at"][point]
    for rank in range(2):
        state = json.loads(reference["states"][rank][at])
        calls = tmp_path / f"calls-{rank}.txt"
        encoder = dataclasses.replace(AUGMENTING, call_log=str(calls))  # the same encoding, logged
        with TrainLoader(config(source, dp_rank=rank, dp_size=2, encoder=encoder)) as loader:
            loader.load_state_dict(state)
            assert loader.stats == reference["stats"][rank][at]
            resumed = take(loader, 1)
            encoded_for_first = len(calls.read_text().splitlines())
            resumed += take(loader, reference["horizon"][at] - 1)
        for ours, theirs in zip(resumed, reference["runs"][rank][at : at + len(resumed)], strict=True):
            assert ours.sample_ids == theirs.sample_ids
            for name in ("input_ids", "labels", "attention_mask", "images", "has_image"):
                assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        drawn = sum(len(batch.sample_ids) for batch in reference["runs"][rank][: at + len(resumed)])
        assert loader.stats == {"batches": at + len(resumed), "samples_drawn": drawn, "skipped": 0,
                                "epoch": drawn // reference["samples_per_epoch"][rank]}
        # Not re-reading the epoch: the workers encoded only the batches replayed from their last
        # checkpoints, the first one, and what they prefetch meanwhile (2 per worker, 1 in progress).
        replayed = sum(worker.offset for worker in state_from_json(state["energon"]).worker_states)
        assert encoded_for_first <= (replayed + 1 + 3 * WORKERS) * BATCH
        into_epoch = at * BATCH % reference["samples_per_epoch"][rank]
        if point == 2:  # well inside the second epoch
            assert encoded_for_first < into_epoch
        assert {int(line.split()[0]) for line in calls.read_text().splitlines()}.isdisjoint({os.getpid()})


def test_epochs_repeat_and_are_counted(reference):
    per_epoch = reference["samples_per_epoch"][0]
    drawn = [sid for batch in reference["runs"][0] for sid in batch.sample_ids]
    first, second = drawn[:per_epoch], drawn[per_epoch : 2 * per_epoch]
    share = set(drawn)
    assert len(share) == per_epoch
    # An epoch draws each of the rank's samples once, but for those the shuffle buffer carries over its seam.
    assert len(set(first)) >= per_epoch - 8
    assert second[: len(first) - 16] != first[: len(first) - 16]  # another order in the next epoch
    stats = reference["stats"][0]
    epoch_end = per_epoch // BATCH
    assert [stats[at]["epoch"] for at in reference["save_at"]] == [int(at >= epoch_end) for at in reference["save_at"]]


def test_state_json_round_trip_and_allow_list(reference):
    state = json.loads(reference["states"][0][reference["save_at"][1]])
    assert state_to_json(state_from_json(state["energon"])) == state["energon"]
    tampered = json.loads(json.dumps(state["energon"]).replace("SliceState", "os.system", 1))
    with pytest.raises(NevaError, match="allow-list"):
        state_from_json(tampered)
    with pytest.raises(NevaError, match="does not know how to store"):
        state_to_json({"x": object()})


# --- batch layout, truncation and skips ---------------------------------------------------------------


def test_batches_follow_the_records_truncated_padded_and_skipped(source, tmp_path):
    max_length = 40  # some records' image tags stand too late for this, some answers too
    chosen = sorted(source["splits"]["train"])[:3]
    calls = tmp_path / "calls.txt"
    # An exit callback like those Prefect's services leave: forked workers must not run it (they did, and
    # died with status 1, which torch reports as a crash when the loader closes).
    threading._register_atexit(os._exit, 1)
    try:
        with TrainLoader(config(source, num_workers=1, batch_size=4, max_length=max_length, max_skip_fraction=1.0,
                                encoder=CharEncoder(skip_ids=frozenset(chosen), call_log=str(calls)))) as loader:
            batches = take(loader, 2 * loader.samples_per_epoch // 4)
    finally:
        threading._threading_atexits.pop()
    reasons: dict[str, str] = {}
    seen_rows = set()
    for batch in batches:
        width = batch.input_ids.shape[1]
        assert width <= max_length and batch.attention_mask.sum(1).max() == width
        for row, sample_id in enumerate(batch.sample_ids):
            reason, want = expected_row(source, sample_id, max_length)
            assert reason is None and sample_id not in chosen, sample_id
            size = len(want.input_ids)
            assert batch.input_ids[row, :size].tolist() == want.input_ids
            assert batch.labels[row, :size].tolist() == want.labels
            assert (batch.labels[row, size:] == IGNORE_INDEX).all() and (batch.input_ids[row, size:] == PAD_ID).all()
            assert batch.attention_mask[row].tolist() == [True] * size + [False] * (width - size)
            assert bool(batch.has_image[row]) == (want.image is not None)
            expected_image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE) if want.image is None else want.image
            assert torch.equal(batch.images[row], expected_image)
            seen_rows.add((sample_id, want.image is None, IMAGE_TOKEN_ID in want.input_ids))
        for skip in batch.skipped:
            reasons[skip.id] = skip.reason
    assert any(text_only for _, text_only, _ in seen_rows) and any(image for _, _, image in seen_rows)
    for sample_id, reason in reasons.items():
        expected = "marked to be skipped" if sample_id in chosen else expected_row(source, sample_id, max_length)[0]
        assert expected is not None and expected in reason, (sample_id, reason)
    kinds = ("image tokens end", "no trained token", "marked to be skipped")
    assert {kind for kind in kinds for reason in reasons.values() if kind in reason} == set(kinds)
    assert set(chosen) <= set(reasons)
    assert loader.stats["skipped"] == sum(len(batch.skipped) for batch in batches)
    assert {int(line.split()[0]) for line in calls.read_text().splitlines()}.isdisjoint({os.getpid()})


def test_too_many_skips_stop_the_run(source):
    loader = TrainLoader(config(source, num_workers=0, max_length=40, max_skip_fraction=0.0, skip_grace_samples=0))
    with pytest.raises(NevaError, match="max_skip_fraction 0.0"):
        take(loader, 100)


def test_an_encoder_bug_is_an_error_naming_the_sample_not_a_skip(source):
    def broken(record: RawRecord) -> EncodedRecord:
        encoded = CharEncoder()(record)
        return dataclasses.replace(encoded, labels=encoded.labels[:-1])

    with TrainLoader(config(source, num_workers=1, encoder=broken)) as loader, pytest.raises(
        NevaError, match=r"sample '.*': the encoder returned \d+ input ids but \d+ labels"
    ):
        take(loader, 1)


def test_template_encoder_joins_a_text_template_and_an_image_processor(source):
    @dataclasses.dataclass
    class Layout:  # what templates.encode_conversation returns
        input_ids: list[int]
        labels: list[int]

    def encode_text(conversations: list[dict]) -> Layout:
        ids = char_ids(conversations[-1]["value"])
        return Layout([IMAGE_TOKEN_ID] * IMAGE_TOKENS + ids, [IGNORE_INDEX] * IMAGE_TOKENS + ids)

    sample_id = next(i for i in sorted(source["splits"]["train"]) if i in source["images"])
    record = source["records"][sample_id]
    image = Image.open(io.BytesIO(source["images"][sample_id])).convert("RGB")
    encoder = TemplateEncoder(encode_text, tiny_image)
    out = encoder(RawRecord(sample_id, record["conversations"], image, source["images"][sample_id], record))
    assert out.input_ids[IMAGE_TOKENS:] == out.labels[IMAGE_TOKENS:] == char_ids(record["conversations"][-1]["value"])
    assert torch.equal(out.image, tiny_image(image))
    assert encoder(RawRecord(sample_id, record["conversations"], None, None, record)).image is None


# --- shuffle, resume refusal, validation, config ------------------------------------------------------


def test_shuffle_is_seeded_and_reproducible(source):
    def order(seed: int) -> list[str]:
        batches = take(TrainLoader(config(source, num_workers=0, seed=seed)), 12)
        return [sample_id for batch in batches for sample_id in batch.sample_ids]

    first = order(0)
    assert order(0) == first
    assert order(1) != first


@pytest.mark.parametrize(("change", "message"), [
    ({"dp_size": 2}, "dp_size 1 (now 2)"),
    ({"num_workers": 2}, "num_workers 0 (now 2)"),
    ({"seed": 5}, "seed 0 (now 5)"),
])
def test_resume_with_another_dp_size_worker_count_or_seed_is_refused(source, change, message):
    state = TrainLoader(config(source, num_workers=0)).state_dict()
    json.dumps(state)
    with pytest.raises(NevaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainLoader(config(source, **({"num_workers": 0} | change))).load_state_dict(state)


def test_state_cannot_be_loaded_into_a_running_loader(source):
    loader = TrainLoader(config(source, num_workers=0))
    state = loader.state_dict()
    take(loader, 1)
    with pytest.raises(NevaError, match="before the loader yields"):
        loader.load_state_dict(state)


def test_validation_yields_the_same_fixed_subset_every_pass(source):
    val_batches = 20  # more than the val split holds at batch 4: it is repeated to reach the count
    with ValLoader(config(source, batch_size=4), val_batches) as loader:
        passes = [[batch.sample_ids for batch in loader] for _ in range(2)]
    assert len(passes[0]) == val_batches and passes[0] == passes[1]
    drawn = {sid for ids in passes[0] for sid in ids}
    assert drawn == source["splits"]["val"]


@pytest.mark.parametrize(("change", "message"), [
    ({"dp_rank": 2, "dp_size": 2}, "dp_rank 2 must be below dp_size 2"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0"),
    ({"max_skip_fraction": 2.0}, "max_skip_fraction"),
    ({"shards": Path("/nonexistent")}, "no megatron-energon metadata"),
])
def test_bad_configuration_is_refused(source, change, message):
    with pytest.raises(NevaError, match=message):
        config(source, **change)


def test_dp_group_must_agree_with_dp_rank_and_size(source, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        config(source, dp_group=dist.group.WORLD)
        with pytest.raises(NevaError, match="disagree with the data-parallel group"):
            config(source, dp_group=dist.group.WORLD, dp_rank=1, dp_size=2)
    finally:
        dist.destroy_process_group()
