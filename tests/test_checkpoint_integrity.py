"""Damaged, incomplete and interrupted checkpoints are refused with clear errors, never half-trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_support import flip_byte, write_hf_model
from neva_core.checkpoint.convert import convert_hf_checkpoint
from neva_core.checkpoint.export import export_hf
from neva_core.checkpoint.layout import load_native_rank, read_native_config, verify_native
from neva_core.checkpoint.repartition import repartition
from neva_core.checkpoint.safetensors_stream import SafetensorsReader, StreamingWriter, TensorSpec
from neva_core.errors import NevaError

REPO = Path(__file__).resolve().parents[1]
RANK1 = "model-tp01-of02.safetensors"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("integrity") / "hf", "qwen2_tied")


@pytest.fixture
def native(hf_dir: Path, tmp_path: Path) -> Path:
    convert_hf_checkpoint(hf_dir, tmp_path / "native", tp=2)
    return tmp_path / "native"


def _all_readers_refuse(folder: Path, tmp_path: Path, message: str) -> None:
    with pytest.raises(NevaError, match=message):
        verify_native(folder, deep=True)
    with pytest.raises(NevaError, match=message):
        load_native_rank(folder, 1)
    with pytest.raises(NevaError, match=message):
        repartition(folder, tmp_path / "repartitioned", 1)
    with pytest.raises(NevaError, match=message):
        export_hf(folder, tmp_path / "exported")
    assert not (tmp_path / "repartitioned").exists() and not (tmp_path / "exported").exists()


def test_flipped_byte_is_refused_everywhere(native: Path, tmp_path: Path):
    # The last tensor of a tied model's rank file is the replicated final norm: without the checksum the
    # damage would surface as "rank 1 differs from rank 0"; the error must name the real cause.
    flip_byte(native / RANK1)
    _all_readers_refuse(native, tmp_path, f"{RANK1} does not match its blake3 in the manifest")
    verify_native(native, deep=False)  # the cheap check (sizes, headers) cannot see a flipped data byte
    load_native_rank(native, 0)  # the undamaged rank still loads


def test_sha256_manifest_of_older_versions_still_verifies(native: Path, tmp_path: Path):
    from neva_core.io import sha256_file

    manifest = json.loads((native / "manifest.json").read_text())
    assert all("blake3" in entry for entry in manifest["files"].values())
    manifest["files"] = {name: {"bytes": entry["bytes"], "sha256": sha256_file(native / name)}
                         for name, entry in manifest["files"].items()}
    (native / "manifest.json").write_text(json.dumps(manifest))
    verify_native(native, deep=True)
    assert load_native_rank(native, 1).keys() == load_native_rank(native, 0).keys()
    flip_byte(native / RANK1)
    _all_readers_refuse(native, tmp_path, f"{RANK1} does not match its sha256 in the manifest")


def test_truncated_file_is_refused_even_by_the_cheap_check(native: Path, tmp_path: Path):
    path = native / RANK1
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(NevaError, match=f"{RANK1} has .* bytes, the manifest says"):
        verify_native(native, deep=False)
    _all_readers_refuse(native, tmp_path, "the manifest says")


def test_missing_manifest_is_refused(native: Path, tmp_path: Path):
    (native / "manifest.json").unlink()
    _all_readers_refuse(native, tmp_path, "manifest.json is missing: .* is incomplete")
    with pytest.raises(NevaError, match="is incomplete"):
        read_native_config(native)


def test_edited_config_is_refused(native: Path, tmp_path: Path):
    config = json.loads((native / "config.json").read_text())
    config["model"]["rope_theta"] = 1.0
    (native / "config.json").write_text(json.dumps(config))
    _all_readers_refuse(native, tmp_path, "config.json")


def test_manifest_for_another_tp_size_is_refused(native: Path):
    manifest = json.loads((native / "manifest.json").read_text())
    del manifest["files"][RANK1]
    (native / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NevaError, match="manifest.json lists .*expected"):
        verify_native(native, deep=False)


_KILL_AFTER_WRITES = """
import os, signal, sys
from neva_core.checkpoint import safetensors_stream
from neva_core.checkpoint.convert import convert_hf_checkpoint

real_write = safetensors_stream.StreamingWriter.write
written = 0

def write_then_die(self, name, tensor):
    global written
    real_write(self, name, tensor)
    written += 1
    if written == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

safetensors_stream.StreamingWriter.write = write_then_die
convert_hf_checkpoint(sys.argv[1], sys.argv[2], tp=2)
"""


def test_conversion_killed_mid_run_leaves_nothing_trusted(hf_dir: Path, tmp_path: Path):
    out = tmp_path / "native"
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_WRITES, str(hf_dir), str(out), "9"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".native.tmp-")]
    assert any(leftover.glob("model-tp*.safetensors"))  # partial rank files, under a temporary name only
    for refuse in (lambda: verify_native(out), lambda: load_native_rank(out, 0), lambda: load_native_rank(leftover, 0)):
        with pytest.raises(NevaError):
            refuse()

    live = tmp_path / f".native.tmp-{os.getpid()}-0123abcd"  # a concurrent run's temporary: kept
    live.mkdir()
    convert_hf_checkpoint(hf_dir, out, tp=2)
    verify_native(out, deep=True)
    assert not leftover.exists() and live.exists()


# ---------------------------------------------------------------------------------------------
# The streaming safetensors writer and reader


def _specs() -> list[TensorSpec]:
    return [TensorSpec("a", torch.bfloat16, (3, 5)), TensorSpec("b", torch.float32, (7,)), TensorSpec("c", torch.int64, ())]


def test_streaming_writer_output_loads_with_official_library(tmp_path: Path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7), "c": torch.tensor(42)}
    with StreamingWriter(tmp_path / "x.safetensors", _specs(), {"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    official = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(official[n], tensors[n]) for n in tensors) and official.keys() == tensors.keys()
    with SafetensorsReader(tmp_path / "x.safetensors", hash_name="blake3") as reader:
        assert reader.metadata == {"format": "pt"}
        assert torch.equal(reader.read("b"), tensors["b"])  # out of order: the hash still covers every byte
        from neva_core.io import hash_file

        assert reader.digest() == hash_file(tmp_path / "x.safetensors", "blake3")


def test_streaming_writer_enforces_its_plan(tmp_path: Path):
    writer = StreamingWriter(tmp_path / "x.safetensors", _specs())
    with pytest.raises(NevaError, match="tensor 'b' written out of order; expected 'a' next"):
        writer.write("b", torch.zeros(7))
    with pytest.raises(NevaError, match="tensor 'a' is torch.float32 \\(3, 5\\), the plan says torch.bfloat16"):
        writer.write("a", torch.zeros(3, 5))
    writer.write("a", torch.zeros(3, 5, dtype=torch.bfloat16))
    with pytest.raises(NevaError, match="2 planned tensors were never written, first 'b'"):
        writer.close()


@pytest.mark.parametrize(
    ("damage", "message"),
    [(lambda data: data[:6], "only 6 bytes"), (lambda data: data[:-10], "does not match its shape or the file"),
     (lambda data: (10**9).to_bytes(8, "little") + data[8:], "header length 1000000000 does not fit"),
     (lambda data: data[:8] + b"[" + data[9:], "header is not JSON")],
)
def test_reader_rejects_damaged_files(tmp_path: Path, damage, message):
    with StreamingWriter(tmp_path / "x.safetensors", _specs()) as writer:
        for spec in _specs():
            writer.write(spec.name, torch.zeros(spec.shape, dtype=spec.dtype))
    path = tmp_path / "x.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(NevaError, match=message):
        SafetensorsReader(path)


def test_full_disk_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_space(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StreamingWriter, "_write_and_hash", no_space)
    writer = StreamingWriter(tmp_path / "x.safetensors", _specs())  # the header write fails in the background
    with pytest.raises(NevaError, match="cannot write .*x.safetensors: No space left on device; check the free disk"):
        writer.write("a", torch.zeros(3, 5, dtype=torch.bfloat16))
