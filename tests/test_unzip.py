"""The unzip stage: refuses unsafe archives and zip bombs, is atomic, idempotent and resumable."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from neva_core import cli
from neva_core.data.archive import RECORD_NAME, check_member, unzip, zip_fingerprint
from neva_core.errors import NevaError

WHEN = (2021, 3, 4, 5, 6, 8)  # zip times have 2-second resolution
FILES = {"00000/000000001.jpg": b"\xff\xd8jpeg-one" * 50, "00001/000000002.jpg": b"\xff\xd8jpeg-two" * 70}


def entry(name: str, mode: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=WHEN)
    if mode is not None:
        info.external_attr = mode << 16
    return info


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(entry(name), data, compress_type=compression)
    return path


def stray_paths(root: Path, allowed: set[Path]) -> list[Path]:
    """Everything under root except `allowed` and the lock file kept beside each DEST."""
    return sorted(p for p in root.rglob("*") if p not in allowed and not p.name.endswith(".lock"))


def local_data_offset(raw: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len


def with_declared_size(raw: bytes, info: zipfile.ZipInfo, size: int) -> bytes:
    """The archive with `info`'s uncompressed size rewritten in its local and central headers."""
    patched = bytearray(raw)
    struct.pack_into("<I", patched, info.header_offset + 22, size)
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46 : central + 46 + len(info.filename)] != info.filename.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", patched, central + 24, size)
    return bytes(patched)


@pytest.fixture
def good_zip(tmp_path: Path) -> Path:
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(entry("empty/"), b"")
        for name, data in FILES.items():
            archive.writestr(entry(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


# --- refusing unsafe entries -----------------------------------------------------------------------

ESCAPE = f"/tmp/neva-unzip-escape-{uuid.uuid4().hex}"
EVIL = [
    pytest.param("../x", None, "'..' component", id="zip-slip"),
    pytest.param("a/../../x", None, "'..' component", id="zip-slip-nested"),
    pytest.param(f"{ESCAPE}/x", None, "absolute path", id="absolute"),
    pytest.param("C:\\x", None, "backslash", id="windows-drive-backslash"),
    pytest.param("C:/x", None, "drive letter", id="windows-drive"),
    pytest.param("dir\\..\\..\\x", None, "backslash", id="windows-slip"),
    pytest.param("link", stat.S_IFLNK | 0o777, "symbolic link", id="symlink"),
    pytest.param("fifo", stat.S_IFIFO | 0o644, "special file", id="fifo"),
    pytest.param("tty", stat.S_IFCHR | 0o600, "special file", id="char-device"),
    pytest.param("disk", stat.S_IFBLK | 0o600, "special file", id="block-device"),
    pytest.param("sock", stat.S_IFSOCK | 0o600, "special file", id="socket"),
]


@pytest.mark.parametrize(("name", "mode", "reason"), EVIL)
def test_check_member_refuses_unsafe_entries(name: str, mode: int | None, reason: str) -> None:
    with pytest.raises(NevaError, match=reason) as caught:
        check_member(entry(name, mode))
    assert repr(name) in str(caught.value)


@pytest.mark.parametrize(("name", "mode", "reason"), EVIL)
def test_unzip_refuses_unsafe_entry_and_writes_nothing(
    tmp_path: Path, name: str, mode: int | None, reason: str
) -> None:
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr(entry("innocent.txt"), b"first entry, extracted before the evil one if unchecked")
        archive.writestr(entry(name, mode), b"../../etc/passwd" if mode else b"payload")
    dest = tmp_path / "work" / "dest"
    with pytest.raises(NevaError, match=reason) as caught:
        unzip(zip_path, dest)
    assert str(zip_path) in str(caught.value) and repr(name) in str(caught.value)
    assert stray_paths(tmp_path, {zip_path, dest.parent}) == []
    assert not Path(ESCAPE).exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a/b.jpg", "a/b.jpg"), ("dir/", "dir"), ("./a//b/./c.txt", "a/b/c.txt"), ("dir/x:y", "dir/x:y")],
)
def test_check_member_returns_normalised_relative_path(name: str, expected: str) -> None:
    assert check_member(entry(name, stat.S_IFREG | 0o644)) == expected


def test_check_member_refuses_encrypted_and_unknown_methods() -> None:
    encrypted = entry("secret.jpg")
    encrypted.flag_bits |= 0x1
    with pytest.raises(NevaError, match="'secret.jpg' is encrypted"):
        check_member(encrypted)
    unknown = entry("odd.jpg")
    unknown.compress_type = 99
    with pytest.raises(NevaError, match="compression method 99"):
        check_member(unknown)


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["a.jpg", "./a.jpg"], "appears twice"),
        (["a", "a/b.jpg"], "inside 'a', which is a file entry"),
        ([RECORD_NAME], "collides with the completion record"),
    ],
)
def test_unzip_refuses_colliding_entries(tmp_path: Path, names: list[str], reason: str) -> None:
    zip_path = tmp_path / "collide.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name in names:
            archive.writestr(entry(name), b"data")
    with pytest.raises(NevaError, match=reason):
        unzip(zip_path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# --- zip bombs and size lies -----------------------------------------------------------------------


def test_declared_size_smaller_than_stream_is_caught(tmp_path: Path) -> None:
    honest = make_zip(tmp_path / "honest.zip", {"ok.jpg": b"fine", "big.bin": bytes(range(256)) * 400})
    raw = honest.read_bytes()
    info = zipfile.ZipFile(honest).getinfo("big.bin")
    liar = tmp_path / "liar.zip"
    liar.write_bytes(with_declared_size(raw, info, 1000))
    with pytest.raises(NevaError, match="'big.bin' .* more data than the 1000 bytes its header declares"):
        unzip(liar, tmp_path / "dest")
    assert stray_paths(tmp_path, {honest, liar}) == []


def test_declared_size_larger_than_stream_is_caught(tmp_path: Path) -> None:
    honest = make_zip(tmp_path / "honest.zip", {"small.bin": b"x" * 1000})
    info = zipfile.ZipFile(honest).getinfo("small.bin")
    liar = tmp_path / "liar.zip"
    liar.write_bytes(with_declared_size(honest.read_bytes(), info, 5000))
    with pytest.raises(NevaError, match="holds 1000 bytes but its header declares 5000"):
        unzip(liar, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_ratio_bomb_is_refused_unless_allowed(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(8 << 20)})
    assert bomb.stat().st_size < 20_000
    with pytest.raises(NevaError, match=r"'zeros.bin' expands \d+:1 .* zip bomb"):
        unzip(bomb, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    result = unzip(bomb, tmp_path / "dest", max_ratio=5000)
    assert (tmp_path / "dest" / "zeros.bin").stat().st_size == result.bytes == 8 << 20


def test_total_declared_size_limit(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "three.zip", {f"{i}.bin": bytes([i]) * 1000 for i in range(3)})
    with pytest.raises(NevaError, match=r"declares 2.9 KiB \(3000 bytes\).*--max-bytes"):
        unzip(zip_path, tmp_path / "dest", max_bytes=2999)
    assert not (tmp_path / "dest").exists()
    assert unzip(zip_path, tmp_path / "dest", max_bytes=3000).files == 3


def test_insufficient_disk_space_is_refused(tmp_path: Path, good_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real._replace(free=100))
    needed = sum(len(data) for data in FILES.values())
    with pytest.raises(NevaError, match=rf"needs .* \({needed} bytes\) but only 100 B is free"):
        unzip(good_zip, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# --- damaged archives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="cut-in-half"),
        pytest.param(lambda raw: raw[: raw.rindex(b"PK\x01\x02")], id="no-central-directory"),
        pytest.param(lambda raw: os.urandom(len(raw)), id="random-bytes"),
        pytest.param(lambda raw: b"", id="empty"),
    ],
)
def test_truncated_or_foreign_file_is_a_clear_error(
    tmp_path: Path, good_zip: Path, damage: Callable[[bytes], bytes]
) -> None:
    good_zip.write_bytes(damage(good_zip.read_bytes()))
    with pytest.raises(NevaError, match="is truncated or not a zip file .*re-download it"):
        unzip(good_zip, tmp_path / "dest")
    with pytest.raises(NevaError, match="is truncated or not a zip file"):
        zip_fingerprint(good_zip)
    assert stray_paths(tmp_path, {good_zip}) == []


def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match="cannot open the archive .*nothing.zip"):
        unzip(tmp_path / "nothing.zip", tmp_path / "dest")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupt_member_byte_leaves_no_dest(tmp_path: Path, compression: int) -> None:
    members = {"first.jpg": b"a" * 3000, "second.jpg": bytes(range(256)) * 40}
    zip_path = make_zip(tmp_path / "c.zip", members, compression)
    info = zipfile.ZipFile(zip_path).getinfo("second.jpg")
    raw = bytearray(zip_path.read_bytes())
    raw[local_data_offset(raw, info) + info.compress_size // 2] ^= 0x55
    zip_path.write_bytes(raw)
    with pytest.raises(NevaError, match=r"entry 'second.jpg' of .*c.zip is corrupt or truncated .*re-download it"):
        unzip(zip_path, tmp_path / "dest")
    assert stray_paths(tmp_path, {zip_path}) == []


# --- results, idempotence, earlier runs ------------------------------------------------------------


def test_extracts_tree_with_zip_times_and_record(tmp_path: Path, good_zip: Path) -> None:
    dest = tmp_path / "data" / "images"
    result = unzip(good_zip, dest)
    assert (result.dest, result.files, result.bytes, result.skipped) == (dest, 2, sum(map(len, FILES.values())), False)
    assert result.fingerprint == zip_fingerprint(good_zip)
    zip_time = time.mktime(WHEN + (0, 0, -1))
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
        assert (dest / name).stat().st_mtime == zip_time
    assert (dest / "empty").is_dir() and (dest / "empty").stat().st_mtime == zip_time
    record = json.loads((dest / RECORD_NAME).read_text())
    assert record["fingerprint"] == result.fingerprint and record["zip"] == str(good_zip)
    assert (record["entries"], record["files"], record["zip_bytes"]) == (3, 2, good_zip.stat().st_size)
    assert stray_paths(tmp_path, {good_zip}) == sorted(
        [dest.parent, dest, dest / RECORD_NAME, dest / "empty"]
        + [dest / name for name in FILES]
        + [dest / name.split("/")[0] for name in FILES]
    )


def test_rerun_on_same_archive_touches_nothing(tmp_path: Path, good_zip: Path) -> None:
    dest = tmp_path / "dest"
    first = unzip(good_zip, dest)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [dest, *dest.rglob("*")]}
    again = unzip(good_zip, dest)
    assert again.skipped
    assert (again.files, again.bytes, again.fingerprint) == (first.files, first.bytes, first.fingerprint)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [dest, *dest.rglob("*")]} == before


def test_fingerprint_follows_listing_not_container(tmp_path: Path) -> None:
    deflated = zip_fingerprint(make_zip(tmp_path / "d.zip", FILES, zipfile.ZIP_DEFLATED))
    assert zip_fingerprint(make_zip(tmp_path / "s.zip", FILES, zipfile.ZIP_STORED)) == deflated
    changed = {**FILES, "00000/000000001.jpg": b"other bytes"}
    assert zip_fingerprint(make_zip(tmp_path / "c.zip", changed)) != deflated


def test_dest_from_another_archive_is_replaced_whole(tmp_path: Path, good_zip: Path) -> None:
    dest = tmp_path / "dest"
    unzip(good_zip, dest)
    other = make_zip(tmp_path / "other.zip", {"x.jpg": b"x"})
    assert not unzip(other, dest).skipped
    assert (dest / "x.jpg").read_bytes() == b"x" and not (dest / "00000").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dest.lock", "dest", good_zip.name, "other.zip"]


def test_dest_without_record_is_never_merged_into(tmp_path: Path, good_zip: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("user data")
    with pytest.raises(NevaError, match=f"has no {RECORD_NAME}.*never merged into"):
        unzip(good_zip, dest)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_damaged_record_is_a_clear_error(tmp_path: Path, good_zip: Path) -> None:
    dest = tmp_path / "dest"
    unzip(good_zip, dest)
    (dest / RECORD_NAME).write_text('{"files": 2')
    with pytest.raises(NevaError, match=f"{RECORD_NAME} is unreadable .*delete .*dest and unzip again"):
        unzip(good_zip, dest)


def test_stale_temporary_folder_is_removed(tmp_path: Path, good_zip: Path) -> None:
    stale = tmp_path / ".dest.tmp-4242-deadbeef"
    (stale / "00000").mkdir(parents=True)
    (stale / "00000" / "half.jpg").write_bytes(b"\xff\xd8")
    unrelated = tmp_path / ".other.tmp-4242-deadbeef"
    unrelated.mkdir()
    assert unzip(good_zip, tmp_path / "dest").files == 2
    assert not stale.exists() and unrelated.exists()


def test_concurrent_runs_extract_once(tmp_path: Path, good_zip: Path) -> None:
    results = []
    threads = [threading.Thread(target=lambda: results.append(unzip(good_zip, tmp_path / "dest"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(result.skipped for result in results) == [False, True]


# --- command line ----------------------------------------------------------------------------------


@pytest.fixture
def only_unzip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each subcommand has its own tests; registering only this one keeps these independent of the others.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("unzip",))


@pytest.mark.usefixtures("only_unzip_command")
def test_cli_extracts_then_does_nothing(tmp_path: Path, good_zip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "dest"
    assert cli.main(["unzip", str(good_zip), str(dest), "--max-bytes", "1M", "--max-ratio", "50"]) == 0
    assert "extracted 2 files" in capsys.readouterr().out
    assert cli.main(["unzip", str(good_zip), str(dest)]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.usefixtures("only_unzip_command")
def test_cli_reports_errors_and_limits(tmp_path: Path, good_zip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["unzip", str(good_zip), str(tmp_path / "dest"), "--max-bytes", "1K"]) == 2
    assert "neva unzip: error:" in capsys.readouterr().err and not (tmp_path / "dest").exists()
    assert cli.main(["unzip", str(good_zip), str(tmp_path / "dest"), "--max-bytes", "none"]) == 0
    with pytest.raises(SystemExit) as bad_size:
        cli.main(["unzip", str(good_zip), str(tmp_path / "d2"), "--max-bytes", "lots"])
    assert bad_size.value.code == 2 and "is not a size" in capsys.readouterr().err


@pytest.mark.usefixtures("only_unzip_command")
def test_cli_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["unzip", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for word in ("ZIP", "DEST", "--max-bytes", "--max-ratio", "zip bombs", RECORD_NAME, "1.0 TiB"):
        assert word in text
