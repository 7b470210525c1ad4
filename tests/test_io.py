import os
from pathlib import Path

import pytest

from neva_core.errors import NevaError
from neva_core.io import (
    atomic_dir,
    atomic_file,
    file_entry,
    read_manifest,
    remove_stale_temps,
    temp_name,
    verify_files,
    write_manifest,
)


def test_atomic_file_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(dest) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_publishes_whole_and_never_overwrites(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
        assert not dest.exists()
    assert (dest / "a").read_text() == "1"
    with pytest.raises(NevaError, match="already exists"):
        with atomic_dir(dest):
            pass


def test_manifest_catches_missing_resized_and_altered_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abcd")
    write_manifest(tmp_path, {"files": {"a.bin": file_entry(tmp_path / "a.bin")}})
    files = read_manifest(tmp_path)["files"]
    verify_files(tmp_path, files)
    (tmp_path / "a.bin").write_bytes(b"abcx")
    verify_files(tmp_path, files, check_hash=False)  # the cheap check sees only sizes
    with pytest.raises(NevaError, match="sha256"):
        verify_files(tmp_path, files)
    (tmp_path / "a.bin").write_bytes(b"abc")
    with pytest.raises(NevaError, match="has 3 bytes"):
        verify_files(tmp_path, files)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(NevaError, match="incomplete"):
        read_manifest(tmp_path)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    live = temp_name(dest)  # this process: still writing
    live.mkdir()
    dead_pid = 2**22 + 12345  # above the kernel's pid_max: no such process
    dead = tmp_path / f".shards.tmp-{dead_pid}-0123abcd"
    (dead / "sub").mkdir(parents=True)
    other = tmp_path / f".other.tmp-{dead_pid}-0123abcd"
    other.write_bytes(b"x")
    remove_stale_temps(tmp_path, dest.name)
    assert live.exists() and not dead.exists() and other.exists()
    remove_stale_temps(tmp_path)
    assert live.exists() and not other.exists()
    assert os.getpid() == int(live.name.split("-")[1])
