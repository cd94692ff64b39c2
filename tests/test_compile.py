"""The opt-in compiled decode step (static shapes) against the eager path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llama_adapter
from llama_adapter.serve.engine import static_rows

from .test_model import adapted_copy


@pytest.fixture
def light_compile(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """torch.compile without code generation: still one whole graph (fullgraph), just fast to build."""
    calls: list[dict] = []
    real = torch.compile

    def compile_(fn, **kwargs):
        calls.append(kwargs)
        return real(fn, **{**kwargs, "backend": "aot_eager", "mode": None})

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    return calls


def test_compiled_decode_equals_eager(light_compile: list[dict], hf_dir: Path, pipe) -> None:
    compiled = llama_adapter.load(hf_dir, device="cpu", dtype="fp32", compile=True)
    assert light_compile == [{"options": None, "fullgraph": True, "dynamic": False}]
    for prompt in ["the water", "which way do they go now"]:
        expected = "".join(pipe.stream(prompt, max_new_tokens=24, temperature=0))
        assert "".join(compiled.stream(prompt, max_new_tokens=24, temperature=0)) == expected
    prompts = ["the water", "a long time ago the people made oil", "write"]
    assert compiled.generate(prompts, max_new_tokens=12, temperature=0) == pipe.generate(prompts, max_new_tokens=12, temperature=0)


def test_compiled_decode_with_adapter_matches_eager_logits(light_compile: list[dict], pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=1.0)
    eager = llama_adapter.Pipeline(model, pipe.tokenizer)
    compiled = llama_adapter.Pipeline(model, pipe.tokenizer, compile=True)
    for seed in range(3):
        a = eager.stream("the people", max_new_tokens=16, temperature=0.8, seed=seed)
        b = compiled.stream("the people", max_new_tokens=16, temperature=0.8, seed=seed)
        assert "".join(a) == "".join(b) and a.generated_ids == b.generated_ids


def test_compiled_decode_serves_every_batch_size(light_compile: list[dict], pipe) -> None:
    """A compiled pipeline decodes each scheduler row with the one-row static step, so any number of
    concurrent prompts decode as the eager path does.  (``Decoder`` batches, used by the benchmarks,
    are padded to a power of two.)"""
    compiled = llama_adapter.Pipeline(pipe.model, pipe.tokenizer, compile=True)
    words = ["the water", "a long time ago", "write", "which way do they go now", "people"]
    for batch in [9, *range(1, 9)]:
        prompts = [words[i % len(words)] for i in range(batch)]
        expected = pipe.generate(prompts, max_new_tokens=3, temperature=0)
        assert compiled.generate(prompts, max_new_tokens=3, temperature=0) == expected, batch
    assert [static_rows(b) for b in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 4, 4, 8, 16, 16, 32]
