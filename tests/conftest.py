"""Session fixtures: a sentencepiece tokenizer with LLaMA's ids, tiny HF and Meta checkpoints, the running app."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from llama_adapter.tiny import train_tokenizer

VOCAB = 384
WORDS = (
    "the a an of to in is it that was for on are as with his they at be this from have or one had by word but not what "
    "all were we when your can said there use each which she do how their if will up other about out many then them these "
    "so some her would make like him into time has look two more write go see number no way could people my than first "
    "water been call who oil its now find long down day did get come made may part instruction response input task "
    "below describes request appropriately completes write"
).split()
SPECIAL_LINES = [
    "Ünïcödé façade naïve café — “quotes” and ‘apostrophes’…",
    "日本語のテキストと中文文本混合。",
    "emoji 🙂 🚀 👍🏽 and symbols ∑ ∫ √ ≤ ≥",
    "    leading spaces and\ttabs\nnewlines\n\n### Instruction:\n### Response:",
]


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + rng.choice([".", "!", "?", ",", ":"]) for _ in range(n)]
    lines += [f"{rng.randint(0, 10**6)} items at {rng.random():.3f}" for _ in range(200)]
    return lines + SPECIAL_LINES * 3


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad) and byte fallback; rare characters
    (emoji, CJK) are left to byte pieces."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), VOCAB, corpus_lines(), character_coverage=0.99)


def hf_config(**overrides: object) -> dict[str, object]:
    cfg: dict[str, object] = dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return cfg


def make_hf_model(seed: int = 0, **overrides: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**hf_config(**overrides))
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def hf_model() -> torch.nn.Module:
    """The independent reference: transformers' LlamaForCausalLM (GQA: 4 heads, 2 kv heads)."""
    return make_hf_model()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, hf_model: torch.nn.Module, tokenizer_path: Path) -> Path:
    out = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def int4_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    """A tiny HF Llama whose widths (128, FFN 384) are multiples of the int4 group."""
    out = tmp_path_factory.mktemp("hf128")
    make_hf_model(seed=3, hidden_size=128, intermediate_size=384, initializer_range=0.05).save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def hf_sharded_dir(tmp_path_factory: pytest.TempPathFactory, hf_model: torch.nn.Module, tokenizer_path: Path) -> Path:
    """The same weights as ``hf_dir`` in several safetensors files plus an index."""
    out = tmp_path_factory.mktemp("hf_sharded")
    hf_model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


# Meta's model-parallel layout, restated here: column-parallel weights split rows, row-parallel split columns.
SPLIT_ROWS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
SPLIT_COLS = ("tok_embeddings", "attention.wo", "feed_forward.w2")


def write_meta_dir(out: Path, state: dict[str, torch.Tensor], params: dict[str, object], tokenizer_path: Path, shards: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        shard = {}
        for name, t in state.items():
            stem = name.rsplit(".", 1)[0]
            if stem.endswith(SPLIT_ROWS):
                t = t.chunk(shards, dim=0)[i]
            elif stem.endswith(SPLIT_COLS):
                t = t.chunk(shards, dim=1)[i]
            shard[name] = t.clone()
        shard["rope.freqs"] = torch.zeros(8)  # LLaMA-1 shards carry this unused buffer
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    (out / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-3-style base (tests/llama3.py): byte-level BPE tokenizer.json, chat template, llama3 RoPE, tied embeddings, GQA."""
    from .llama3 import write_llama3_base

    return write_llama3_base(tmp_path_factory.mktemp("llama3") / "base", corpus_lines())


@pytest.fixture(scope="session")
def llama3_hf(llama3_dir: Path):
    """The reference for the Llama-3-style base: transformers' model and tokenizer, read from its directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama3_dir, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(llama3_dir)


@pytest.fixture(scope="session")
def llama3_pipe(llama3_dir: Path):
    import llama_adapter

    return llama_adapter.load(llama3_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def pipe(hf_dir: Path):
    """The tiny base model loaded through the public API (fp32, CPU)."""
    import llama_adapter

    return llama_adapter.load(hf_dir, device="cpu", dtype="fp32")


ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = ROOT / "assets" / "example-house.jpg"
# The app's request log: one line when a generation starts, one when it ends (and why).
STARTED = re.compile(r"chat #(\d+): started")
FINISHED = re.compile(r"chat #(\d+): (\w+) after (\d+) tokens")


class AppServer:
    """``python app.py`` (``--tiny`` unless told otherwise) in a subprocess; its request log goes to a file the tests read."""

    def __init__(self, root: Path, log_path: Path, args: Sequence[str] = ("--tiny",)) -> None:
        self.log_path = log_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_ADAPTER_", "GRADIO_"))}
        env |= {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", *args, "--port", str(self.port)], cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"app.py did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def serve_app(log_dir: Path, args: Sequence[str] = ("--tiny",)) -> Iterator[AppServer]:
    """A fixture's body: ``app.py args`` started and ready, stopped when the fixture ends."""
    server = AppServer(ROOT, log_dir / "app.log", args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """The real app, started once for all client and browser tests."""
    yield from serve_app(tmp_path_factory.mktemp("app"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run fastest single-threaded, and other test runs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
