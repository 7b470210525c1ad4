import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from neva_core.errors import NevaError
from neva_core.io import (
    atomic_dir,
    atomic_file,
    commit_output,
    file_entry,
    file_lock,
    lock_path,
    prune_outputs,
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


DEAD_PID = 2**22 + 12345  # above the kernel's pid_max: no such process


def foreign_temp(dest: Path, host: str, pid: int) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{host}-{pid}-0123abcd")


def this_hosts_temp(dest: Path, pid: int) -> Path:
    return dest.with_name(temp_name(dest).name.replace(f"-{os.getpid()}-", f"-{pid}-"))


def test_stale_temporaries_of_dead_writers_are_removed_but_never_another_hosts(tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    live = temp_name(dest)  # this process: still writing
    live.mkdir()
    dead = this_hosts_temp(dest, DEAD_PID)
    (dead / "sub").mkdir(parents=True)
    legacy = tmp_path / f".shards.tmp-{DEAD_PID}-0123abcd"  # written before names carried the host
    legacy.mkdir()
    other_host = foreign_temp(dest, "gpu-node-7", DEAD_PID)  # its pid means nothing here
    other_host.mkdir()
    other = this_hosts_temp(tmp_path / "other", DEAD_PID)
    other.write_bytes(b"x")
    remove_stale_temps(tmp_path, dest.name)
    assert live.exists() and not dead.exists() and not legacy.exists() and other.exists()
    assert other_host.exists()
    remove_stale_temps(tmp_path)
    assert live.exists() and not other.exists() and other_host.exists()
    assert f"-{os.getpid()}-" in live.name and socket.gethostname().replace("-", "_") in live.name


def reuse_marker(wanted: str):
    def reuse(found: Path) -> str | None:
        if not (found / "params").is_file():
            raise NevaError(f"{found} is not ours")
        return "reused" if (found / "params").read_text() == wanted else None
    return reuse


def build_with(params: str, calls: list[str] | None = None, fail: bool = False):
    def build(tmp: Path) -> str:
        if calls is not None:
            calls.append(params)
        (tmp / "data").write_text(f"data for {params}")
        if fail:
            raise RuntimeError("killed")
        (tmp / "params").write_text(params)
        return "built"
    return build


def test_commit_output_reuses_rebuilds_and_never_replaces_foreign_folders(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert commit_output(dest, reuse=reuse_marker("a"), build=build_with("a")) == "built"
    assert commit_output(dest, reuse=reuse_marker("a"), build=build_with("a")) == "reused"
    with pytest.raises(RuntimeError):
        commit_output(dest, reuse=reuse_marker("b"), build=build_with("b", fail=True))
    assert (dest / "data").read_text() == "data for a"  # the finished output survives a failed rebuild
    assert commit_output(dest, reuse=reuse_marker("b"), build=build_with("b")) == "built"
    assert (dest / "data").read_text() == "data for b"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]  # no temporaries left
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(NevaError, match="not ours"):
        commit_output(mine, reuse=reuse_marker("a"), build=build_with("a"))
    assert list(mine.iterdir()) == []


def test_commit_output_resumes_only_this_hosts_dead_writers(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    killed = this_hosts_temp(dest, DEAD_PID)
    killed.mkdir()
    (killed / "half").write_text("done before the kill")
    elsewhere = foreign_temp(dest, "gpu-node-7", DEAD_PID)
    elsewhere.mkdir()
    seen: list[list[str]] = []

    def build(tmp: Path) -> str:
        seen.append(sorted(p.name for p in tmp.iterdir()))
        (tmp / "params").write_text("a")
        return "built"

    commit_output(dest, reuse=reuse_marker("a"), build=build, resume=True)
    assert seen == [["half"]] and not killed.exists() and elsewhere.exists()


def test_concurrent_commits_build_once(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    calls: list[str] = []
    slow_build = build_with("a", calls)

    def build(tmp: Path) -> str:
        time.sleep(0.2)
        return slow_build(tmp)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: commit_output(dest, reuse=reuse_marker("a"), build=build), range(3)))
    assert calls == ["a"] and sorted(results) == ["built", "reused", "reused"]


def test_another_process_holding_the_lock_is_waited_for(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from neva_core.io import file_lock, lock_path\n"
         f"with file_lock(lock_path(Path({str(dest)!r})), 'test'):\n print('held', flush=True); time.sleep(0.5)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with file_lock(lock_path(dest), "test", wait=False) as held:
            assert not held
        started = time.monotonic()
        with file_lock(lock_path(dest), "test") as held:
            assert held
        assert time.monotonic() - started > 0.2  # it waited for the holder's sleep
    finally:
        holder.wait()


def test_prune_outputs_keeps_the_used_and_newest_ones(tmp_path: Path) -> None:
    folders = []
    for age, digest in enumerate(["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd"]):
        folder = tmp_path / f"shards-{digest}"
        folder.mkdir()
        os.utime(folder, ns=(10**18 + age * 10**9,) * 2)
        folders.append(folder)
    (tmp_path / "other-eeeeeeeeeeee").mkdir()
    removed = prune_outputs(folders[0], keep=2)  # the oldest one is the one in use
    assert sorted(removed) == folders[1:3]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "other-eeeeeeeeeeee", "shards-aaaaaaaaaaaa", "shards-dddddddddddd"]
