"""Webdataset sharding: validation, determinism, resume after SIGKILL, manifest, CLI (neva_core.data.shards)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from shard_support import (
    assert_invariant,
    damaged_jpegs,
    dataset,
    faulty_dataset,
    image_bytes,
    image_name,
    index_rows,
    jpeg_bytes,
    jpeg_variants,
    manifest,
    record,
    shard_files,
    skipped_lines,
    tar_members,
    valid_dataset,
    write_folder,
    write_json,
    write_zip,
)

from neva_core import cli
from neva_core.data import direct_writer, images, shard_manifest, shard_pool, shards
from neva_core.data.image_source import ZipImageSource, ZipReader
from neva_core.data.images import ImageRejected, check_image
from neva_core.data.shard_manifest import read_shard_manifest
from neva_core.data.shard_plan import shard_name, split_of
from neva_core.data.shards import shard_dataset
from neva_core.data.tar_writer import tar_header
from neva_core.errors import NevaError
from neva_core.io import MANIFEST_NAME, is_temp_name, temp_name

REPO = Path(__file__).resolve().parent.parent


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file a run leaves that must be identical across runs (the sqlite index is compared by rows)."""
    names = [p for p in out.rglob("*") if p.is_file() and ".neva-shard" not in p.parts and p.name != "index.sqlite"]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(names)}


def test_valid_records_round_trip_through_webdataset(tmp_path):
    records, images = valid_dataset(12)
    records.insert(5, record("text-only", caption="no picture"))
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    result = shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=5, workers=1)

    assert (result.records, result.written, result.skipped, result.shards) == (13, 13, 0, 3)
    assert result.split_samples == {"train": 13, "val": 0}
    assert [s["name"] for s in manifest(tmp_path / "out")["shards"]] == [f"train-00000{i}.tar" for i in range(3)]
    urls = [str(tmp_path / "out" / f"train-00000{i}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [str(r["id"]) for r in records]
    for sample, original in zip(samples, records):
        assert json.loads(sample["json"]) == original
        if "image" in original:
            assert sample["jpg"] == images[original["image"]]
        else:
            assert "jpg" not in sample and "png" not in sample
    assert_invariant(tmp_path / "out")


def test_zip_and_folder_give_identical_shards(tmp_path):
    records, images, _ = faulty_dataset()
    json_path, zip_path, folder = dataset(tmp_path, records, images)
    deflated = write_zip(tmp_path / "deflated.zip", images, zipfile.ZIP_DEFLATED)
    (tmp_path / "outside.jpg").write_bytes(image_bytes(99))  # what "../outside.jpg" would reach from the folder
    results = [shard_dataset(json_path, source, tmp_path / f"out-{i}", maxcount=4, workers=1)
               for i, source in enumerate((zip_path, folder, deflated))]
    assert results[0].written == results[1].written == results[2].written > 0
    assert shard_files(tmp_path / "out-0") == shard_files(tmp_path / "out-1") == shard_files(tmp_path / "out-2")
    reasons = [[line["reason"] for line in skipped_lines(tmp_path / f"out-{i}")] for i in range(3)]
    assert reasons[0] == reasons[1] == reasons[2]


def test_every_fault_is_skipped_with_its_reason_and_the_invariant_holds(tmp_path):
    records, images, expected = faulty_dataset()
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    result = shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=4, workers=1)
    out = tmp_path / "out"

    assert {line["index"]: line["reason"] for line in skipped_lines(out)} == {
        i: reason for i, reason in enumerate(expected) if reason
    }
    assert result.skipped == sum(1 for reason in expected if reason)
    assert result.written == expected.count(None)
    assert result.converted_by_reason == {"bmp": 1, "gif": 1}
    assert manifest(out)["relabeled_by_format"] == {"png_named_jpg": 1}
    data = assert_invariant(out)
    assert data["skipped_by_reason"]["corrupt_image"] == 4

    members = dict(member for shard in data["shards"] for member in tar_members(out / shard["name"]))
    assert members["png-as-jpg.png"] == images["odd/png-named.jpg"]  # original bytes, real extension
    assert members["trailer.jpg"] == images["odd/trailer.jpg"]
    gif = Image.open(io.BytesIO(members["gif-as-jpg.png"]))
    assert (gif.format, gif.mode, gif.size) == ("PNG", "RGB", (24, 16))
    assert json.loads(members["a%2Eb.json"])["id"] == "a.b"  # the key is encoded, the record is untouched
    assert json.loads(members["dup.json"])["image"] == "dup/first.jpg"  # the first of two duplicates wins
    assert "text-only.json" in members and not any(name.startswith("text-only.") and name != "text-only.json"
                                                    for name in members)
    by_index = {line["index"]: line for line in skipped_lines(out)}
    assert by_index[9]["id"] == "dup" and "already used by record 8" in by_index[9]["detail"]
    assert "escapes the image root" in by_index[17]["detail"]


def test_all_bad_dataset_writes_no_shard_but_a_complete_manifest(tmp_path):
    records = [record(f"m{i}", f"missing/{i}.jpg") for i in range(5)] + [{"id": "x"}, "not a record"]
    json_path, zip_path, _ = dataset(tmp_path, records, {"unrelated.jpg": image_bytes(0)})
    result = shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=2, workers=2)
    assert (result.records, result.written, result.skipped, result.shards) == (7, 0, 7, 0)
    assert result.skipped_by_reason == {"bad_conversations": 1, "missing_image": 5, "not_an_object": 1}
    assert list((tmp_path / "out").glob("*.tar")) == []
    assert_invariant(tmp_path / "out")
    assert read_shard_manifest(tmp_path / "out")["written"] == 0


def test_output_is_byte_identical_for_one_and_three_workers_and_across_runs(tmp_path):
    records, images = valid_dataset(40)
    faulty_records, faulty_images, _ = faulty_dataset()
    json_path, zip_path, _ = dataset(tmp_path, records + faulty_records, images | faulty_images)
    runs, indexes = {}, {}
    for name, workers in (("one", 1), ("three", 3), ("again", 3)):
        shard_dataset(json_path, zip_path, tmp_path / name, maxcount=6, workers=workers, val_fraction=0.25)
        runs[name] = output_bytes(tmp_path / name)
        indexes[name] = index_rows(tmp_path / name / ".nv-meta/index.sqlite")
    assert runs["one"] == runs["three"] == runs["again"]
    assert indexes["one"] == indexes["three"] == indexes["again"]  # rows in the same order, too
    data = assert_invariant(tmp_path / "one")
    assert data["splits"]["val"]["samples"] > 0 and data["splits"]["train"]["samples"] > 0
    assert any(name.startswith("val-") for name in runs["one"])


def test_split_assignment_is_stable_when_records_are_added():
    keys = [f"{i:09d}" for i in range(2000)]
    before = {key: split_of(key, 0.1, 0) for key in keys[:1000]}
    assert all(split_of(key, 0.1, 0) == split for key, split in before.items())
    val_share = sum(split_of(key, 0.1, 0) == "val" for key in keys) / len(keys)
    assert 0.07 < val_share < 0.13
    assert {key for key in keys if split_of(key, 0.1, 1) == "val"} != {k for k in keys if split_of(k, 0.1, 0) == "val"}
    assert all(split_of(key, 0.0, 0) == "train" for key in keys)


@pytest.mark.parametrize("name, size", [
    ("000000001.jpg", 0), ("000000001.json", 511), ("k.png", 512), ("x" * 95 + ".json", 10**9),
    ("x" * 120 + ".jpg", 3), ("caf\u00e9.json", 7), ("k.jpg", 8**11),
])
def test_tar_headers_match_what_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
    assert tar_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_long_and_non_ascii_keys_read_back(tmp_path):
    long_id, accented = "L" * 150, "caf\u00e9-\u4e2d"
    records = [record(long_id, "a.jpg"), record(accented, "b.jpg")]
    json_path, zip_path, _ = dataset(tmp_path, records, {"a.jpg": image_bytes(1), "b.jpg": image_bytes(2)})
    shard_dataset(json_path, zip_path, tmp_path / "out", workers=1)
    samples = list(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [long_id, accented]


def test_rerun_with_same_inputs_is_a_no_op(tmp_path):
    records, images = valid_dataset(6)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    first = shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=4, workers=1)
    before = output_bytes(tmp_path / "out")
    again = shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=4, workers=2)
    assert again.already_complete and not first.already_complete
    assert (again.written, again.shards, again.reused_shards) == (6, 2, 2)
    assert output_bytes(tmp_path / "out") == before


@pytest.mark.parametrize("change", [{"maxcount": 3}, {"val_fraction": 0.5}, {"json": True}, {"images": True}])
def test_rerun_with_other_inputs_or_parameters_recomputes(tmp_path, change):
    records, images = valid_dataset(6)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    out = tmp_path / "out"
    shard_dataset(json_path, zip_path, out, maxcount=4, workers=1)
    if change.pop("json", False):
        write_json(json_path, records[:-1])
    if change.pop("images", False):
        write_zip(zip_path, images | {"extra.jpg": image_bytes(50)})
    again = shard_dataset(json_path, zip_path, out, workers=1, **({"maxcount": 4} | change))
    reference = shard_dataset(json_path, zip_path, tmp_path / "reference", workers=1, **({"maxcount": 4} | change))
    assert not again.already_complete and again.reused_shards == 0
    assert output_bytes(out) == output_bytes(tmp_path / "reference")
    assert again.written == reference.written


def test_a_folder_not_written_by_shard_is_refused(tmp_path):
    records, images = valid_dataset(2)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(NevaError, match="did not write"):
        shard_dataset(json_path, zip_path, tmp_path / "out", workers=1)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def killed_run_folder(out: Path) -> Path:
    """Turn a finished shard folder into what a run killed on this host leaves: its temporary folder."""
    dead_pid = 2**22 + 4321  # above the kernel's pid_max: no such process
    killed = out.with_name(temp_name(out).name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    out.rename(killed)
    (killed / MANIFEST_NAME).unlink()
    return killed


def test_resume_redoes_unrecorded_or_damaged_shards_and_removes_temporaries(tmp_path):
    records, images = valid_dataset(20)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    shard_dataset(json_path, zip_path, tmp_path / "reference", maxcount=4, workers=1)
    out = tmp_path / "out"
    shard_dataset(json_path, zip_path, out, maxcount=4, workers=1)
    # What a killed run can leave: no manifest, a tar without its record, a cut tar, temporaries.
    killed = killed_run_folder(out)
    (killed / ".neva-shard" / "train-000001.json").unlink()
    (killed / "train-000002.tar").write_bytes((killed / "train-000002.tar").read_bytes()[:1000])
    (killed / ".train-000003.tar.tmp-1-deadbeef").write_bytes(b"partial")
    (killed / ".neva-shard" / ".train-000004.json.tmp-1-deadbeef").write_text("{")
    (killed / ".nv-meta" / ".index.sqlite.tmp-1-deadbeef").write_bytes(b"\0")
    (killed / "train-000004.tar.idx").unlink()  # a tar and record whose index is gone: redone as well

    result = shard_dataset(json_path, zip_path, out, maxcount=4, workers=2)
    assert result.reused_shards == 2 and not result.already_complete
    assert output_bytes(out) == output_bytes(tmp_path / "reference")
    assert index_rows(out / ".nv-meta/index.sqlite") == index_rows(tmp_path / "reference/.nv-meta/index.sqlite")
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_killed_run_on_other_parameters_is_not_resumed(tmp_path):
    records, images = valid_dataset(8)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    shard_dataset(json_path, zip_path, tmp_path / "reference", maxcount=3, workers=1)
    shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=4, workers=1)
    killed_run_folder(tmp_path / "out")
    result = shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=3, workers=1)
    assert result.reused_shards == 0
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "reference")


def test_damaged_shard_after_completion_is_detected_and_rewritten(tmp_path):
    records, images = valid_dataset(8)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    out = tmp_path / "out"
    shard_dataset(json_path, zip_path, out, maxcount=4, workers=1)
    good = output_bytes(out)
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-10240])
    with pytest.raises(NevaError, match="has .* bytes, the manifest says"):
        read_shard_manifest(out)
    result = shard_dataset(json_path, zip_path, out, maxcount=4, workers=1)
    assert result.reused_shards == 0 and output_bytes(out) == good  # rebuilt beside, then swapped in


def test_read_shard_manifest_checks_hashes_when_deep(tmp_path):
    records, images = valid_dataset(3)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    out = tmp_path / "out"
    shard_dataset(json_path, zip_path, out, workers=1)
    assert read_shard_manifest(out, deep=True)["written"] == 3
    data = bytearray((out / "train-000000.tar").read_bytes())
    data[600] ^= 0xFF  # same size, other content
    (out / "train-000000.tar").write_bytes(bytes(data))
    assert read_shard_manifest(out)["written"] == 3
    with pytest.raises(NevaError, match="does not match its sha256"):
        read_shard_manifest(out, deep=True)
    (out / ".nv-meta" / "split.yaml").unlink()
    with pytest.raises(NevaError, match="megatron-energon metadata"):
        read_shard_manifest(out)


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_result(tmp_path):
    count, maxcount = 4000, 20
    records = [record(f"{i:06d}", image_name(i), tag_first=i % 2 == 0) for i in range(count)]
    images = {image_name(i): image_bytes(i % 50) for i in range(count)}
    images.pop(image_name(7))  # a skip inside the first shard, so per-shard skip records are resumed too
    json_path = write_json(tmp_path / "data.json", records)
    zip_path = write_zip(tmp_path / "images.zip", images)
    out = tmp_path / "killed"
    code = (f"from neva_core.data.shards import shard_dataset; "
            f"shard_dataset({str(json_path)!r}, {str(zip_path)!r}, {str(out)!r}, maxcount={maxcount}, workers=2)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".killed.tmp-*/.neva-shard/train-*.json")) and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the whole run: parent and workers, like a lost machine
        child.wait()
    done = len(list(tmp_path.glob(".killed.tmp-*/.neva-shard/train-*.json")))
    assert 0 < done < count // maxcount and not out.exists()

    resumed = shard_dataset(json_path, zip_path, out, maxcount=maxcount, workers=2)
    reference = shard_dataset(json_path, zip_path, tmp_path / "reference", maxcount=maxcount, workers=1)
    assert resumed.reused_shards >= done
    assert (resumed.written, resumed.skipped) == (reference.written, reference.skipped) == (count - 1, 1)
    assert output_bytes(out) == output_bytes(tmp_path / "reference")
    assert index_rows(out / ".nv-meta/index.sqlite") == index_rows(tmp_path / "reference/.nv-meta/index.sqlite")
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert read_shard_manifest(out, deep=True)["written"] == count - 1


@pytest.mark.parametrize("kwargs, message", [
    ({"maxcount": 0}, "--maxcount must be a positive integer"),
    ({"val_fraction": 1.0}, r"--val-fraction must be in \[0, 1\)"),
    ({"workers": 0}, "--workers must be a positive integer"),
    ({"image_prefix": "train2017"}, "--image-prefix 'train2017' must be a relative folder path ending with '/'"),
    ({"image_prefix": "../x/"}, "without '..'"),
])
def test_bad_parameters_are_clear_errors(tmp_path, kwargs, message):
    records, images = valid_dataset(1)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    with pytest.raises(NevaError, match=message):
        shard_dataset(json_path, zip_path, tmp_path / "out", **kwargs)


def test_an_image_prefix_finds_records_bare_names_under_the_archives_folder(tmp_path):
    """COCO's train2017.zip holds train2017/<file>; LLaVA-Instruct-150K's records name <file>."""
    records, images = valid_dataset(4)
    json_path, _, _ = dataset(tmp_path, records, images)
    inside = {f"train2017/{name}": data for name, data in images.items()}
    for images_path in (write_zip(tmp_path / "train2017.zip", inside), write_folder(tmp_path / "coco", inside)):
        prefixed = shard_dataset(json_path, images_path, tmp_path / f"out-{images_path.name}", workers=1,
                                 image_prefix="train2017/")
        assert (prefixed.written, prefixed.skipped) == (4, 0)
        # The samples are the same bytes as from an archive whose entries are the records' own names.
        assert shard_files(Path(prefixed.out_dir)) == shard_files(
            Path(shard_dataset(json_path, tmp_path / "images.zip", tmp_path / "out-plain", workers=1).out_dir))
    unprefixed = shard_dataset(json_path, tmp_path / "train2017.zip", tmp_path / "out-missing", workers=1)
    assert (unprefixed.written, unprefixed.skipped_by_reason) == (0, {"missing_image": 4})


def test_missing_inputs_and_a_non_zip_are_clear_errors(tmp_path):
    json_path = write_json(tmp_path / "data.json", [])
    with pytest.raises(NevaError, match="--json .* does not exist"):
        shard_dataset(tmp_path / "absent.json", tmp_path, tmp_path / "out")
    with pytest.raises(NevaError, match="--images .* does not exist"):
        shard_dataset(json_path, tmp_path / "absent.zip", tmp_path / "out")
    (tmp_path / "fake.zip").write_bytes(b"not a zip at all")
    with pytest.raises(NevaError, match="is not a zip archive"):
        shard_dataset(json_path, tmp_path / "fake.zip", tmp_path / "out")


def test_cli_writes_shards_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("shard",))  # only this stage's command is under test
    records, images, _ = faulty_dataset()
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    code = cli.main(["shard", "--json", str(json_path), "--images", str(zip_path), "--out", str(tmp_path / "out"),
                     "--workers", "1", "--maxcount", "5", "--val-fraction", "0.2", "--split-seed", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"of {len(records)} records written" in printed and "duplicate_id 1" in printed
    assert "converted to PNG: bmp 1, gif 1" in printed
    assert manifest(tmp_path / "out")["params"] == {"maxcount": 5, "val_fraction": 0.2, "split_seed": 3,
                                                    "image_prefix": ""}


def test_cli_errors_exit_2_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("shard",))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1},, ]')
    zip_path = write_zip(tmp_path / "images.zip", {"a.jpg": image_bytes(0)})
    assert cli.main(["shard", "--json", str(bad), "--images", str(zip_path), "--out", str(tmp_path / "out")]) == 2
    assert f"{bad} has a JSON syntax error: Expecting value (at byte 11)" in capsys.readouterr().err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_cli_help_explains_every_option(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("shard",))
    with pytest.raises(SystemExit):
        cli.main(["shard", "--help"])
    text = capsys.readouterr().out
    for option in ("--json", "--images", "--out", "--workers", "--maxcount", "--val-fraction", "--split-seed"):
        assert option in text


def test_cli_and_flow_share_one_val_fraction_default(monkeypatch, capsys):
    import inspect

    from neva_core.config import DatasetConfig
    from tasks.data import shard_task

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("shard",))
    with pytest.raises(SystemExit):
        cli.main(["shard", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0, as in the flow: every record trains" in help_text
    defaults = {
        "library": inspect.signature(shard_dataset).parameters["val_fraction"].default,
        "task": inspect.signature(shard_task.fn).parameters["val_fraction"].default,
        "flow config": DatasetConfig().val_fraction,
    }
    assert defaults == dict.fromkeys(defaults, 0.0)
    assert "every record trains" in DatasetConfig.model_fields["val_fraction"].description


def test_in_flight_work_is_bounded(tmp_path, monkeypatch):
    """The parent stops reading the JSON while 2 x workers shards are queued."""
    records, images = valid_dataset(30)
    json_path, zip_path, _ = dataset(tmp_path, records, images)
    submitted, peak = [], []
    real_plan = shards.plan_tasks

    def counting_plan(*args):
        for task in real_plan(*args):
            submitted.append(task.name)
            yield task

    real_wait = shard_pool.wait

    def watching_wait(futures, **kwargs):
        peak.append(len(futures))
        return real_wait(futures, **kwargs)

    monkeypatch.setattr(shards, "plan_tasks", counting_plan)
    monkeypatch.setattr(shard_pool, "wait", watching_wait)
    shard_dataset(json_path, zip_path, tmp_path / "out", maxcount=1, workers=2)
    assert len(submitted) == 30 and max(peak) <= 4


def test_zip_index_reads_zip64_and_prefixed_archives(tmp_path):
    count = 70000  # more entries than a plain zip's 16-bit count: a zip64 end record
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i // 1000:05d}/{i}.txt", str(i))
    source = ZipImageSource(path)
    reader = ZipReader(str(path))
    assert len(source) == count
    assert reader.read(source.locate("00069/69999.txt"), "x") == b"69999"
    assert source.locate("00069/70000.txt") is None

    prefixed = tmp_path / "prefixed.zip"  # a self-extractor: bytes before the archive shift every offset
    archive_bytes = write_zip(tmp_path / "small.zip", {"a/b.jpg": b"abc"}).read_bytes()
    prefixed.write_bytes(b"#!/bin/sh\nexit 0\n" * 100 + archive_bytes)
    assert ZipReader(str(prefixed)).read(ZipImageSource(prefixed).locate("a/b.jpg"), "a/b.jpg") == b"abc"


def damaged_scan_byte(jpeg: bytes) -> bytes:
    """`jpeg` with one byte of its entropy-coded scan changed: every marker stays valid."""
    scan = jpeg.index(b"\xff\xda") + 2 + int.from_bytes(jpeg[jpeg.index(b"\xff\xda") + 2:][:2], "big")
    at = next(i for i in range(scan + 8, len(jpeg) - 2) if jpeg[i - 1] != 0xFF and jpeg[i] not in (0xFF, 0xFE))
    return jpeg[:at] + bytes([jpeg[at] ^ 0x01]) + jpeg[at + 1:]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_member_failing_its_crc_is_skipped_not_sharded(tmp_path, method):
    good, victim = image_bytes(1), image_bytes(2)
    damaged = damaged_scan_byte(victim)
    assert check_image(damaged, "b.jpg").data == damaged  # the markers alone cannot tell
    # The archive holds the damaged body under the CRC-32 of the intact one (local header and directory).
    zip_path = write_zip(tmp_path / "images.zip", {"a.jpg": good, "b.jpg": damaged}, method)
    raw = zip_path.read_bytes()
    damaged_crc, intact_crc = (zlib.crc32(data).to_bytes(4, "little") for data in (damaged, victim))
    assert raw.count(damaged_crc) == 2
    zip_path.write_bytes(raw.replace(damaged_crc, intact_crc))
    json_path = write_json(tmp_path / "data.json", [record("good", "a.jpg"), record("bad", "b.jpg")])
    result = shard_dataset(json_path, zip_path, tmp_path / "out", workers=1)
    assert (result.written, result.skipped_by_reason) == (1, {"corrupt_image": 1})
    assert "CRC-32" in skipped_lines(tmp_path / "out")[0]["detail"]
    assert all(data != damaged for _, data in tar_members(tmp_path / "out" / "train-000000.tar"))


def test_backslashes_in_zip_entries_are_one_error_for_sharding_and_unzip(tmp_path):
    from neva_core.data.archive import unzip

    zip_path = write_zip(tmp_path / "images.zip", {"dir\\a.jpg": image_bytes(1)})
    json_path = write_json(tmp_path / "data.json", [record("a", "dir/a.jpg")])
    message = r"entry 'dir\\\\a.jpg' contains a backslash \(a Windows path separator\); zip entries must use '/'"
    with pytest.raises(NevaError, match=message):
        shard_dataset(json_path, zip_path, tmp_path / "out", workers=1)
    with pytest.raises(NevaError, match=message):
        unzip(zip_path, tmp_path / "images")
    assert not (tmp_path / "out" / MANIFEST_NAME).exists() and not (tmp_path / "images").exists()


def test_zip_entries_with_other_compression_are_skipped_not_fatal(tmp_path):
    records = [record("plain", "plain.jpg"), record("squeezed", "squeezed.jpg")]
    zip_path = tmp_path / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("plain.jpg", image_bytes(1))
        archive.writestr("squeezed.jpg", image_bytes(2), compress_type=zipfile.ZIP_BZIP2)
    json_path = write_json(tmp_path / "data.json", records)
    result = shard_dataset(json_path, zip_path, tmp_path / "out", workers=1)
    assert (result.written, result.skipped_by_reason) == (1, {"unreadable_image": 1})
    assert "compression method 12" in skipped_lines(tmp_path / "out")[0]["detail"]


# --- the JPEG header fast path -------------------------------------------------------------------------


def verdict(data: bytes, name: str = "x.jpg") -> tuple:
    """What check_image makes of `data`: kept (member and bytes) or rejected (reason and message)."""
    try:
        image = check_image(data, name)
    except ImageRejected as exc:
        return ("rejected", exc.reason, exc.detail)
    return ("kept", image.extension, image.data, image.converted_from, image.relabeled)


def pillow_verdict(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """The verdict with every header parsed by Pillow, as before the fast path existed."""
    with monkeypatch.context() as patch:
        patch.setattr(images, "_plain_jpeg_scan_start", lambda data: None)
        return verdict(data)


def start_of_frame(data: bytes) -> int:
    """Offset of the SOF0/SOF2 marker's payload (precision byte) in a Pillow-written JPEG."""
    return min(at for at in (data.find(b"\xff\xc0"), data.find(b"\xff\xc2")) if at > 0) + 4


def patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def test_jpeg_fast_path_gives_pillows_verdict_on_good_and_damaged_files(monkeypatch):
    cases = [damaged for seed, good in enumerate(jpeg_variants()) for damaged in damaged_jpegs(good, seed)]
    vouched = sum(images._plain_jpeg_scan_start(data) is not None for data in cases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some of the damage
        fast = [verdict(data) for data in cases]
        assert [pillow_verdict(data, monkeypatch) for data in cases] == fast
    assert 0.2 * len(cases) < vouched < 0.9 * len(cases)  # both paths were taken ...
    assert {v[0] for v in fast} == {"kept", "rejected"}  # ... and both verdicts given


@pytest.mark.parametrize("options", [
    {}, {"progressive": True}, {"mode": "L"}, {"mode": "CMYK"}, {"subsampling": 0}, {"subsampling": 2},
    {"icc_profile": bytes(300)}, {"comment": b"note"}, {"dpi": (72, 72)}, {"size": (1, 1)},
])
def test_common_jpegs_are_vouched_for_without_pillow(options):
    data = jpeg_bytes(options.pop("mode", "RGB"), options.pop("size", (24, 16)), **options)
    assert images._plain_jpeg_scan_start(data) is not None
    assert verdict(data) == ("kept", "jpg", data, None, None)


@pytest.mark.parametrize("damage, reason", [
    ("truncated_header", "corrupt_image"),
    ("garbage_after_soi", "corrupt_image"),
    ("zero_width", "corrupt_image"),
    ("12_bit", "corrupt_image"),
    ("two_components", "corrupt_image"),
    ("exif", "kept"),
    ("beyond_pillows_pixel_limit", "corrupt_image"),
])
def test_unusual_jpeg_headers_are_left_to_pillow(damage, reason, monkeypatch):
    exif = Image.Exif()
    exif[0x0110] = "camera"
    good = jpeg_bytes(size=(40, 30))
    sof = start_of_frame(good)
    data = {
        "truncated_header": good[:sof + 3],
        "garbage_after_soi": good[:3] + bytes(range(7, 60)) + good[3:],
        "zero_width": patched(good, sof + 3, b"\0\0"),
        "12_bit": patched(good, sof, b"\x0c"),
        "two_components": patched(good, sof + 5, b"\x02"),
        "exif": jpeg_bytes(size=(40, 30), exif=exif.tobytes()),
        "beyond_pillows_pixel_limit": good,
    }[damage]
    if damage == "beyond_pillows_pixel_limit":
        monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 500)  # 40 x 30 > 2 x 500: a decompression bomb
    assert images._plain_jpeg_scan_start(data) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = verdict(data)
        assert got == pillow_verdict(data, monkeypatch)
    assert got[:2] == (("kept", "jpg") if reason == "kept" else ("rejected", reason))


# --- shard writing: direct I/O, errors, the order of the sample index ------------------------------------


def chunked_write(path: Path, pieces: list[bytes]) -> str:
    """Write `pieces` through a ChunkedWriter; returns its sha256."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    writer = direct_writer.ChunkedWriter(fd)
    try:
        for piece in pieces:
            writer.write(piece)
        return writer.flush()
    finally:
        writer.close()
        os.close(fd)


def random_pieces(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([0, 1, 511, 512, 700, 8192, 20000])) for _ in range(60)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(direct_writer, "_CHUNK", 8192)  # many whole chunks from little data


@pytest.mark.parametrize("direct_io", ["as the file system allows", "refused"])
def test_chunked_writer_writes_and_hashes_every_byte_in_order(tmp_path, small_chunks, monkeypatch, direct_io):
    if direct_io == "refused":  # tmpfs and some network file systems
        monkeypatch.setattr(direct_writer, "_set_direct_io", lambda fd, enable: False)
    pieces = random_pieces(1)
    digest = chunked_write(tmp_path / "out", pieces)
    expected = b"".join(pieces)
    assert len(expected) > 10 * 8192
    assert (tmp_path / "out").read_bytes() == expected and digest == hashlib.sha256(expected).hexdigest()


def test_chunked_writer_goes_on_through_the_cache_when_a_direct_write_is_refused(tmp_path, small_chunks, monkeypatch):
    monkeypatch.setattr(direct_writer, "_set_direct_io", lambda fd, enable: enable)  # direct I/O seems on ...
    real_write, refused = os.write, []

    def write(fd: int, data: memoryview) -> int:
        if not refused:  # ... but the first write is refused, as an alignment the device rejects would be
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    pieces = random_pieces(2)
    digest = chunked_write(tmp_path / "out", pieces)
    assert refused == [8192]
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)
    assert digest == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_failed_shard_write_is_a_clear_error_and_a_rerun_finishes(tmp_path, small_chunks, monkeypatch):
    records, images_ = valid_dataset(12)
    json_path, zip_path, _ = dataset(tmp_path, records, images_)
    shard_dataset(json_path, zip_path, tmp_path / "reference", maxcount=5, workers=1)
    out = tmp_path / "out"

    def no_space(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", no_space)  # the disk fills up under the writer thread
        with pytest.raises(NevaError, match=r"cannot write .*train-000000.tar: No space left on device \(disk full"):
            shard_dataset(json_path, zip_path, out, maxcount=5, workers=1)
    assert not [p for p in out.rglob("*") if is_temp_name(p)] and not list(out.glob("*.tar"))
    shard_dataset(json_path, zip_path, out, maxcount=5, workers=1)
    assert output_bytes(out) == output_bytes(tmp_path / "reference")


def test_shards_are_indexed_in_info_json_order_whatever_order_they_finish(tmp_path):
    class Index:  # stands in for SampleIndexWriter: records the order shards are added in
        def __init__(self) -> None:
            self.added: list[str] = []

        def add_shard(self, layout: dict) -> None:
            self.added.append(layout["keys"][0].split("/")[0])

    samples = {("train", 0): 2, ("train", 1): 0, ("train", 2): 1, ("train", 3): 3, ("val", 0): 1, ("val", 1): 2}
    records = {}
    for (split, number), count in samples.items():
        name = shard_name(split, number)
        layout = {"keys": [f"{name}/{i}" for i in range(count)]}
        shard_manifest.write_json(shard_manifest.record_path(tmp_path, name), {"layout": layout})
        records[name] = {"name": name, "split": split, "samples": count}
    index = Index()
    indexer = shards.InOrderIndexer(index, tmp_path)
    added_so_far = []
    for name in ("train-000002.tar", "val-000000.tar", "train-000000.tar", "train-000003.tar", "train-000001.tar",
                 "val-000001.tar"):
        indexer.finished(records[name])
        added_so_far.append(len(index.added))
    indexer.add_val_shards(sorted(records.values(), key=lambda r: r["name"]))
    assert added_so_far == [0, 0, 1, 1, 3, 3]
    # The empty train-000001 has no place in .info.json, so no tar_file_id either.
    assert index.added == [
        "train-000000.tar", "train-000002.tar", "train-000003.tar", "val-000000.tar", "val-000001.tar",
    ]


def test_the_shard_stage_imports_neither_torch_nor_energon(tmp_path):
    records, images_ = valid_dataset(3)
    json_path, zip_path, _ = dataset(tmp_path, records, images_)
    code = (f"import sys; from neva_core.data.shards import shard_dataset; "
            f"shard_dataset({str(json_path)!r}, {str(zip_path)!r}, {str(tmp_path / 'out')!r}, workers=1); "
            f"print(sorted({{name.split('.')[0] for name in sys.modules}} & {{'torch', 'megatron'}}))")
    printed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"  # importing torch alone costs ~2 s of CPU
    assert (tmp_path / "out" / ".nv-meta" / "index.sqlite").is_file()
