"""The download stage against local HTTP servers on 127.0.0.1: resume, verification, retries, the Hub API,
idempotent reruns, token hygiene and the CLI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from download_support import FakeHub, FakeServer, git_blob_id, isolate_hub_client, payload, sha256_hex
from neva_core import cli
from neva_core.config import ModelConfig
from neva_core.data.download import (
    STATE_DIR,
    HubSource,
    LocalSource,
    UrlSource,
    download,
    parse_source,
    remote_fingerprint,
)
from neva_core.errors import NevaError, TransientError

FAST = {"backoff_s": 0.001}
TOKEN = "hf_canary-token-that-must-never-leak-0123"


@pytest.fixture
def server():
    with FakeServer() as running:
        yield running


@pytest.fixture
def hub(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    isolate_hub_client(monkeypatch)
    return FakeHub(server)


def state_files(dest: Path, kind: str) -> list[Path]:
    folder = dest / STATE_DIR / kind
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


# ------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize(("text", "expected"), [
    ("hf://datasets/liuhaotian/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
     HubSource("dataset", "liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", None)),
    ("hf://datasets/org/name/sub/dir/file.zip@v1.0", HubSource("dataset", "org/name", "sub/dir/file.zip", "v1.0")),
    ("hf://datasets/org/name", HubSource("dataset", "org/name", None, None)),
    ("hf://lmsys/vicuna-7b-v1.5@refs/pr/1", HubSource("model", "lmsys/vicuna-7b-v1.5", None, "refs/pr/1")),
    ("hf://org/model/config.json", HubSource("model", "org/model", "config.json", None)),
    ("file:///data/x.zip", LocalSource(Path("/data/x.zip"))),
    ("relative/file.json", LocalSource(Path("relative/file.json"))),
])
def test_parse_source_accepts_every_form(text: str, expected: object) -> None:
    assert parse_source(text) == expected


def test_parse_source_keeps_url_credentials_out_of_repr() -> None:
    source = parse_source("https://user:s3cret@example.org/a/b.zip?X-Signature=abcdef")
    assert isinstance(source, UrlSource)
    assert "s3cret" not in repr(source) and "abcdef" not in repr(source)
    assert source.display == "https://example.org/a/b.zip?..."


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "empty"),
    ("hf://onlyone", "expected hf://"),
    ("hf://org/na me", "not a valid Hub"),
    ("hf://org/name/../etc/passwd", "not a plain relative path"),
    ("hf://org/name/file@", "invalid revision"),
    ("hf://spaces/org/app", "Space repos"),
    ("s3://bucket/key", "unsupported scheme"),
    ("https:///nohost", "no host"),
])
def test_parse_source_rejects_malformed(text: str, fragment: str) -> None:
    with pytest.raises(NevaError, match=fragment):
        parse_source(text)


# ------------------------------------------------------------------------------------ HTTP transfer


def test_resumes_with_range_after_dropped_connections(server: FakeServer, tmp_path: Path) -> None:
    data = payload(300_000)
    url = server.add("/f.bin", data, drops=[50_000, 70_000, 30_000, 40_000])
    # Four drops against two retries: each drop made progress, so the run carries on.
    result = download(url, tmp_path, max_retries=2, **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert result.files[0].sha256 == sha256_hex(data)
    ranges = [r.headers.get("Range") for r in server.served("/f.bin")]
    assert ranges == ["bytes=0-0", None, "bytes=50000-", "bytes=120000-", "bytes=150000-", "bytes=190000-"]
    assert server.body_bytes("/f.bin") == len(data) + 1  # every byte once, plus the one-byte probe
    assert state_files(tmp_path, "partial") == []


def test_interrupted_run_resumes_in_the_next_one(server: FakeServer, tmp_path: Path) -> None:
    data = payload(200_000)
    url = server.add("/f.bin", data, drops=[80_000])
    with pytest.raises(TransientError, match="gave up"):
        download(url, tmp_path, max_retries=0, **FAST)
    assert not (tmp_path / "f.bin").exists()
    assert [p.name for p in state_files(tmp_path, "partial")] == ["f.bin.part", "f.bin.part.json"]
    download(url, tmp_path, **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.served("/f.bin")[-1].headers["Range"] == "bytes=80000-"
    assert server.served("/f.bin")[-1].headers["If-Range"] == server.files["/f.bin"].etag
    assert server.body_bytes("/f.bin") == len(data) + 2


def test_changed_remote_restarts_from_zero_instead_of_splicing(server: FakeServer, tmp_path: Path) -> None:
    old, new = payload(200_000, seed=1), payload(200_000, seed=2)
    url = server.add("/f.bin", old, drops=[120_000])
    with pytest.raises(TransientError):
        download(url, tmp_path, max_retries=0, **FAST)
    server.add("/f.bin", new)  # a new version under the same URL, with a new ETag
    download(url, tmp_path, **FAST)
    assert (tmp_path / "f.bin").read_bytes() == new
    assert "Range" not in server.served("/f.bin")[-1].headers


def test_remote_changing_between_probe_and_transfer_is_refused(server: FakeServer, tmp_path: Path) -> None:
    url = server.add("/f.bin", payload(1000, seed=1), after_probe=payload(1000, seed=2))
    with pytest.raises(NevaError, match="changed on the server"):
        download(url, tmp_path, **FAST)
    assert not (tmp_path / "f.bin").exists() and state_files(tmp_path, "partial") == []


def test_server_without_range_support_restarts_each_attempt(server: FakeServer, tmp_path: Path) -> None:
    data = payload(100_000)
    url = server.add("/f.bin", data, ranges=False, drops=[60_000])
    download(url, tmp_path, **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data
    transfers = server.served("/f.bin")[1:]
    assert [(r.headers.get("Range"), r.status, r.body_bytes) for r in transfers] == [
        (None, 200, 60_000), ("bytes=60000-", 200, 100_000)]


def test_corrupted_bytes_are_rejected_and_not_kept(server: FakeServer, tmp_path: Path) -> None:
    data = payload(50_000)
    url = server.add("/f.bin", data, corrupt=True)
    with pytest.raises(NevaError) as caught:
        download(url, tmp_path, sha256=sha256_hex(data), **FAST)
    message = str(caught.value)
    assert "f.bin" in message and sha256_hex(data) in message
    assert sha256_hex(bytes([data[0] ^ 0xFF]) + data[1:]) in message
    assert not (tmp_path / "f.bin").exists()
    assert state_files(tmp_path, "partial") == [] and state_files(tmp_path, "records") == []


@pytest.mark.parametrize("status", [401, 403, 404])
def test_client_errors_fail_at_once(server: FakeServer, tmp_path: Path, status: int) -> None:
    url = server.add("/f.bin", b"x" * 100, statuses=[status])
    with pytest.raises(NevaError) as caught:
        download(url, tmp_path, **FAST)
    assert not isinstance(caught.value, TransientError)
    assert f"HTTP {status}" in str(caught.value) and "/f.bin" in str(caught.value)
    assert len(server.served("/f.bin")) == 1


def test_transient_statuses_are_retried_then_succeed(server: FakeServer, tmp_path: Path) -> None:
    data = payload(10_000)
    url = server.add("/f.bin", data, statuses=[503, 503])
    download(url, tmp_path, **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert [r.status for r in server.served("/f.bin")] == [503, 503, 206, 200]


def test_transient_statuses_give_up_after_max_retries(server: FakeServer, tmp_path: Path) -> None:
    url = server.add("/f.bin", b"x" * 100, statuses=[429, 500, 502])
    with pytest.raises(TransientError, match="gave up after 3 attempts"):
        download(url, tmp_path, max_retries=2, **FAST)
    assert len(server.served("/f.bin")) == 3


def test_rerun_over_a_complete_url_download_transfers_nothing(server: FakeServer, tmp_path: Path) -> None:
    data = payload(20_000)
    url = server.add("/f.bin", data)
    download(url, tmp_path, **FAST)
    before = server.body_bytes()
    result = download(url, tmp_path, **FAST)
    assert result.transferred_bytes == 0 and result.files[0].sha256 == sha256_hex(data)
    assert server.body_bytes() - before == 1  # the probe's single byte


# ------------------------------------------------------------------------------------------ the Hub


def test_hub_dataset_file_follows_the_pinned_revision(hub: FakeHub, tmp_path: Path) -> None:
    old, new = b'[{"id": "1"}]', b'[{"id": "1"}, {"id": "2"}]'
    repo = hub.add_repo("liuhaotian/LLaVA-Pretrain", {"chat.json": old, "images.zip": payload(30_000)},
                        repo_type="dataset", lfs={"images.zip"})
    first = repo.branches["main"]
    second = hub.commit(repo, {"chat.json": new, "images.zip": payload(30_000)})
    source = "hf://datasets/liuhaotian/LLaVA-Pretrain/chat.json"

    latest = download(source, tmp_path / "latest", endpoint=hub.endpoint, **FAST)
    pinned = download(f"{source}@{first}", tmp_path / "pinned", endpoint=hub.endpoint, **FAST)

    assert (latest.commit, (tmp_path / "latest" / "chat.json").read_bytes()) == (second, new)
    assert (pinned.commit, (tmp_path / "pinned" / "chat.json").read_bytes()) == (first, old)
    assert pinned.revision == first
    assert server_paths(hub, "/datasets/") == [f"/datasets/liuhaotian/LLaVA-Pretrain/resolve/{second}/chat.json",
                                                f"/datasets/liuhaotian/LLaVA-Pretrain/resolve/{first}/chat.json"]


def server_paths(hub: FakeHub, prefix: str) -> list[str]:
    return [r.path for r in hub.server.served(prefix)]


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama"}',
        "model-00001-of-00002.safetensors": payload(40_000, 1),
        "model-00002-of-00002.safetensors": payload(25_000, 2),
        "tokenizer.model": payload(5_000, 3),
        "pytorch_model.bin": payload(40_000, 4),
        "docs/README.md": b"# model",
    }


LFS = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.model",
       "pytorch_model.bin"}
INCLUDE = ["*.safetensors", "config.json", "tokenizer.model"]


def test_hub_model_snapshot_with_include_patterns(hub: FakeHub, tmp_path: Path) -> None:
    files = model_files()
    repo = hub.add_repo("lmsys/vicuna-7b-v1.5", files, lfs=LFS)
    result = download("hf://lmsys/vicuna-7b-v1.5", tmp_path, include=INCLUDE, endpoint=hub.endpoint, **FAST)

    wanted = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "tokenizer.model"]
    assert [f.path for f in result.files] == wanted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*wanted, "manifest.json", STATE_DIR])
    for name in wanted:
        assert (tmp_path / name).read_bytes() == files[name]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["commit"] == repo.branches["main"] == result.commit
    assert manifest["files"] == {n: {"bytes": len(files[n]), "sha256": sha256_hex(files[n])} for n in wanted}
    assert hub.server.body_bytes(f"/cdn/{sha256_hex(files['pytorch_model.bin'])}") == 0
    assert json.loads(json.dumps(result.to_json()))["commit"] == result.commit


def test_hub_snapshot_rerun_transfers_nothing(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/model", model_files(), lfs=LFS)
    download("hf://org/model", tmp_path, include=INCLUDE, endpoint=hub.endpoint, **FAST)
    before = len(hub.server.requests)
    result = download("hf://org/model", tmp_path, include=INCLUDE, endpoint=hub.endpoint, **FAST)
    assert result.transferred_bytes == 0
    assert [r.path for r in hub.server.requests[before:]] == ["/api/models/org/model"]  # metadata only
    assert (tmp_path / "manifest.json").is_file()


def clip_files(*weights: str) -> dict[str, bytes]:
    """A CLIP repo as openai/clip-vit-large-patch14-336 holds it, with the given weight files."""
    files = {"config.json": b'{"model_type": "clip"}', "preprocessor_config.json": b'{"crop_size": 336}',
             "tf_model.h5": payload(9_000, 5), "README.md": b"# CLIP"}
    return files | {name: payload(30_000, 6 + i) for i, name in enumerate(weights)}


CLIP_LFS = {"tf_model.h5", "pytorch_model.bin", "model.safetensors"}


def test_clip_repo_with_only_bin_weights_gets_the_bin(hub: FakeHub, tmp_path: Path) -> None:
    files = clip_files("pytorch_model.bin")
    hub.add_repo("openai/clip-vit-large-patch14-336", files, lfs=CLIP_LFS)
    result = download("hf://openai/clip-vit-large-patch14-336", tmp_path, include=ModelConfig().vision_include,
                      endpoint=hub.endpoint, **FAST)
    assert [f.path for f in result.files] == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    assert (tmp_path / "pytorch_model.bin").read_bytes() == files["pytorch_model.bin"]
    assert hub.server.body_bytes(f"/cdn/{sha256_hex(files['tf_model.h5'])}") == 0


def test_repo_with_safetensors_and_bin_gets_only_the_safetensors(hub: FakeHub, tmp_path: Path) -> None:
    files = model_files()
    hub.add_repo("org/model", files, lfs=LFS)
    result = download("hf://org/model", tmp_path, include=ModelConfig().llm_include, endpoint=hub.endpoint, **FAST)
    assert [f.path for f in result.files] == ["config.json", "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors", "tokenizer.model"]
    assert hub.server.body_bytes(f"/cdn/{sha256_hex(files['pytorch_model.bin'])}") == 0


def test_snapshot_without_weights_is_an_error_naming_repo_and_patterns(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("openai/clip-vit-large-patch14-336", clip_files(), lfs=CLIP_LFS)
    message = r"'openai/clip-vit-large-patch14-336': no file matches any of '\*.safetensors' or 'pytorch_model\*.bin'"
    with pytest.raises(NevaError, match=message):
        download("hf://openai/clip-vit-large-patch14-336", tmp_path / "out", include=ModelConfig().vision_include,
                 endpoint=hub.endpoint, **FAST)
    assert not (tmp_path / "out").exists()
    assert [r.path for r in hub.server.requests] == ["/api/models/openai/clip-vit-large-patch14-336"]
    local = tmp_path / "clip"
    local.mkdir()
    (local / "config.json").write_bytes(b"{}")
    with pytest.raises(NevaError, match=f"download source {local}: no file matches any of"):
        download(str(local), tmp_path / "copy", include=ModelConfig().vision_include)


def test_offline_rerun_serves_the_recorded_commit_without_the_hub(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = hub.add_repo("org/model", model_files(), lfs=LFS)
    first = download("hf://org/model", tmp_path / "snap", include=INCLUDE, endpoint=hub.endpoint, **FAST)
    download("hf://org/model/config.json", tmp_path / "one", endpoint=hub.endpoint, **FAST)
    online_key = remote_fingerprint("hf://org/model", endpoint=hub.endpoint)
    hub.commit(repo, {"config.json": b"{}"})  # the branch moves on: offline still means the recorded commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.server.requests)
    again = download("hf://org/model", tmp_path / "snap", include=INCLUDE, endpoint=hub.endpoint, **FAST)
    assert (again.commit, again.transferred_bytes) == (first.commit, 0)
    assert [(f.path, f.sha256) for f in again.files] == [(f.path, f.sha256) for f in first.files]
    assert remote_fingerprint("hf://org/model", endpoint=hub.endpoint, dest=tmp_path / "snap",
                              include=INCLUDE) == online_key
    single = download("hf://org/model/config.json", tmp_path / "one", endpoint=hub.endpoint, **FAST)
    assert single.paths == [tmp_path / "one" / "config.json"]
    assert len(hub.server.requests) == before  # not one request
    with pytest.raises(NevaError, match="HF_HUB_OFFLINE is set and .* holds no complete download"):
        download("hf://org/model", tmp_path / "snap", include=("*.json",), endpoint=hub.endpoint, **FAST)
    (tmp_path / "snap" / "config.json").write_bytes(b"edited")
    with pytest.raises(NevaError, match="HF_HUB_OFFLINE is set and the copy .* is incomplete or changed"):
        download("hf://org/model", tmp_path / "snap", include=INCLUDE, endpoint=hub.endpoint, **FAST)


def test_hub_rerun_adopts_a_verified_file_whose_record_is_missing(hub: FakeHub, tmp_path: Path) -> None:
    files = model_files()
    hub.add_repo("org/model", files, lfs=LFS)
    download("hf://org/model", tmp_path, include=["*.safetensors"], endpoint=hub.endpoint, **FAST)
    for record in state_files(tmp_path, "records"):
        record.unlink()  # as if killed between the rename and the record
    damaged = tmp_path / "model-00002-of-00002.safetensors"
    damaged.write_bytes(b"\0" * len(files[damaged.name]))
    result = download("hf://org/model", tmp_path, include=["*.safetensors"], endpoint=hub.endpoint, **FAST)
    assert {f.path: f.transferred for f in result.files} == {"model-00001-of-00002.safetensors": 0,
                                                            damaged.name: len(files[damaged.name])}
    assert damaged.read_bytes() == files[damaged.name]


def test_hub_corrupted_lfs_bytes_are_rejected(hub: FakeHub, tmp_path: Path) -> None:
    files = model_files()
    hub.add_repo("org/model", files, lfs=LFS)
    hub.cdn_file(files["tokenizer.model"]).corrupt = True
    with pytest.raises(NevaError) as caught:
        download("hf://org/model/tokenizer.model", tmp_path, endpoint=hub.endpoint, **FAST)
    assert "'org/model'" in str(caught.value) and "tokenizer.model" in str(caught.value)
    assert sha256_hex(files["tokenizer.model"]) in str(caught.value)
    assert not (tmp_path / "tokenizer.model").exists()


def test_hub_small_file_is_checked_against_its_git_blob_id(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/model", {"config.json": b"{}"}).corrupt = {"config.json"}
    with pytest.raises(NevaError, match=git_blob_id(b"{}")):
        download("hf://org/model/config.json", tmp_path, endpoint=hub.endpoint, **FAST)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(("status", "advice"), [(401, "gated"), (403, "accept the licence"),
                                                (404, "check the repo name")])
def test_hub_access_errors_fail_at_once_naming_the_repo(hub: FakeHub, tmp_path: Path, status: int,
                                                        advice: str) -> None:
    hub.add_repo("meta-llama/Llama-2-7b-chat-hf", {"config.json": b"{}"}).fail = status
    with pytest.raises(NevaError) as caught:
        download("hf://meta-llama/Llama-2-7b-chat-hf", tmp_path, endpoint=hub.endpoint, **FAST)
    assert not isinstance(caught.value, TransientError)
    assert "meta-llama/Llama-2-7b-chat-hf" in str(caught.value) and advice in str(caught.value)
    assert len(hub.server.requests) == 1


def test_hub_unknown_revision_is_explained(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/model", {"config.json": b"{}"})
    with pytest.raises(NevaError, match="revision 'v9' not found"):
        download("hf://org/model@v9", tmp_path, endpoint=hub.endpoint, **FAST)


def test_hub_metadata_is_retried_on_503(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/model", {"config.json": b"{}"}).api_statuses = [503, 503]
    download("hf://org/model/config.json", tmp_path, endpoint=hub.endpoint, **FAST)
    assert (tmp_path / "config.json").read_bytes() == b"{}"
    assert len(hub.server.served("/api/")) == 3


def test_hub_gated_repo_needs_the_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("meta-llama/Llama-2-7b-chat-hf", model_files(), lfs=LFS, gated_token=TOKEN)
    source = "hf://meta-llama/Llama-2-7b-chat-hf/tokenizer.model"
    with pytest.raises(NevaError, match="HF_TOKEN"):
        download(source, tmp_path, endpoint=hub.endpoint, **FAST)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    download(source, tmp_path, endpoint=hub.endpoint, **FAST)
    assert (tmp_path / "tokenizer.model").read_bytes() == model_files()["tokenizer.model"]


def test_token_never_leaks(hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    files = model_files()
    gated = hub.add_repo("org/gated", files, lfs=LFS, gated_token="another-users-token")
    gated.echo_auth = True
    flaky = hub.add_repo("org/flaky", files, lfs=LFS)
    flaky.api_statuses, flaky.echo_auth = [503] * 3, True
    hub.add_repo("org/model", files, lfs=LFS)
    hub.cdn_file(files["tokenizer.model"]).corrupt = True
    with FakeServer() as elsewhere:
        url = elsewhere.add("/f.bin", b"x" * 10, statuses=[500, 500], echo_auth=True)
        failures = [
            ("hf://org/gated", {}), ("hf://org/flaky", {"max_retries": 2}),
            ("hf://org/model/tokenizer.model", {}), (url, {"max_retries": 1}),
        ]
        errors = []
        for source, options in failures:
            with pytest.raises(NevaError) as caught:
                download(source, tmp_path / "out", token=TOKEN, endpoint=hub.endpoint, **FAST, **options)
            errors.append(caught.value)
        done = download("hf://org/model/config.json", tmp_path / "out", token=TOKEN, endpoint=hub.endpoint, **FAST)
        # The Hub got the token; another host never did.
        assert all("Authorization" not in r.headers for r in elsewhere.requests)
    assert any(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in hub.server.requests)
    texts = [caplog.text, repr(done), json.dumps(done.to_json())] + [f"{e}\n{e!r}" for e in errors]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert all(TOKEN not in text for text in texts)
    for error in errors:  # no chained requests/httpx exception (they hold the request's headers)
        while error is not None:
            assert isinstance(error, NevaError)
            error = error.__cause__ or error.__context__


# ------------------------------------------------------------------------------------- local sources


def test_local_file_copy_is_verified(tmp_path: Path) -> None:
    source = tmp_path / "in" / "data.json"
    source.parent.mkdir()
    source.write_bytes(b'{"a": 1}')
    result = download(str(source), tmp_path / "out", sha256=sha256_hex(b'{"a": 1}'))
    assert (tmp_path / "out" / "data.json").read_bytes() == b'{"a": 1}'
    assert download(f"file://{source}", tmp_path / "out").transferred_bytes == 0
    with pytest.raises(NevaError, match="given sha256"):
        download(str(source), tmp_path / "other", sha256="0" * 64)
    assert not (tmp_path / "other" / "data.json").exists()
    assert result.files[0].transferred == len(b'{"a": 1}')


def test_local_folder_is_copied_as_a_snapshot(tmp_path: Path) -> None:
    source = tmp_path / "model"
    for name, data in model_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    result = download(str(source), tmp_path / "out", include=["*.safetensors"])
    assert [f.path for f in result.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["files"].keys() == {
        f.path for f in result.files}


def test_option_misuse_is_reported(tmp_path: Path, server: FakeServer) -> None:
    url = server.add("/f.bin", b"x")
    with pytest.raises(NevaError, match="--include applies to snapshots"):
        download(url, tmp_path, include=["*.bin"])
    with pytest.raises(NevaError, match="not a sha256"):
        download(url, tmp_path, sha256="abc")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NevaError, match="DEST must be a folder"):
        download(url, tmp_path / "file")
    assert server.requests == []


# --------------------------------------------------------------------------------------- fingerprints


def test_remote_fingerprint_changes_with_the_remote(hub: FakeHub, tmp_path: Path) -> None:
    repo = hub.add_repo("org/model", {"config.json": b"{}"})
    first = remote_fingerprint("hf://org/model", endpoint=hub.endpoint)
    assert repo.branches["main"] in first
    hub.commit(repo, {"config.json": b"{ }"})
    assert remote_fingerprint("hf://org/model", endpoint=hub.endpoint) != first

    url = hub.server.add("/f.bin", b"abc")
    before = remote_fingerprint(url)
    hub.server.add("/f.bin", b"abcd")
    assert remote_fingerprint(url) != before

    local = tmp_path / "f"
    local.write_bytes(b"1")
    before = remote_fingerprint(str(local))
    os.utime(local, ns=(1, 1))
    assert remote_fingerprint(str(local)) != before


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def only_download_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # The other stages' commands are not under test here; their import cost and failures stay out.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("download",))


def test_cli_help_explains_every_option(only_download_command: None, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["download", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--include", "--sha256", "--endpoint", "--max-retries", "--json", "HF_TOKEN", "hf://datasets/"):
        assert option in out


def test_cli_downloads_and_reports(only_download_command: None, hub: FakeHub, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    hub.add_repo("org/model", model_files(), lfs=LFS)
    argv = ["download", "hf://org/model", str(tmp_path), "--include", "*.safetensors", "--endpoint", hub.endpoint]
    assert cli.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["path"] for f in report["files"]] == ["model-00001-of-00002.safetensors",
                                                    "model-00002-of-00002.safetensors"]
    assert cli.main(argv) == 0
    assert "0 bytes transferred" in capsys.readouterr().out
    assert cli.main(["download", "hf://org", str(tmp_path)]) == 2
    assert "expected hf://" in capsys.readouterr().err
