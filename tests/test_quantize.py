"""int8 weight-only serving against the full-precision model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llama_adapter
from llama_adapter.model.quantize import Int8Linear, quantize_weight

from .test_model import SAMPLE, adapted_copy, tokens_for


def test_quantize_weight_round_trip_error_is_bounded() -> None:
    w = torch.randn(64, 96)
    q, scale = quantize_weight(w, torch.float32)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    # absmax rounding: at most half a step per element
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_int8_error_is_of_the_order_of_bf16_rounding(hf_dir: Path, pipe) -> None:
    """Against fp32 logits, int8 weights may err at most a few times what bf16 itself does."""
    quant = llama_adapter.load(hf_dir, device="cpu", dtype="fp32", quantize="int8")
    bf16 = llama_adapter.load(hf_dir, device="cpu", dtype="bf16")
    names = [n for n, m in quant.model.named_modules() if isinstance(m, Int8Linear)]
    assert len(names) == 7 * quant.model.args.n_layers + 1  # q, k, v, o, w1, w2, w3 per layer, and the output head
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        ref = pipe.model(tokens)
        int8_err, bf16_err = (quant.model(tokens) - ref).abs(), (bf16.model(tokens) - ref).abs()
        agree = (quant.model(tokens).argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert int8_err.max() < 2.5 * bf16_err.max() and int8_err.mean() < 2.5 * bf16_err.mean()
    assert agree > 0.85


def test_int8_runs_in_bf16(hf_dir: Path, pipe) -> None:
    quant = llama_adapter.load(hf_dir, device="cpu", dtype="bf16", quantize="int8")
    assert quant.dtype == torch.bfloat16
    assert "".join(quant.stream("the water", max_new_tokens=6, temperature=0))


def test_int8_halves_weight_memory_and_streams_with_an_adapter(tmp_path: Path, hf_dir: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=1.0)
    path = llama_adapter.save_adapter(tmp_path / "a.safetensors", model.adapter_parameters(), model.adapter_config, model.args)
    quant = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", quantize="int8")

    def matrix_bytes(m: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if n.startswith("layers.") and t.dim() == 2)

    assert matrix_bytes(quant.model) * 3.9 < matrix_bytes(pipe.model)
    full = llama_adapter.Pipeline(model, pipe.tokenizer)
    a = "".join(full.stream("the water", max_new_tokens=10, temperature=0))
    b = "".join(quant.stream("the water", max_new_tokens=10, temperature=0))
    assert b and a[:3] == b[:3]


def test_unknown_quantize_mode_is_refused(hf_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'"):
        llama_adapter.load(hf_dir, device="cpu", quantize="int3")


def test_int8_keeps_lora_hooks_and_biases_in_full_precision(tmp_path: Path, hf_dir: Path, pipe) -> None:
    cfg = llama_adapter.AdapterConfig(adapter_len=3, adapter_layer=2, bias=True, lora_rank=4)
    fresh = llama_adapter.load(hf_dir, cfg, device="cpu", dtype="fp32")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in fresh.model.adapter_parameters().items():
            if ".lora_" in name or name.endswith((".bias", ".gate")):
                p.normal_(0.0, 0.2)
    path = llama_adapter.save_adapter(tmp_path / "lora.safetensors", fresh.adapter_tensors(), cfg, fresh.model.args)
    full = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32")
    quant = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", quantize="int8")
    attention = quant.model.layers[3].attention
    assert isinstance(attention.wq, Int8Linear) and attention.wq.bias is not None
    assert isinstance(attention.lora_wq_l1, torch.nn.Linear)  # LoRA itself is not quantized
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        lora_effect = (full.model(tokens) - pipe.model(tokens)).abs().mean()
        int8_error = (quant.model(tokens) - full.model(tokens)).abs().mean()
    assert int8_error < lora_effect / 3  # the hooks and biases still act on the int8 projections
