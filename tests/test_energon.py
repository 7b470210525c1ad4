"""megatron-energon metadata: identical to `energon prepare`, and read back by energon's own loader.

The stage writes these files without importing energon; these tests do import it, to compare.
"""

from __future__ import annotations

import random
import shutil
import tarfile
from pathlib import Path

import pytest
from shard_support import dataset, faulty_dataset, index_rows, manifest, record, valid_dataset

from neva_core.data.energon import collapse_shard_names
from neva_core.data.shard_plan import shard_name
from neva_core.data.shards import shard_dataset


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Train and val shards holding jpg, png, converted and text-only samples, and long/non-ASCII keys."""
    tmp = tmp_path_factory.mktemp("energon")
    records, images = valid_dataset(30)
    faulty_records, faulty_images, _ = faulty_dataset()
    extra = [record("L" * 140, "00000/000000001.jpg"), record("caf\u00e9-\u4e2d", "00000/000000002.jpg")]
    json_path, zip_path, _ = dataset(tmp, records + faulty_records + extra, images | faulty_images)
    shard_dataset(json_path, zip_path, tmp / "out", maxcount=7, workers=1, val_fraction=0.3)
    return tmp / "out"


def test_metadata_matches_what_energon_prepare_writes(sharded, tmp_path):
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    names = [shard["name"] for shard in manifest(sharded)["shards"]]
    for name in names:
        shutil.copy(sharded / name, tmp_path / name)
    WebdatasetPreparator.prepare_dataset(
        tmp_path, names, split_parts_patterns=[("train", r"^train-.*"), ("val", r"^val-.*")], workers=1
    )
    for name in names:
        assert (sharded / f"{name}.idx").read_bytes() == (tmp_path / f"{name}.idx").read_bytes(), name
    ours, energons = index_rows(sharded / ".nv-meta/index.sqlite"), index_rows(tmp_path / ".nv-meta/index.sqlite")
    assert ours[0] == energons[0]  # schema: tables, columns, constraints and indexes, statement for statement
    assert ours[1:] == energons[1:]  # the rows, in the order energon inserts them
    for meta in (".info.json", "split.yaml"):
        assert (sharded / ".nv-meta" / meta).read_text() == (tmp_path / ".nv-meta" / meta).read_text(), meta
    assert "CrudeWebdataset" in (sharded / ".nv-meta/dataset.yaml").read_text()


def _gappy_numbers(seed: int) -> list[int]:
    rng = random.Random(seed)
    start = rng.choice([0, 7, 999990])  # 999999 -> 1000000 widens the number: energon ends the range there
    return [n for n in range(start, start + 25) if rng.random() < 0.7]


@pytest.mark.parametrize("numbers", [
    [], [0], [0, 1], [0, 1, 2, 5, 6, 9], [3, 2, 1], [0, 1, 1, 2], [999998, 999999, 1000000, 1000001],
    *(_gappy_numbers(seed) for seed in range(8)),
])
def test_split_yaml_names_collapse_as_energon_collapses_them(numbers):
    from megatron.energon.bracecollapse import collapse

    for names in ([shard_name("train", n) for n in numbers], [shard_name(("train", "val")[n % 2], n) for n in numbers]):
        assert collapse_shard_names(names) == collapse(names, keep_order=True)


@pytest.mark.parametrize("split", ["train", "val"])
def test_energon_loader_yields_every_written_sample_of_a_split(sharded, split):
    from megatron.energon import Cooker, DefaultTaskEncoder, WorkerConfig, get_loader, get_val_dataset, stateless

    @stateless
    def cook(crude: dict) -> dict:
        return crude

    class Encoder(DefaultTaskEncoder):
        cookers = [Cooker(cook)]

    data = manifest(sharded)
    expected = {key for shard in data["shards"] if shard["split"] == split for key in _keys_of(sharded / shard["name"])}
    dataset_ = get_val_dataset(sharded, split_part=split, batch_size=None, task_encoder=Encoder(),
                               worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0))
    samples = list(get_loader(dataset_))
    assert len(samples) == data["splits"][split]["samples"] == len(expected) > 0
    assert {sample["__key__"] for sample in samples} == expected
    for sample in samples:
        assert sample["json"]["conversations"][0]["from"] == "human"
        has_image = "image" in sample["json"]
        assert has_image == ("jpg" in sample or "png" in sample)


def _keys_of(tar: Path) -> set[str]:
    with tarfile.open(tar) as archive:
        return {member.name.split(".", 1)[0] for member in archive}
