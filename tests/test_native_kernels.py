"""Our CPU kernels (``cpu_quant.cpp``, ``cpu_attention.cpp``): each product against its formula written plainly,
the int4 panel layout, a model decoding on them, the probe choosing them, and every way they can be absent.
The attention kernel's own tests are with the other attention paths (``test_attention.py``)."""

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
from llama_adapter.model.kernels import NEVER
from llama_adapter.model.llama import RMSNorm, apply_rope, rope_tables
from llama_adapter.model.quantize import INT4_GROUP, Int4Linear, panel_int4, quantize_int4
from llama_adapter.serve.engine import Decoder

from .test_batching import alone, drain_in_threads
from .test_model import SAMPLE, tokens_for

MISSING = [f for f in native.NEEDED_FLAGS if f not in native.cpu_flags()]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"this CPU lacks {MISSING}: our kernels are not built here")


@pytest.fixture(scope="module")
def ops():
    built = native.ops()
    assert built is not None, "our CPU kernels did not build: the README's test command installs g++ and ninja"
    return built


@pytest.fixture
def restore_plan():
    old = kernels.PLAN
    yield
    kernels.set_plan(old)


def activations_by_formula(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels see it: per block, q = round(x * 127 / amax) in fp32, times amax / 127."""
    xb = x.float().view(x.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    q = (xb * torch.where(amax > 0, 127 / amax, 0.0)).round()
    return (q * (amax / 127)).view_as(x).double()


@pytest.mark.parametrize("kernel", ["int8_linear", "int8_gemm"])
def test_int8_product_follows_its_formula(ops, kernel: str) -> None:
    torch.manual_seed(0)
    product = getattr(ops, kernel)
    # 260 rows: whole tiles of 4 (the row kernel) or panels of 16 (the GEMM), and a remainder; -127 and 127 both present
    w = torch.randint(-127, 128, (260, 512), dtype=torch.int8)
    w[0, :2] = torch.tensor([-127, 127], dtype=torch.int8)
    scale = torch.rand(260)
    for m in (1, 3, 4, 9, 12, 29):  # every token-tile size of the row kernel; whole tiles of 12 and a remainder for the GEMM
        x = torch.randn(m, 512)
        x[:, 7] = 0  # a zero column, and below a whole zero block
        x[0, 32:64] = 0
        want = activations_by_formula(x, 32) @ w.double().t() * scale.double()
        got = product(x, w, scale)
        assert got.dtype == torch.float32 and got.shape == (m, 260)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        exact = x.double() @ w.double().t() * scale.double()  # int8 activations per block of 32: about 1% off at worst
        assert (got.double() - exact).abs().max() < 0.02 * exact.abs().max()
    # bf16 activations are read as they are and the result comes back in bf16, rounded once from fp32.
    bf16 = torch.randn(2, 512).bfloat16()
    assert torch.equal(product(bf16, w, scale), product(bf16.float(), w, scale).bfloat16())
    # Dequantised for the many-token path: exactly what torch's copy and multiply give, in either dtype.
    for dt in (torch.float32, torch.bfloat16):
        for sc in (scale, scale.bfloat16()):
            out = torch.empty(260, 512, dtype=dt)
            ops.int8_dequantize(w, sc, out)
            assert torch.equal(out, torch.empty_like(out).copy_(w).mul_(sc.to(dt)[:, None]))
    # A bf16 scale (the module's buffer in a bf16 model) is read as the fp32 value it holds.
    x, scale16 = torch.randn(3, 512), scale.bfloat16()
    torch.testing.assert_close(product(x, w, scale16), product(x, w, scale16.float()), rtol=0, atol=0)


def int4_by_formula(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """w[n, k] = (q[n, k] - 8) * scale + zero (``quantize_int4``'s convention), scale and zero in float16 as the layout stores them."""
    scale = scales_and_zeros[..., 0].float().t()
    low = (scales_and_zeros[..., 1].float().t() - 8 * scale).half().double()
    return (q.double().view(q.shape[0], -1, INT4_GROUP) * scale.half().double()[..., None] + low[..., None]).view_as(q)


def test_int4_panel_layout_product_and_dequantisation_follow_their_formulas(ops) -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 3 * INT4_GROUP) * 0.05
    q, sz = quantize_int4(w, torch.float32)
    packed, scales = panel_int4(q, sz)
    assert packed.shape == (3, 3, 1024) and scales.shape == (3, 3, 2, 16) and scales.dtype == torch.float16
    # The layout itself, byte by byte, in the one buffer: per panel p and group g, 1088 bytes; chunk j's lane i holds
    # row 16p + i's weights 4j..4j+3 of the group (low nibbles) and 64 + 4j.. (high nibbles); then the 16 rows'
    # float16 scales, then their lows.
    buf = torch.frombuffer(bytearray(packed.untyped_storage()), dtype=torch.uint8)[packed.storage_offset() :][: 3 * 3 * 1088]
    p, g, j, i = 2, 1, 5, 9
    row, k, at = 16 * p + i, g * INT4_GROUP + 4 * j, (p * 3 + g) * 1088
    chunk = buf[at + j * 64 + 4 * i :][:4]
    assert torch.equal(chunk & 15, q[row, k : k + 4]) and torch.equal(chunk >> 4, q[row, k + 64 : k + 68])
    halves = buf[at + 1024 : at + 1088].view(torch.float16)
    assert halves[i] == sz[g, row, 0].half() and halves[16 + i] == (sz[g, row, 1] - 8 * sz[g, row, 0]).half()
    want_w = int4_by_formula(q, sz)
    out = torch.empty(48, 3 * INT4_GROUP)
    ops.int4_dequantize(packed, scales, out)
    torch.testing.assert_close(out.double(), want_w, rtol=1e-6, atol=1e-7)
    out16 = torch.empty(48, 3 * INT4_GROUP, dtype=torch.bfloat16)
    ops.int4_dequantize(packed, scales, out16)
    torch.testing.assert_close(out16, want_w.bfloat16(), rtol=0, atol=0)
    step = sz[..., 0].double().t().repeat_interleave(INT4_GROUP, dim=1)
    # Half a step, plus float16's rounding of the scale (times up to 15) and of the group's low end (|low| <= |w|).
    assert ((want_w - w.double()).abs() <= 0.5 * step + 2**-11 * (15 * step + w.abs().max())).all()
    # Token tiles of 1, 2 and 3 (4, 2 and 1 sums per token), whole tiles of 8 and the rest.
    x = torch.randn(30, 3 * INT4_GROUP)
    x[1, 5] = 0  # a zero column, and below a whole zero block
    x[2, :INT4_GROUP] = 0
    for m in (1, 2, 3, 8, 13, 30):
        want = activations_by_formula(x[:m], INT4_GROUP) @ want_w.t()
        got = ops.int4_linear(x[:m], packed, scales)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        # One token's result does not depend on the tokens beside it: a prompt's logits are what decoding gives.
        assert torch.equal(got[:1], ops.int4_linear(x[:1], packed, scales))
    bf16 = torch.randn(3, 3 * INT4_GROUP).bfloat16()
    assert torch.equal(ops.int4_linear(bf16, packed, scales), ops.int4_linear(bf16.float(), packed, scales).bfloat16())


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_rms_norm_and_rope_equal_the_eager_formulas(ops, x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    """One op each, the same arithmetic as Meta's RMSNorm and RoPE in eager ops: RoPE to the bit, RMSNorm up to
    the order of its sum of squares (one bf16 step at most)."""
    torch.manual_seed(4)
    norm = RMSNorm(96, 1e-5).to(w_dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 96, dtype=x_dtype)[:, 1:6]  # a slice, not contiguous as a whole
    want = norm(x)  # autograd on: the eager formula
    with torch.inference_mode(), kernels.using(ours_norm_rope=True):
        got = norm(x)
    assert got.dtype == want.dtype
    ulp = 2**-7 if want.dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got, want, rtol=ulp, atol=ulp)
    cos, sin = (t[None, :5] for t in rope_tables(16, 32, 10000.0))
    heads = torch.randn(2, 5, 3, 16, dtype=x_dtype)
    for c, s in ((cos, sin), (cos.expand(2, -1, -1), sin.expand(2, -1, -1))):  # one table for all rows, one per row
        want = apply_rope(heads, c, s)
        with torch.inference_mode(), kernels.using(ours_norm_rope=True):
            assert torch.equal(apply_rope(heads, c, s), want)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        ops.rope(heads, cos[:, :4], sin[:, :4])
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(x, torch.ones(95), 1e-5)


def test_fp32_product_for_a_few_tokens_equals_f_linear_and_serves_batched_decoding(ops, pipe) -> None:
    torch.manual_seed(5)
    w = torch.randn(70, 96)  # 70 rows: whole tiles of 4 and a remainder
    for m in (1, 2, 3, 4, 5, 9):  # every token-tile size
        x = torch.randn(m, 96)
        torch.testing.assert_close(ops.fp32_linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="K % 16"):
        ops.fp32_linear(torch.randn(2, 20), torch.randn(4, 20))
    # A batch of three rows decodes on it (and not with autograd on); greedy text as on oneDNN.
    prompts = ["the water of the", "a red", "in the morning the"]
    want = [alone(pipe, p, 8) for p in prompts]
    with kernels.using(fp32_ours_below=9):
        steps = Decoder(pipe.model, pipe.tokenizer.pad_id).steps([[1, 5, 9], [1, 7], [1, 4, 4, 2]], 3, 0.0, 1.0, None)
        next(steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            next(steps)
        assert [e.name for e in prof.events()].count("llama_adapter::fp32_linear") == 7 * pipe.model.args.n_layers + 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pipe.model(torch.tensor([[1, 5, 9]]))  # autograd on: the kernels with gradients
        assert "llama_adapter::fp32_linear" not in [e.name for e in prof.events()]
        got = drain_in_threads([pipe.stream(p, max_new_tokens=8, temperature=0) for p in prompts])  # batched together
    assert got == want


def test_the_probe_bounds_our_fp32_product_by_measurement(ops, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = ((512, 256), (256, 512))
    below = probe._probe_fp32_tokens(shapes, onednn=True)
    assert below in (*probe.BATCH_TOKENS, probe.BATCH_TOKENS[-1] + 1)
    monkeypatch.setattr(native, "ops", lambda: None)
    assert probe._probe_fp32_tokens(shapes, onednn=True) == 2  # ours absent: never


def test_serving_takes_our_norm_and_rope_and_autograd_the_eager_ones(pipe, ops) -> None:
    """Greedy text is the same either way; with autograd on (training) the eager formulas run, since ours have no
    backward."""
    adapted = pipe.with_adapter(llama_adapter.AdapterConfig(adapter_len=4, adapter_layer=2))
    texts = {}
    for on in (False, True):
        with kernels.using(ours_norm_rope=on):
            texts[on] = "".join(adapted.stream("the water of the", max_new_tokens=12, temperature=0))
    assert texts[True] == texts[False] and texts[True]
    tokens = tokens_for(adapted, SAMPLE)
    layers = adapted.model.args.n_layers
    with kernels.using(ours_norm_rope=True):
        for grad, want in ((False, (2 * layers + 1, 2 * layers)), (True, (0, 0))):
            with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU]) as prof:
                adapted.model(tokens)
            names = [e.name for e in prof.events()]
            assert (names.count("llama_adapter::rms_norm"), names.count("llama_adapter::rope")) == want


def test_compiled_code_calls_our_kernels(ops) -> None:
    """torch.compile traces through our ops (their fake kernels give the shapes), as a compiled decode step does."""
    torch.manual_seed(2)
    w8, scale = torch.randint(-127, 128, (64, 128), dtype=torch.int8), torch.rand(64)
    q, sz = quantize_int4(torch.randn(64, 128), torch.float32)
    w4, s4 = panel_int4(q, sz)

    cache = torch.randn(3, 2, 10, 32)

    def step(x: torch.Tensor) -> torch.Tensor:
        w = torch.empty(64, 128)
        ops.int4_dequantize(w4, s4, w)
        y = ops.int8_linear(x, w8, scale) + ops.int4_linear(x, w4, s4) + x @ w.t()
        return ops.one_query_attention(y.view(3, 2, 1, 32), cache[:, :, :7], cache[:, :, 3:], None).view(3, 64)

    x = torch.randn(3, 128)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fake tensors and functionalization, no C++ build
    torch.testing.assert_close(compiled(x), step(x))


PANEL_W, PANEL_SCALES = panel_int4(torch.zeros(16, 128, dtype=torch.uint8), torch.ones(1, 16, 2))  # one panel, one group
TWO_GROUPS = panel_int4(torch.zeros(16, 256, dtype=torch.uint8), torch.ones(2, 16, 2))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda o: o.int8_linear(torch.randn(1, 100), torch.zeros(4, 100, dtype=torch.int8), torch.ones(4)), "K % 64 == 0"),
        (lambda o: o.int8_linear(torch.randn(1, 64), torch.zeros(4, 128, dtype=torch.int8), torch.ones(4)), "x has 64 columns"),
        (lambda o: o.int8_linear(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(3)), "scale must be"),
        (lambda o: o.int8_linear(torch.randn(1, 64).half(), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4)), "float32 or bfloat16"),
        (lambda o: o.int8_gemm(torch.randn(1, 100), torch.zeros(4, 100, dtype=torch.int8), torch.ones(4)), "K % 64 == 0"),
        (lambda o: o.int8_gemm(torch.randn(1, 64), torch.zeros(4, 128, dtype=torch.int8), torch.ones(4)), "x has 64 columns"),
        (lambda o: o.int8_gemm(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(3)), "scale must be"),
        (lambda o: o.int8_dequantize(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), torch.empty(4, 32)), "out must be"),
        (lambda o: o.int8_dequantize(torch.zeros(4, 64, dtype=torch.int8), torch.ones(5), torch.empty(4, 64)), "scale must be"),
        (lambda o: o.int4_linear(torch.randn(1, 128), torch.zeros(16, 64, dtype=torch.uint8), PANEL_SCALES), "uint8 \\[N/16"),
        (lambda o: o.int4_linear(torch.randn(1, 256), TWO_GROUPS[0].contiguous(), TWO_GROUPS[1]), "groups 1088 bytes apart"),
        (lambda o: o.int4_linear(torch.randn(1, 128), PANEL_W, PANEL_SCALES.clone()), "view of the weight's buffer"),
        (lambda o: o.int4_linear(torch.randn(1, 128), PANEL_W, PANEL_SCALES.float()), "float16"),
        (lambda o: o.int4_linear(torch.randn(1, 256), PANEL_W, PANEL_SCALES), "x has 256"),
        (lambda o: o.int4_dequantize(PANEL_W, PANEL_SCALES, torch.empty(16, 64)), "out must be"),
        (lambda o: o.one_query_attention(torch.randn(1, 4, 2, 16), *[torch.randn(1, 4, 5, 16)] * 2, None), "one query per row"),
        (lambda o: o.one_query_attention(torch.randn(1, 6, 1, 16), *[torch.randn(1, 4, 5, 16)] * 2, None), "not a multiple"),
        (lambda o: o.one_query_attention(torch.randn(1, 4, 1, 16), torch.randn(1, 4, 5, 16), torch.randn(1, 4, 6, 16), None), "differ"),
        (lambda o: o.one_query_attention(torch.randn(1, 4, 1, 16).bfloat16(), *[torch.randn(1, 4, 5, 16)] * 2, None), "all be float32"),
        (lambda o: o.one_query_attention(torch.randn(1, 4, 1, 16), *[torch.randn(1, 4, 16, 5).mT] * 2, None), "contiguous last"),
        (lambda o: o.one_query_attention(torch.randn(1, 4, 1, 272), *[torch.randn(1, 4, 5, 272)] * 2, None), "up to 256"),
        (lambda o: o.one_query_attention(torch.randn(1, 4, 1, 16), *[torch.randn(1, 4, 0, 16)] * 2, None), "no cached positions"),
        (lambda o: o.one_query_attention(torch.randn(1, 4, 1, 16), *[torch.randn(1, 4, 5, 16)] * 2, torch.ones(1, 4)), "mask must be"),
    ],
)
def test_bad_arguments_are_refused_not_read_out_of_bounds(ops, call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call(ops)


def test_a_model_on_our_kernels_stays_with_torchs_and_decodes_on_ours(int4_dir: Path, ops, restore_plan) -> None:
    """int4 and int8 models built while the plan picks our kernels: int4 weights take the panel layout,
    logits stay close to the same model on torch's kernels, the prompt path equals the decode path, and
    the profiler sees our ops (and not torch's) in a decode step; an int8 prompt on our GEMM equals it on our row kernel."""
    fp32 = llama_adapter.load(int4_dir, device="cpu", dtype="fp32")
    tokens = tokens_for(fp32, SAMPLE)
    with torch.inference_mode():
        ref = fp32.model(tokens)
    for mode, ours_op, torch_op in (
        ("int8", "llama_adapter::int8_linear", "aten::_weight_int8pack_mm"),
        ("int4", "llama_adapter::int4_linear", "aten::_weight_int4pack_mm_for_cpu"),
    ):
        kernels.set_plan(replace(kernels.PLAN, ours={"int8": False, "int4": False}, dequant_from={"int8": NEVER, "int4": NEVER}))
        theirs = llama_adapter.load(int4_dir, device="cpu", quantize=mode)
        kernels.set_plan(replace(kernels.PLAN, ours={"int8": True, "int4": True}))
        pipe = llama_adapter.load(int4_dir, device="cpu", quantize=mode)
        if mode == "int4":
            layouts = {m.layout for m in pipe.model.modules() if isinstance(m, Int4Linear)}
            assert layouts == {"panels"}, layouts
        with torch.inference_mode():
            got = pipe.model(tokens)  # the fused kernel on every token (dequant_from is NEVER)
            with kernels.using(dequant_from={mode: 1}):
                many = pipe.model(tokens)  # dequantise + GEMM
            with kernels.using(ours={"int8": False, "int4": False}):
                old = theirs.model(tokens)
        scale = ref.abs().max().item()
        if mode == "int8":
            with torch.inference_mode(), kernels.using(ours_gemm_from=2), profile(activities=[ProfilerActivity.CPU]) as prof:
                gemm = pipe.model(tokens)
            names = [e.name for e in prof.events()]
            assert names.count("llama_adapter::int8_gemm") == 7 * pipe.model.args.n_layers + 1 and ours_op not in names
            # The same arithmetic summed in another order (the products alone agree to 1e-5, above); in bf16 activations
            # a last-bit difference in one layer carries on through the others.
            torch.testing.assert_close(gemm, got, rtol=0.03, atol=0.03 * scale)
        # Our int8 activations err about as much as torch's bf16 ones: both stay far inside the weights' own error.
        assert (got - ref).abs().max() < 2 * (old - ref).abs().max() + 0.01 * scale
        torch.testing.assert_close(many, got, rtol=0.05, atol=0.05 * scale)
        assert (got.argmax(-1) == old.argmax(-1)).float().mean() > 0.9
        steps = Decoder(pipe.model, pipe.tokenizer.pad_id).steps([[1, 5, 9]], 3, 0.0, 1.0, None)
        next(steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            next(steps)
        names = [e.name for e in prof.events()]
        assert names.count(ours_op) == 7 * pipe.model.args.n_layers + 1 and torch_op not in names


def test_a_compiled_decode_step_on_our_kernels_equals_eager(int4_dir: Path, ops, restore_plan) -> None:
    """``--compile`` on CPU (inductor, fullgraph) with an int4 model on our kernels: the same greedy text as eager."""
    kernels.set_plan(replace(kernels.PLAN, ours={"int8": True, "int4": True}))
    eager = llama_adapter.load(int4_dir, device="cpu", quantize="int4")
    compiled = llama_adapter.load(int4_dir, device="cpu", quantize="int4", compile=True)
    want = "".join(eager.stream("the water", max_new_tokens=6, temperature=0))
    assert "".join(compiled.stream("the water", max_new_tokens=6, temperature=0)) == want


def test_an_adapter_on_a_panel_int4_base_shares_its_tensors(int4_dir: Path, ops, restore_plan) -> None:
    kernels.set_plan(replace(kernels.PLAN, ours={"int8": True, "int4": True}))
    base = llama_adapter.load(int4_dir, device="cpu", quantize="int4")
    kernels.set_plan(replace(kernels.PLAN, ours={"int8": False, "int4": False}))  # the layout comes with the tensors
    pipe = base.with_adapter(llama_adapter.AdapterConfig(adapter_len=3, adapter_layer=2))
    wq, base_wq = pipe.model.layers[3].attention.wq, base.model.layers[3].attention.wq
    assert wq.layout == "panels" and wq.scales_and_zeros.data_ptr() == base_wq.scales_and_zeros.data_ptr()
    assert "".join(pipe.stream("the water", max_new_tokens=4, temperature=0)) == "".join(
        base.stream("the water", max_new_tokens=4, temperature=0)
    )  # zero gates: the adapter changes nothing


def test_the_probe_times_our_kernels_against_torchs(ops, monkeypatch: pytest.MonkeyPatch, restore_plan) -> None:
    """Where ours is the only fused kernel that works, the probe picks it; where it is absent, torch's."""

    def missing(*args: object) -> None:
        raise RuntimeError("not built with this kernel")

    args = ModelConfig(dim=1024, n_layers=1, n_heads=8, vocab_size=64)
    monkeypatch.setattr(probe, "_done", {})
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", missing)
    plan = probe.probe_kernels(args, torch.bfloat16, "int4")
    assert plan.ours["int4"] and "int4: our VNNI kernel" in plan.describe(torch.bfloat16, "int4")
    monkeypatch.undo()  # torch's kernel back; now ours is absent
    monkeypatch.setattr(probe, "_done", {})
    monkeypatch.setattr(native, "ops", lambda: None)
    plan = probe.probe_kernels(args, torch.bfloat16, "int4")
    assert not plan.ours["int4"] and "int4: torch's fused kernel" in plan.describe(torch.bfloat16, "int4")


@pytest.mark.parametrize(("wins_from", "want"), [(8, 8), (None, NEVER)])
def test_the_probe_sends_tokens_to_our_gemm_from_where_it_wins(ops, monkeypatch: pytest.MonkeyPatch, wins_from, want) -> None:
    """Our GEMM serves from the first token count where the probe timed it faster than our row kernel (the timings
    are faked; both paths really run on every count tried), and the plan says so."""
    counts = iter(probe.GEMM_TOKENS)
    tried: list[int] = []

    def timings(runs: dict, rounds: int = 5) -> dict:
        tokens = next(counts)
        tried.append(tokens)
        for run in runs.values():
            run()
        return {"rows": 1.0, "gemm": 0.5 if wins_from is not None and tokens >= wins_from else 2.0}

    monkeypatch.setattr(probe, "_fastest", timings)
    mods = [probe.quantized_module("int8", torch.randn(64, 128), torch.bfloat16)]
    plan = replace(kernels.PLAN, ours={"int8": True, "int4": False})
    assert probe._ours_gemm_from(mods, plan, torch.float32) == want
    assert tried == [n for n in probe.GEMM_TOKENS if wins_from is None or n <= wins_from]
    described = replace(plan, ours_gemm_from=want).describe(torch.float32, "int8")
    assert ("its GEMM from 8 tokens" in described) == (want == 8)


def test_our_kernels_are_absent_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turned off, on a CPU without VNNI, or without a compiler: None and one log line saying why."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("llama_adapter.load").addHandler(handler)  # it does not propagate to pytest's capture
    build = native.ops.__wrapped__
    try:
        monkeypatch.setenv("LLAMA_ADAPTER_NATIVE", "0")
        assert build() is None and "LLAMA_ADAPTER_NATIVE=0" in lines[-1]
        monkeypatch.delenv("LLAMA_ADAPTER_NATIVE")
        monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma"})
        assert build() is None and "lacks avx512f, avx512bw" in lines[-1]
        monkeypatch.setattr(native, "cpu_flags", lambda: set(native.NEEDED_FLAGS))

        def no_compiler(*args: object, **kwargs: object) -> None:
            raise RuntimeError("Ninja is required to load C++ extensions")

        monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
        assert build() is None and "could not be built (Ninja is required" in lines[-1] and "Install g++ and ninja" in lines[-1]
    finally:
        logging.getLogger("llama_adapter.load").removeHandler(handler)
    # Each CPU feature set gets its own build directory: -march=native code never runs on another CPU.
    assert native.build_name({"avx512f"}) != native.build_name({"avx512f", "amx_tile"})
