"""Name resolution: local paths, Hub repo ids (cached, offline), official release downloads with checksums."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import llama_adapter
from llama_adapter import ResolveError
from llama_adapter.weights import hub
from llama_adapter.weights.hub import Release, parse_repo_spec


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("huggyllama/llama-7b", ("huggyllama/llama-7b", None, None)),
        ("meta-llama/Llama-2-7b-hf@main", ("meta-llama/Llama-2-7b-hf", "main", None)),
        ("me/adapters/run1/adapter.safetensors", ("me/adapters", None, "run1/adapter.safetensors")),
        ("me/adapters@v1.0/adapter.safetensors", ("me/adapters", "v1.0", "adapter.safetensors")),
        ("not a repo", None),
    ],
)
def test_parse_repo_spec(name: str, expected) -> None:
    spec = parse_repo_spec(name)
    assert (spec and (spec.repo_id, spec.revision, spec.filename)) == expected


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "releases"))
    return cache


def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> Path:
    """Lay files out the way huggingface_hub caches a snapshot of ``repo_id`` at ``main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, src in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snapshot / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_offline_and_not_cached_says_what_to_do(hf_cache: Path) -> None:
    with pytest.raises(ResolveError) as err:
        hub.resolve_base("huggyllama/llama-7b")
    message = str(err.value)
    assert "not in the local cache" in message and "HF_HUB_OFFLINE" in message and "local path" in message


def test_offline_adapter_repo_not_cached(hf_cache: Path) -> None:
    with pytest.raises(ResolveError, match="adapter.safetensors from Hugging Face repo me/adapter is not in the local cache"):
        hub.resolve_adapter("me/adapter")


def test_offline_official_release_not_cached(hf_cache: Path) -> None:
    with pytest.raises(ResolveError, match="llama_adapter_len10_layer30_release.pth is not in the local cache"):
        hub.resolve_adapter("LLaMA-Adapter-V1")


def test_cached_hub_repo_loads_offline(hf_cache: Path, hf_dir: Path, pipe) -> None:
    files = {p.name: p for p in hf_dir.iterdir()}
    snapshot = put_in_cache(hf_cache, "someone/tiny-llama", files)
    assert hub.resolve_base("someone/tiny-llama") == snapshot
    loaded = llama_adapter.load("someone/tiny-llama", device="cpu", dtype="fp32")
    assert "".join(loaded.stream("the water", max_new_tokens=8, temperature=0)) == "".join(
        pipe.stream("the water", max_new_tokens=8, temperature=0)
    )


def test_cached_adapter_file_in_repo_resolves(hf_cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"x")
    snapshot = put_in_cache(hf_cache, "me/adapters", {"run1/adapter.safetensors": src})
    assert hub.resolve_adapter("me/adapters/run1/adapter.safetensors") == snapshot / "run1" / "adapter.safetensors"
    assert hub.resolve_adapter("me/adapters@main/run1/adapter.safetensors") == snapshot / "run1" / "adapter.safetensors"


def test_unknown_adapter_name_lists_the_official_ones(tmp_path: Path) -> None:
    with pytest.raises(ResolveError, match="LLaMA-Adapter-V1"):
        hub.resolve_adapter("no such adapter")


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a temp directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_release_download_checks_sha256_and_caches(file_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, root = file_server
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload = b"adapter bytes" * 1000
    (root / "good.pth").write_bytes(payload)
    good = Release(f"{url}/good.pth", hashlib.sha256(payload).hexdigest())
    path = hub.download(good)
    assert path.read_bytes() == payload and path.parent == tmp_path / "cache"
    (root / "good.pth").unlink()  # the second call is served from the cache
    assert hub.download(good) == path

    (root / "bad.pth").write_bytes(b"tampered")
    with pytest.raises(ResolveError, match="does not match the published"):
        hub.download(Release(f"{url}/bad.pth", "0" * 64))
    assert not (tmp_path / "cache" / "bad.pth").exists()


def test_release_download_network_error_is_explained(file_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = file_server
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ResolveError, match="could not download .*missing.pth.*local path"):
        hub.download(Release(f"{url}/missing.pth", None))


V2_NAMES = ["BIAS-7B", "LORA-BIAS-7B", "CAPTION-7B", "LORA-BIAS-7B-v21"]


@pytest.mark.parametrize("name", V2_NAMES)
def test_v2_names_resolve_to_their_releases_with_the_sha256_their_names_carry(name: str) -> None:
    release = hub.OFFICIAL_ADAPTERS[name]
    assert release.url.startswith("https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/v.2.")
    digest, file_name = release.filename.split("_", 1)
    assert file_name == f"{name}.pth" and release.sha256 == digest and len(digest) == 64


def test_v2_name_offline_says_which_file(hf_cache: Path) -> None:
    with pytest.raises(ResolveError, match="5088aeb63a89.*_CAPTION-7B.pth is not in the local cache"):
        hub.resolve_adapter("CAPTION-7B")


def test_sha256_named_release_is_verified_on_download(file_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, root = file_server
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload = b"v2 weights" * 100
    good = f"{hashlib.sha256(payload).hexdigest()}_TINY-7B.pth"
    (root / good).write_bytes(payload)
    assert hub.download(hub.sha256_named_release(f"{url}/{good}")).read_bytes() == payload
    bad = f"{'1' * 64}_TINY-7B.pth"
    (root / bad).write_bytes(payload)
    with pytest.raises(ResolveError, match="does not match the published"):
        hub.download(hub.sha256_named_release(f"{url}/{bad}"))
    with pytest.raises(ValueError, match="does not start with a sha256"):
        hub.sha256_named_release(f"{url}/BIAS-7B.pth")
