"""megatron-energon metadata: identical to `energon prepare`, and read back by energon's own loader."""

from __future__ import annotations

import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest
from shard_support import dataset, faulty_dataset, manifest, record, valid_dataset

from neva_core.data.shards import shard_dataset


def index_rows(path: Path) -> list[list[tuple]]:
    with sqlite3.connect(path) as db:
        return [db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4").fetchall()
                for table in ("samples", "sample_parts")]


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
    assert index_rows(sharded / ".nv-meta/index.sqlite") == index_rows(tmp_path / ".nv-meta/index.sqlite")
    for meta in (".info.json", "split.yaml"):
        assert (sharded / ".nv-meta" / meta).read_text() == (tmp_path / ".nv-meta" / meta).read_text(), meta
    assert "CrudeWebdataset" in (sharded / ".nv-meta/dataset.yaml").read_text()


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
