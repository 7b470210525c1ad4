import json
import os
from pathlib import Path

from neva_core.fingerprint import cache_key, path_fingerprint


def test_file_fingerprint_follows_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text("[1]")
    first = path_fingerprint(path)
    assert path_fingerprint(path) == first
    path.write_text("[12]")
    assert path_fingerprint(path) != first
    # Same size, new mtime: still a change (no content read, so mtime stands in for it).
    before = path_fingerprint(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert path_fingerprint(path) != before


def test_folder_with_manifest_follows_its_files_too(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a.tar": {"sha256": "1"}}}))
    first = path_fingerprint(tmp_path)
    # A temporary file of an interrupted writer does not change what the folder holds.
    (tmp_path / ".b.tar.tmp-host-1-0123abcd").write_bytes(b"partial")
    assert path_fingerprint(tmp_path) == first
    # A file edited in place, manifest untouched (same size, new mtime): a different folder.
    stat = (tmp_path / "a.tar").stat()
    os.utime(tmp_path / "a.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = path_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a.tar": {"sha256": "2"}}}))
    assert path_fingerprint(tmp_path) != second


def test_folder_without_manifest_is_keyed_by_listing(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes(b"1")
    first = path_fingerprint(tmp_path)
    (tmp_path / "sub" / "y.jpg").write_bytes(b"2")
    assert path_fingerprint(tmp_path) != first
    assert path_fingerprint(tmp_path / "nothing-here") == "missing"


def test_cache_key_depends_on_stage_params_and_content(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"abc")
    key = cache_key("shard", src=src, maxcount=10)
    assert key == cache_key("shard", src=src, maxcount=10)
    assert key != cache_key("shard", src=src, maxcount=11)
    assert key != cache_key("convert", src=src, maxcount=10)
    src.write_bytes(b"abcd")
    assert key != cache_key("shard", src=src, maxcount=10)


def test_code_version_covers_tasks_flows_and_output_dependencies(monkeypatch) -> None:
    import importlib.metadata

    import neva_core.fingerprint as fingerprint

    assert set(fingerprint.dependency_versions("shard")) == {"pillow", "megatron-energon", "webdataset"}
    assert "tokenizers" in fingerprint.dependency_versions("extend-tokenizer")
    before = {stage: fingerprint.code_version(stage) for stage in ("shard", "convert")}
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "pillow" else real_version(name))
    assert fingerprint.code_version("shard") != before["shard"]
    assert fingerprint.code_version("convert") == before["convert"]  # Pillow does not shape checkpoints
    fingerprint.source_version.cache_clear()
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: real_read(self) + (b"#" if self.name == "neva.py" and self.parent.name == "flows" else b""))
    try:
        assert fingerprint.code_version("convert") != before["convert"]  # flows/ is part of the code
    finally:
        fingerprint.source_version.cache_clear()
