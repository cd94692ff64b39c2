"""Resolve what a user types (a local path, a Hugging Face repo id, an official release name) to local files.

Hugging Face repos go through ``huggingface_hub`` (its cache, its progress bars, its offline
mode).  Official releases hosted elsewhere are downloaded once into our cache directory,
with a progress bar, and checked against their known sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from tqdm.auto import tqdm

from ..errors import ResolveError


@dataclass(frozen=True)
class Release:
    url: str
    sha256: str | None  # None only where no checksum was ever published

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def sha256_named_release(url: str) -> Release:
    """A release whose file name starts with its sha256 (``<sha256>_<name>.pth``), as the official V2 loader assumes."""
    digest = url.rsplit("/", 1)[-1].split("_", 1)[0]
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{url}: the file name does not start with a sha256")
    return Release(url, digest)


_V2_RELEASES = "https://github.com/OpenGVLab/LLaMA-Adapter/releases/download"

# Official adapter releases by name.
OFFICIAL_ADAPTERS: dict[str, Release] = {
    # No checksum was ever published for the V1 file.
    "LLaMA-Adapter-V1": Release(
        "https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/v.1.0.0/llama_adapter_len10_layer30_release.pth",
        None,
    ),
    # The multimodal V2 models (LLaMA-7B base + CLIP ViT-L/14), as listed in the official _MODELS.
    "BIAS-7B": sha256_named_release(f"{_V2_RELEASES}/v.2.0.0/7fa55208379faf2dd862565284101b0e4a2a72114d6490a95e432cf9d9b6c813_BIAS-7B.pth"),
    "LORA-BIAS-7B": sha256_named_release(
        f"{_V2_RELEASES}/v.2.0.0/1bcbffc43484332672092e0024a8699a6eb5f558161aebf98a7c6b1db67224d1_LORA-BIAS-7B.pth"
    ),
    "CAPTION-7B": sha256_named_release(
        f"{_V2_RELEASES}/v.2.0.0/5088aeb63a89746b90bcfd5cb819e1c7411b2771b267c6d131ce73e250a8abf0_CAPTION-7B.pth"
    ),
    "LORA-BIAS-7B-v21": sha256_named_release(
        f"{_V2_RELEASES}/v.2.1.0/d26d107eec32127ac86ef1997cf7169de1c56a59c539fc1258c6798b969e289c_LORA-BIAS-7B-v21.pth"
    ),
}

ADAPTER_FILENAME = "adapter.safetensors"  # what our training writes; the file looked for in an adapter repo
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a peft adapter directory or repo
_BASE_PATTERNS = {
    "hf": [
        "config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ],
    "meta": ["params.json", "consolidated.*.pth", "tokenizer.model"],
}
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?:/(?P<file>.+))?$")


def cache_dir() -> Path:
    """Where non-Hub downloads live: $LLAMA_ADAPTER_CACHE, else next to the Hugging Face cache."""
    env = os.environ.get("LLAMA_ADAPTER_CACHE")
    return Path(env) if env else Path(hf_constants.HF_HOME) / "llama_adapter"


def is_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in {"1", "ON", "YES", "TRUE"} or bool(hf_constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class RepoSpec:
    repo_id: str
    revision: str | None
    filename: str | None


def parse_repo_spec(name: str) -> RepoSpec | None:
    """``owner/name``, ``owner/name@revision``, ``owner/name/path/in/repo`` or ``owner/name@rev/path``."""
    m = _REPO_RE.match(name)
    if not m:
        return None
    return RepoSpec(m.group("repo"), m.group("rev"), m.group("file"))


MAX_SHOWN = 120  # characters of a name that a message repeats


def _shown(name: str | Path) -> str:
    """A name as messages quote it: at most MAX_SHOWN characters (an over-long one is cut, with its length)."""
    text = str(name)
    return repr(text) if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]!r}... ({len(text):,} characters)"


def _exists(path: Path, what: str) -> bool:
    """Whether ``path`` exists; a name the file system cannot take (too long, NUL byte) is a ResolveError."""
    try:
        return path.exists()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ResolveError(f"{what} {_shown(path)} cannot be a path ({reason}) nor a repo id: check the name") from None


def resolve_base(name: str | Path) -> Path:
    """A directory holding a Meta or HF Llama checkpoint and its tokenizer.model."""
    path = Path(name).expanduser()
    if _exists(path, "base model"):
        if not path.is_dir():
            raise ResolveError(f"base model {path} is a file; pass the directory that holds it")
        return path
    spec = parse_repo_spec(str(name))
    if spec is None or spec.filename is not None:
        raise ResolveError(f"base model {_shown(name)} is neither an existing directory nor a Hugging Face repo id (owner/name[@revision])")
    return _snapshot(spec)


def resolve_adapter(name: str | Path) -> Path:
    """A single adapter file (local path, official release name, or Hub repo id / file in a repo), or a peft
    adapter directory (local, or the snapshot of a Hub repo holding ``adapter_config.json``)."""
    path = Path(name).expanduser()
    if _exists(path, "adapter"):
        if path.is_dir():
            candidate = path / ADAPTER_FILENAME
            if candidate.is_file():
                return candidate
            if (path / PEFT_CONFIG).is_file():  # a peft adapter directory: read as a whole
                return path
            raise ResolveError(f"adapter directory {path} has neither {ADAPTER_FILENAME} nor a peft {PEFT_CONFIG}")
        return path
    if str(name) in OFFICIAL_ADAPTERS:
        return download(OFFICIAL_ADAPTERS[str(name)])
    spec = parse_repo_spec(str(name))
    if spec is None:
        known = ", ".join(OFFICIAL_ADAPTERS)
        raise ResolveError(f"adapter {_shown(name)} is not a file, an official name ({known}), or a Hugging Face repo id")
    if spec.filename is not None:
        return _hub_file(spec.repo_id, spec.filename, spec.revision)
    try:
        return _hub_file(spec.repo_id, ADAPTER_FILENAME, spec.revision)
    except ResolveError as ours:
        try:  # a peft adapter repo: its two files, read as a directory
            config = _hub_file(spec.repo_id, PEFT_CONFIG, spec.revision)
            _hub_file(spec.repo_id, PEFT_WEIGHTS, spec.revision)
        except ResolveError:
            raise ours from None
        return config.parent


def _not_cached_message(what: str, source: str, offline: bool) -> str:
    why = "HF_HUB_OFFLINE is set, so it cannot be downloaded" if offline else "the Hugging Face Hub cannot be reached"
    fix = "or unset HF_HUB_OFFLINE." if offline else "or check the network connection."
    return (
        f"{what} is not in the local cache and {why}. "
        f"Download it on a connected machine ({source}), copy it here and pass its local path, {fix}"
    )


def _network_message(what: str, err: Exception) -> str:
    return (
        f"could not download {what}: {err}. Check the network connection, or pass a local path instead, "
        "or set HF_HUB_OFFLINE=1 to use only what is cached."
    )


def _list_repo_files(spec: RepoSpec) -> list[str] | None:
    """The repo's files, or None when the Hub cannot be reached (then only the cache is used)."""
    try:
        return HfApi().list_repo_files(spec.repo_id, revision=spec.revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception:  # connection errors come from the HTTP client, whichever it is
        return None


def _snapshot(spec: RepoSpec) -> Path:
    what = f"Hugging Face repo {spec.repo_id}" + (f"@{spec.revision}" if spec.revision else "")
    offline = is_offline()
    try:
        files = None if offline else _list_repo_files(spec)
        if files is None:
            patterns = _BASE_PATTERNS["hf"] + _BASE_PATTERNS["meta"]
        else:
            patterns = _BASE_PATTERNS["hf" if any(f.endswith(".safetensors") for f in files) else "meta"]
        cached_only = files is None
        return Path(snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=patterns, local_files_only=cached_only))
    except LocalEntryNotFoundError:
        raise ResolveError(_not_cached_message(what, f"`hf download {spec.repo_id}`", offline)) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ResolveError(
            f"{what} does not exist or is private ({type(e).__name__}); check the name, or log in with `hf auth login`"
        ) from None
    except Exception as e:  # network errors come from the HTTP client (httpx), not only as OSError
        raise ResolveError(_network_message(what, e)) from None


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    what = f"{filename} from Hugging Face repo {repo_id}" + (f"@{revision}" if revision else "")
    offline = is_offline()
    try:
        # Online, huggingface_hub itself falls back to the cache when the Hub is unreachable.
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise ResolveError(_not_cached_message(what, f"`hf download {repo_id} {filename}`", offline)) from None
    except EntryNotFoundError:
        raise ResolveError(f"{what}: no such file in the repo") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ResolveError(f"{what}: the repo or revision does not exist or is private ({type(e).__name__})") from None
    except Exception as e:  # network errors come from the HTTP client (httpx), not only as OSError
        raise ResolveError(_network_message(what, e)) from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(release: Release) -> Path:
    """Fetch a release file into the cache once (atomic rename after the checksum passes)."""
    target = cache_dir() / release.filename
    if target.is_file():
        return target
    if is_offline():
        raise ResolveError(_not_cached_message(release.filename, f"from {release.url}", offline=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(release.url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=release.filename) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ResolveError(_network_message(release.url, e)) from None
    if release.sha256 is not None:
        digest = sha256_of(partial)
        if digest != release.sha256:
            partial.unlink()
            raise ResolveError(
                f"{release.url}: sha256 {digest} does not match the published {release.sha256}; the download is corrupt, try again"
            )
    shutil.move(str(partial), target)
    return target
