"""CPU serving formats: int4 against its formula, the memory-based choice, the kernel probe and paths."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import llama_adapter
from llama_adapter import ModelConfig
from llama_adapter.model import kernels, native, probe
from llama_adapter.model.build import build_model, meta_model
from llama_adapter.model.kernels import NEVER
from llama_adapter.model.llama import CacheStep, KVCache
from llama_adapter.model.quantize import (
    HUGE_PAGE,
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    int4_cpu_layout,
    on_huge_pages,
    pack_int4,
    panel_int4,
    quantize_int4,
    quantize_weight,
    unpack_int4,
)
from llama_adapter.serve import formats
from llama_adapter.serve.engine import Decoder

from .test_model import SAMPLE, tokens_for

GiB = 1 << 30


@pytest.fixture(scope="module")
def fp32(int4_dir: Path):
    return llama_adapter.load(int4_dir, device="cpu", dtype="fp32")


@pytest.fixture
def restore_plan():
    old = kernels.PLAN
    yield
    kernels.set_plan(old)


def dequantised_by_formula(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """w[n, k] = (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n], written out plainly."""
    scale = scales_and_zeros[..., 0].float().t().repeat_interleave(group, dim=1)
    zero = scales_and_zeros[..., 1].float().t().repeat_interleave(group, dim=1)
    return (q.float() - 8) * scale + zero


def int4_module(w: torch.Tensor) -> tuple[Int4Linear, torch.Tensor]:
    m = Int4Linear(w.shape[1], w.shape[0], torch.bfloat16)
    q, m.scales_and_zeros = quantize_int4(w, torch.bfloat16)
    m.weight = pack_int4(q, int4_cpu_layout())
    return m, q


def test_int4_quantization_and_matmul_follow_the_formula(restore_plan) -> None:
    torch.manual_seed(0)
    w = torch.randn(192, 2 * INT4_GROUP) * 0.05
    m, q = int4_module(w)
    ref_w = dequantised_by_formula(q, m.scales_and_zeros, INT4_GROUP)
    step = m.scales_and_zeros[..., 0].float().t().repeat_interleave(INT4_GROUP, dim=1)
    assert ((ref_w - w).abs() <= step * 0.5 + 2e-3).all()  # half a step, plus the bf16 rounding of scale and zero
    for cpu_layout in (True, False):
        if cpu_layout and not int4_cpu_layout():
            continue
        assert torch.equal(unpack_int4(pack_int4(q, cpu_layout), cpu_layout), q)
    x = torch.randn(2, 5, 2 * INT4_GROUP)
    want = x @ ref_w.t()
    # The fused kernel (few tokens) and the dequantise + GEMM path (many), both in bf16.
    for start in (NEVER, 1):
        with kernels.using(dequant_from={"int8": 32, "int4": start}), torch.inference_mode():
            got = m(x)
        assert got.dtype == x.dtype and got.shape == (2, 5, 192)
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_int4_tiny_model_stays_within_a_bound_of_fp32(int4_dir: Path, fp32) -> None:
    """int4 errs in proportion to its step: within 20x what int8 does (15 levels per group of 128 against
    254 per channel: a step about 17x coarser), and under half the mean |logit| on this random model."""
    quant = llama_adapter.load(int4_dir, device="cpu", quantize="int4")
    assert quant.dtype == torch.bfloat16  # a quantized CPU model defaults to the kernel's activation dtype
    assert sum(isinstance(m, Int4Linear) for m in quant.model.modules()) == 7 * quant.model.args.n_layers + 1
    int8 = llama_adapter.load(int4_dir, device="cpu", quantize="int8")
    tokens = tokens_for(fp32, SAMPLE)
    with torch.inference_mode():
        ref, got, got8 = fp32.model(tokens), quant.model(tokens), int8.model(tokens)
    err4, err8 = (got - ref).abs(), (got8 - ref).abs()
    assert err4.mean() < 0.5 * ref.abs().mean() and err4.max() < 0.5 * ref.abs().max()
    assert err4.mean() < 20 * err8.mean() and err4.max() < 20 * err8.max()


@pytest.mark.parametrize(("mode", "int8_gemm"), [("int8", False), ("int8", True), ("int4", False)])
def test_prefill_path_equals_the_decode_path(int4_dir: Path, mode: str, int8_gemm: bool, restore_plan) -> None:
    """A prompt's last logits from one many-token forward (dequantise + GEMM, or the int8 GEMM) equal those of
    feeding it token by token (fused kernel)."""
    pipe = llama_adapter.load(int4_dir, device="cpu", dtype="fp32", quantize=mode)
    kernels.set_plan(replace(kernels.PLAN, int8_gemm=int8_gemm))
    model = pipe.model
    tokens = tokens_for(pipe, SAMPLE[:1])
    n = tokens.shape[1]
    positions = torch.arange(n)[None]
    kv = model.adapter_kv()
    with torch.inference_mode():
        with kernels.using(dequant_from={mode: 2}):
            cache = KVCache(model.args, 1, n, torch.float32, torch.device("cpu"))
            prefill = model.forward_cached(tokens, positions, CacheStep(cache, 0, None), kv)
        cache = KVCache(model.args, 1, n, torch.float32, torch.device("cpu"))
        with kernels.using(dequant_from={mode: 2}):  # one token at a time never reaches the threshold
            for i in range(n):
                step = model.forward_cached(tokens[:, i : i + 1], positions[:, i : i + 1], CacheStep(cache, i, None), kv)
    torch.testing.assert_close(prefill, step, rtol=0.03, atol=0.03 * step.abs().max().item())
    assert (prefill.argmax(-1) == step.argmax(-1)).all()


@pytest.mark.parametrize(("mode", "op"), [("int8", "aten::_weight_int8pack_mm"), ("int4", "aten::_weight_int4pack_mm_for_cpu")])
def test_quantized_fp32_model_decodes_on_the_fast_kernel(int4_dir: Path, mode: str, op: str) -> None:
    """Even an fp32 model never feeds fp32 activations to the weight-only kernels: their fp32 paths are the slow ones."""
    pipe = llama_adapter.load(int4_dir, device="cpu", dtype="fp32", quantize=mode)
    steps = Decoder(pipe.model, pipe.tokenizer.pad_id).steps([[1, 5, 9]], 3, 0.0, 1.0, None)
    next(steps)  # prefill
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        next(steps)
    calls = [e for e in prof.events() if e.name == op]
    assert len(calls) == 7 * pipe.model.args.n_layers + 1
    want = {torch.bfloat16: "c10::BFloat16", torch.float32: "float"}[kernels.PLAN.kernel_dtype[mode]]
    assert {e.input_dtypes[0] for e in calls} == {want} and want != "float"


def test_int4_with_a_width_not_divisible_by_the_group_is_refused(hf_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"divisible by its group size 128, and this model has \[64, 176\].*use --quantize int8"):
        llama_adapter.load(hf_dir, device="cpu", quantize="int4")


def test_available_memory_reads_the_cgroup_limit_then_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65000000 kB\nMemAvailable:   50000000 kB\n")
    (tmp_path / "cg").mkdir()
    assert formats.available_memory(tmp_path / "cg", meminfo) == (50000000 * 1024, "MemAvailable")
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert formats.available_memory(tmp_path / "cg", meminfo)[0] == 50000000 * 1024  # no limit
    (tmp_path / "cg" / "memory.max").write_text(f"{16 * GiB}\n")
    (tmp_path / "cg" / "memory.current").write_text(f"{GiB}\n")
    assert formats.available_memory(tmp_path / "cg", meminfo) == (15 * GiB, "cgroup limit 16.0 GiB")


@pytest.mark.parametrize(
    ("gib", "dtype", "quantize"),
    [
        (64, torch.float32, None),
        (32, torch.bfloat16, None),
        (16, torch.bfloat16, "int8"),  # a free CPU Space
        (8, torch.bfloat16, "int4"),
        (3, torch.bfloat16, "int4"),
    ],
)
def test_the_automatic_choice_for_7b_picks_what_fits(gib: int, dtype: torch.dtype, quantize: str | None) -> None:
    fmt = formats.choose_format(ModelConfig(max_seq_len=2048), gib * GiB, "test")
    assert (fmt.dtype, fmt.quantize) == (dtype, quantize)
    if gib == 3:
        assert "loading may fail" in fmt.reason


def test_load_chooses_the_format_from_a_faked_memory_limit(int4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=384, max_seq_len=256, ffn_dim_multiplier=None)
    monkeypatch.setattr(formats, "RUNTIME_BYTES", 0)
    monkeypatch.setattr(formats, "LOADING_BYTES", 0)
    # Room for int8 but not for bf16.
    limit = (formats.serving_bytes(args, torch.bfloat16, None) + formats.serving_bytes(args, torch.bfloat16, "int8")) // 2
    monkeypatch.setattr("llama_adapter.serve.loading.available_memory", lambda: (limit, "faked cgroup limit"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("llama_adapter.load").addHandler(handler)
    try:
        pipe = llama_adapter.load(int4_dir, device="cpu")
    finally:
        logging.getLogger("llama_adapter.load").removeHandler(handler)
    assert pipe.dtype == torch.bfloat16 and any(isinstance(m, Int8Linear) for m in pipe.model.modules())
    (line,) = [r.getMessage() for r in records if r.getMessage().startswith("weights:")]
    assert "int8 weight-only" in line and "faked cgroup limit" in line and "too large: fp32" in line


def test_the_probe_falls_back_when_a_kernel_is_missing(monkeypatch: pytest.MonkeyPatch, restore_plan) -> None:
    def missing(*args: object) -> None:
        raise RuntimeError("not built with this kernel")

    monkeypatch.setattr(probe, "_done", {})
    monkeypatch.setattr(native, "ops", lambda: None)  # our kernels could not be built
    monkeypatch.setattr(torch, "_weight_int8pack_mm", missing)
    monkeypatch.setattr(torch, "_int_mm", missing)
    monkeypatch.setattr(probe, "onednn_linear", missing)
    args = ModelConfig(dim=1024, n_layers=1, n_heads=8, vocab_size=64)
    plan = probe.probe_kernels(args, torch.bfloat16, "int8")
    assert plan.dequant_from["int8"] == 1 and kernels.PLAN is plan  # no fused kernel: always dequantise + GEMM
    assert not plan.int8_gemm and "dequantise + bfloat16 GEMM always" in plan.describe(torch.bfloat16, "int8")
    assert probe.probe_kernels(args, torch.float32, None).fp32_onednn is False
    # The model still computes the right products through the remaining path.
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    m = probe.quantized_module("int8", w, torch.bfloat16)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        got = m(x)
    want = x @ (m.weight.float() * m.scale.float()[:, None]).t()
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_the_app_panel_shows_the_weight_format(int4_dir: Path) -> None:
    import app

    pipe = llama_adapter.load(int4_dir, device="cpu", quantize="int4")
    panel = app.model_panel(app.Models(pipe, None, tiny=False))
    assert "<th>Weights</th><td>int4 weight-only (groups of 128), bfloat16 activations</td>" in panel


def test_an_adapter_on_an_int4_base_shares_its_tensors_and_keeps_lora_and_biases_unquantized(int4_dir: Path) -> None:
    base = llama_adapter.load(int4_dir, device="cpu", quantize="int4")
    cfg = llama_adapter.AdapterConfig(adapter_len=3, adapter_layer=2, bias=True, lora_rank=4)
    pipe = base.with_adapter(cfg)
    wq, base_wq = pipe.model.layers[3].attention.wq, base.model.layers[3].attention.wq
    assert isinstance(wq, Int4Linear) and wq.weight.data_ptr() == base_wq.weight.data_ptr()
    assert wq.scales_and_zeros.data_ptr() == base_wq.scales_and_zeros.data_ptr()
    assert wq.bias is not None and wq.bias.dtype == pipe.dtype  # a tuned bias is not quantized
    assert type(pipe.model.layers[3].attention.lora_wq_l1) is torch.nn.Linear
    assert "".join(pipe.stream("the water", max_new_tokens=4, temperature=0))


def test_without_a_memory_figure_load_keeps_fp32(int4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown() -> tuple[int, str]:
        raise RuntimeError("cannot tell how much memory is free here")

    monkeypatch.setattr("llama_adapter.serve.loading.available_memory", unknown)
    assert llama_adapter.load(int4_dir, device="cpu").dtype == torch.float32


def test_int8_gemm_follows_the_formula_even_with_outlier_channels(restore_plan) -> None:
    """The int8 GEMM (activations in two int8 passes) against x @ (q * scale)^T in fp32: far closer than the
    bf16 dequantise + GEMM path, although a few channels of x are 50x the rest (as in LLaMA's activations)."""
    torch.manual_seed(0)
    m = probe.quantized_module("int8", torch.randn(256, 512) * 0.02, torch.bfloat16)
    assert isinstance(m, Int8Linear)
    x = torch.randn(2, 40, 512)
    x[..., :4] *= 50
    want = x @ (m.weight.float() * m.scale.float()[:, None]).t()
    with torch.inference_mode():
        with kernels.using(dequant_from={"int8": 2}, int8_gemm=True):
            got = m(x)
        with kernels.using(dequant_from={"int8": 2}, int8_gemm=False):
            bf16 = m(x)
    assert got.dtype == x.dtype and got.shape == want.shape
    err, bf16_err = (got - want).abs().max().item(), (bf16 - want).abs().max().item()
    assert err < 1e-3 * want.abs().max().item() and err < bf16_err / 4, (err, bf16_err)


def test_quantized_weights_are_moved_to_huge_pages_unchanged() -> None:
    """Loading copies each quantized matrix of 2 MiB or more to memory aligned for 2 MiB pages (asked of Linux with
    madvise), with the same values; smaller ones stay where they are."""
    torch.manual_seed(0)
    args = ModelConfig(dim=1024, n_layers=1, n_heads=8, vocab_size=64)  # FFN matrices of 2816 x 1024: 2.75 MiB in int8
    tensors = {n: torch.randn(t.shape) * 0.02 for n, t in meta_model(args, None, torch.float32).state_dict().items()}
    model = build_model(args, None, tensors.items(), dtype=torch.float32, device=torch.device("cpu"), int8=["layers.0.feed_forward.w1"])
    w1 = model.layers[0].feed_forward.w1
    assert w1.weight.data_ptr() % HUGE_PAGE == 0
    want, scale = quantize_weight(tensors["layers.0.feed_forward.w1.weight"], torch.float32)
    assert torch.equal(w1.weight, want) and torch.equal(w1.scale, scale)
    small = torch.zeros(16, 64, dtype=torch.int8)
    assert on_huge_pages(small) is small
    # int4 in our panel layout: weights and scales, views of one buffer, are made there in the first place.
    args = replace(args, dim=2048)  # 5632 x 2048: 6.1 MiB of int4 panels
    tensors = {n: torch.randn(t.shape) * 0.02 for n, t in meta_model(args, None, torch.float32).state_dict().items()}
    with kernels.using(ours={"int8": False, "int4": True}):
        model = build_model(args, None, tensors.items(), dtype=torch.float32, device=torch.device("cpu"), int4=["layers.0.feed_forward.w1"])
    w1 = model.layers[0].feed_forward.w1
    assert w1.layout == "panels" and w1.weight.data_ptr() % HUGE_PAGE == 0
    want = panel_int4(*quantize_int4(tensors["layers.0.feed_forward.w1.weight"], torch.float32))
    assert torch.equal(w1.weight, want[0]) and torch.equal(w1.scales_and_zeros, want[1])
