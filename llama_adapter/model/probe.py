"""Choose the CPU kernels by timing the candidates on the model's own shapes, once per process.

A few products on random matrices of the model's FFN shapes (both directions): a second or two
for 7B.  A candidate that is missing from this torch build, or fails, is left out; the
dequantise-and-GEMM path needs nothing beyond ``F.linear``, so a quantized model always has one.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from . import kernels
from .kernels import NEVER, CpuKernels
from .linear import ONEDNN_LINEAR, onednn_linear
from .quantize import Int4Linear, Int8Linear, QuantizedLinear, int4_cpu_layout, pack_int4, quantize_int4, quantize_weight

log = logging.getLogger("llama_adapter.load")
_done: dict[tuple, CpuKernels] = {}
TOKEN_COUNTS = (8, 32, 128, 512)  # where the many-token path is tried against the fused kernel
PROMPT_TOKENS = (128, 512)  # the prompt lengths on which int8's two many-token paths are compared
# Below this many elements per FFN matrix (tiny test models) call overhead decides, not the kernel:
# such models keep the default plan.
PROBE_MIN_ELEMENTS = 1 << 21


def _seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up (and first-touch of the output)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _usable(fn: Callable[[], object]) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False


def quantized_module(mode: str, weight: torch.Tensor, kernel_dtype: torch.dtype) -> QuantizedLinear:
    """An Int8Linear / Int4Linear on the CPU holding ``weight`` quantized (what ``build.fill`` makes)."""
    out_features, in_features = weight.shape
    if mode == "int8":
        m: QuantizedLinear = Int8Linear(in_features, out_features, torch.bfloat16)
        m.weight, m.scale = quantize_weight(weight, torch.bfloat16)
    else:
        m = Int4Linear(in_features, out_features, kernel_dtype)
        q, m.scales_and_zeros = quantize_int4(weight, kernel_dtype)
        m.weight = pack_int4(q, int4_cpu_layout())
    return m


def _int8_module(weight: torch.Tensor) -> Int8Linear:
    m = quantized_module("int8", weight, torch.bfloat16)
    assert isinstance(m, Int8Linear)
    return m


def _probe_mode(mode: str, shapes: Sequence[tuple[int, int]], plan: CpuKernels) -> tuple[torch.dtype, int, bool]:
    """(the fused kernel's fastest activation dtype, the token count from which the many-token path wins,
    whether that path is int8's int8 GEMM rather than dequantise + GEMM)."""
    weights = [torch.randn(shape) * 0.02 for shape in shapes]
    timings: dict[torch.dtype, float] = {}
    for dt in (torch.bfloat16, torch.float32):
        try:
            mods = [quantized_module(mode, w, dt) for w in weights]
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            continue
        xs = [torch.randn(1, m.in_features, dtype=dt) for m in mods]
        if all(_usable(lambda m=m, x=x: m.fused(x)) for m, x in zip(mods, xs, strict=True)):
            timings[dt] = sum(_seconds(lambda m=m, x=x: m.fused(x)) for m, x in zip(mods, xs, strict=True))
    int_gemm = mode == "int8" and _usable(lambda: _int8_module(weights[0]).int_gemm(torch.randn(2, shapes[0][1])))
    if not timings:
        return plan.kernel_dtype[mode], 1, int_gemm  # no fused kernel: the many-token path always
    kernel_dtype = min(timings, key=timings.__getitem__)
    mods = [quantized_module(mode, w, kernel_dtype) for w in weights]
    dequantize = all(m.can_dequantize() for m in mods)
    if not dequantize and not int_gemm:
        return kernel_dtype, NEVER, False

    def many_tokens(tokens: int, int8_gemm: bool) -> float:
        """Seconds of the many-token path (with or without int8's int8 GEMM) over both matrices."""
        path = replace(plan, int8_gemm=int8_gemm)
        xs = [torch.randn(tokens, m.in_features, dtype=kernel_dtype) for m in mods]
        return sum(_seconds(lambda m=m, x=x: m.many_tokens(x, path), 1) for m, x in zip(mods, xs, strict=True))

    def fused(tokens: int) -> float:
        xs = [torch.randn(tokens, m.in_features, dtype=kernel_dtype) for m in mods]
        return sum(_seconds(lambda m=m, x=x: m.fused(x), 1) for m, x in zip(mods, xs, strict=True))

    # Which many-token path: the faster over prompts of PROMPT_TOKENS (the int8 GEMM computes twice the rows,
    # so a bf16 GEMM that gains on longer prompts can overtake it).
    use_int = int_gemm and (
        not dequantize or sum(many_tokens(n, True) for n in PROMPT_TOKENS) <= sum(many_tokens(n, False) for n in PROMPT_TOKENS)
    )
    for tokens in TOKEN_COUNTS:
        if many_tokens(tokens, use_int) < fused(tokens):
            return kernel_dtype, tokens, use_int
    return kernel_dtype, NEVER, False


def _probe_fp32(shapes: Sequence[tuple[int, int]]) -> bool:
    """Whether oneDNN beats F.linear at the one-token product that decoding is made of."""
    if not ONEDNN_LINEAR:
        return False
    weights = [torch.randn(shape) * 0.02 for shape in shapes]
    xs = [torch.randn(1, w.shape[1]) for w in weights]
    if not _usable(lambda: onednn_linear(xs[0], weights[0], None)):
        return False
    onednn = sum(_seconds(lambda w=w, x=x: onednn_linear(x, w, None)) for w, x in zip(weights, xs, strict=True))
    plain = sum(_seconds(lambda w=w, x=x: F.linear(x, w)) for w, x in zip(weights, xs, strict=True))
    return onednn < plain


def probe_kernels(args: ModelConfig, dtype: torch.dtype, quantize: str | None) -> CpuKernels:
    """Time the CPU candidates on ``args``' FFN shapes, set ``kernels.PLAN`` and log the choice (once per shape).

    Models smaller than ``PROBE_MIN_ELEMENTS`` per matrix keep the plan as it is.
    """
    shapes = ((args.ffn_hidden_dim, args.dim), (args.dim, args.ffn_hidden_dim))
    if args.ffn_hidden_dim * args.dim < PROBE_MIN_ELEMENTS:
        return kernels.PLAN
    key = (shapes, dtype, quantize)
    if key in _done:
        kernels.set_plan(_done[key])
        return _done[key]
    start = time.perf_counter()
    plan = kernels.PLAN
    with torch.inference_mode():
        if dtype == torch.float32 and quantize is None:
            plan = replace(plan, fp32_onednn=_probe_fp32(shapes))
        if quantize is not None:
            kernel_dtype, threshold, int8_gemm = _probe_mode(quantize, shapes, plan)
            plan = replace(
                plan,
                kernel_dtype={**plan.kernel_dtype, quantize: kernel_dtype},
                dequant_from={**plan.dequant_from, quantize: threshold},
                int8_gemm=int8_gemm if quantize == "int8" else plan.int8_gemm,
            )
    kernels.set_plan(plan)
    _done[key] = plan
    log.info("CPU kernels (probed in %.1fs on %dx%d): %s", time.perf_counter() - start, *shapes[0], plan.describe(dtype, quantize))
    return plan
