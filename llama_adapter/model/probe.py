"""Choose the CPU kernels by timing the candidates on the model's own shapes, once per process.

A few products on random matrices of the model's FFN shapes (both directions): a few seconds for
7B.  A candidate that is missing (from this torch build, or our kernels where ``native`` could not
build them), or fails, is left out; the dequantise-and-GEMM path needs nothing beyond
``F.linear``, so a quantized model always has one.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from . import kernels, native
from .attention import OURS_DTYPES, matmul_attention, ours_attention
from .kernels import NEVER, CpuKernels
from .linear import ONEDNN_LINEAR, onednn_linear
from .quantize import Int4Linear, Int8Linear, QuantizedLinear, int4_layout, int4_tensors, ours_fits, quantize_weight

log = logging.getLogger("llama_adapter.load")
K = TypeVar("K")
_done: dict[tuple, CpuKernels] = {}
TOKEN_COUNTS = (8, 32, 128, 512)  # where the many-token path is tried against the fused kernel
PROMPT_TOKENS = (128, 512)  # the prompt lengths on which int8's two many-token paths are compared
# The fused kernels are timed over this many bytes of distinct weights, more than any last-level cache: a decode
# step streams every weight from memory, and a kernel that wins on cached weights can lose there.
STREAM_BYTES = 256 << 20
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


def _fastest(runs: dict[K, Callable[[], object]], rounds: int = 5) -> dict[K, float]:
    """Each candidate's best time over ``rounds`` rounds that take every candidate in turn: on a noisy machine
    a burst of load then slows one round of all of them, not all rounds of one."""
    for run in runs.values():
        run()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def _usable(fn: Callable[[], object]) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False


def quantized_module(mode: str, weight: torch.Tensor, kernel_dtype: torch.dtype, ours: bool = False) -> QuantizedLinear:
    """An Int8Linear / Int4Linear on the CPU holding ``weight`` quantized (what ``build.fill`` makes);
    with ``ours``, an int4 weight in our kernel's panel layout."""
    out_features, in_features = weight.shape
    if mode == "int8":
        m: QuantizedLinear = Int8Linear(in_features, out_features, torch.bfloat16)
        m.weight, m.scale = quantize_weight(weight, torch.bfloat16)
    else:
        m = Int4Linear(in_features, out_features, kernel_dtype)
        m.weight, m.scales_and_zeros = int4_tensors(weight, int4_layout(weight.device, weight.shape, ours), kernel_dtype)
    return m


def _int8_module(weight: torch.Tensor) -> Int8Linear:
    m = quantized_module("int8", weight, torch.bfloat16)
    assert isinstance(m, Int8Linear)
    return m


def _streamed(mods: Sequence[QuantizedLinear]) -> list[QuantizedLinear]:
    """Copies of ``mods`` (their quantized tensors cloned) adding up to ``STREAM_BYTES``."""
    size = sum(t.numel() * t.element_size() for m in mods for t in m.buffers())
    return [copy.deepcopy(m) for _ in range(max(1, -(-STREAM_BYTES // size))) for m in mods]


def _probe_mode(mode: str, shapes: Sequence[tuple[int, int]], dtype: torch.dtype, plan: CpuKernels) -> CpuKernels:
    """``plan`` with ``mode``'s choices measured: the fused kernel (ours, or torch's in its fastest activation
    dtype), the token count from which the many-token path wins, and for int8 whether that path is the int8 GEMM."""
    weights = [torch.randn(shape) * 0.02 for shape in shapes]
    xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in weights]
    runs: dict[tuple[bool, torch.dtype], Callable[[], object]] = {}
    candidates = [(False, torch.bfloat16), (False, torch.float32)]
    if native.ops() is not None and all(ours_fits(mode, *shape) for shape in shapes):
        candidates.append((True, plan.kernel_dtype[mode]))
    for ours, dt in candidates:
        try:
            mods = [quantized_module(mode, w, dt, ours) for w in weights]
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            continue
        path = replace(plan, ours={**plan.ours, mode: ours}, kernel_dtype={**plan.kernel_dtype, mode: dt})
        if all(_usable(lambda m=m, x=x, p=path: m.fused(x, p)) for m, x in zip(mods, xs, strict=True)):
            copies = _streamed(mods)
            runs[ours, dt] = lambda c=copies, p=path: [m.fused(xs[i % len(xs)], p) for i, m in enumerate(c)]
    timings = _fastest(runs)
    del runs
    int_gemm = mode == "int8" and _usable(lambda: _int8_module(weights[0]).int_gemm(torch.randn(2, shapes[0][1])))
    if not timings:  # no fused kernel: the many-token path always
        return replace(plan, dequant_from={**plan.dequant_from, mode: 1}, int8_gemm=int_gemm if mode == "int8" else plan.int8_gemm)
    ours, kernel_dtype = min(timings, key=timings.__getitem__)
    torch_dtypes = [dt for (o, dt) in timings if not o]
    if ours and torch_dtypes:  # torch's kernel still serves shapes ours does not take: its fastest dtype
        kernel_dtype = min(torch_dtypes, key=lambda dt: timings[False, dt])
    plan = replace(plan, ours={**plan.ours, mode: ours}, kernel_dtype={**plan.kernel_dtype, mode: kernel_dtype})
    mods = [quantized_module(mode, w, kernel_dtype, ours) for w in weights]
    if ours and mode == "int8":  # (int4's one kernel takes any number of tokens)
        plan = replace(plan, ours_gemm_from=_ours_gemm_from(mods, plan, dtype))
    dequantize = all(m.can_dequantize() for m in mods)
    if not dequantize and not int_gemm:
        return replace(plan, dequant_from={**plan.dequant_from, mode: NEVER})

    def many_tokens(tokens: int, int8_gemm: bool) -> float:
        """Seconds of the many-token path (with or without int8's int8 GEMM) over both matrices."""
        path = replace(plan, int8_gemm=int8_gemm)
        xs = [torch.randn(tokens, m.in_features, dtype=dtype) for m in mods]
        return sum(_seconds(lambda m=m, x=x: m.many_tokens(x, path), 1) for m, x in zip(mods, xs, strict=True))

    def many_wins(tokens: int, int8_gemm: bool) -> bool:
        """Whether the many-token path beats the fused kernel at ``tokens``, in interleaved rounds (the two are
        close near the threshold, and one timing of each flipped the choice between runs)."""
        path = replace(plan, int8_gemm=int8_gemm)
        xs = [torch.randn(tokens, m.in_features, dtype=dtype) for m in mods]
        best = _fastest(
            {
                "many": lambda: [m.many_tokens(x, path) for m, x in zip(mods, xs, strict=True)],
                "fused": lambda: [m.fused(x, plan) for m, x in zip(mods, xs, strict=True)],
            },
            rounds=3,
        )
        return best["many"] < best["fused"]

    # Which many-token path: the faster over prompts of PROMPT_TOKENS (the int8 GEMM computes twice the rows,
    # so a bf16 GEMM that gains on longer prompts can overtake it).
    use_int = int_gemm and (
        not dequantize or sum(many_tokens(n, True) for n in PROMPT_TOKENS) <= sum(many_tokens(n, False) for n in PROMPT_TOKENS)
    )
    threshold = next((n for n in TOKEN_COUNTS if many_wins(n, use_int)), NEVER)
    return replace(
        plan,
        dequant_from={**plan.dequant_from, mode: threshold},
        int8_gemm=(use_int and threshold != NEVER) if mode == "int8" else plan.int8_gemm,
    )


GEMM_TOKENS = (2, 4, 8, 16, 32, 128)  # where our GEMM is tried against our row kernel


def _ours_gemm_from(mods: Sequence[QuantizedLinear], plan: CpuKernels, dtype: torch.dtype) -> int:
    """The first token count of ``GEMM_TOKENS`` at which our int8 GEMM beats our row kernel on ``mods`` (NEVER if none)."""
    paths = {name: replace(plan, ours_gemm_from=n) for name, n in (("rows", NEVER), ("gemm", 1))}
    for tokens in GEMM_TOKENS:
        xs = [torch.randn(tokens, m.in_features, dtype=dtype) for m in mods]
        runs = {name: lambda p=p, xs=xs: [m.fused(x, p) for m, x in zip(mods, xs, strict=True)] for name, p in paths.items()}
        best = _fastest(runs, rounds=3)
        if best["gemm"] < best["rows"]:
            return tokens
    return NEVER


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


BATCH_TOKENS = (2, 4, 8, 16, 32)  # where our fp32 product for a few tokens is tried against the fp32 kernel chosen


def _probe_fp32_tokens(shapes: Sequence[tuple[int, int]], onednn: bool) -> int:
    """The first token count of ``BATCH_TOKENS`` at which our fp32 product (``native``) is no longer faster than the
    chosen fp32 kernel over the FFN shapes; 2 (never) without ours."""
    if native.ops() is None or any(k % 16 for _, k in shapes):
        return 2
    weights = [torch.randn(shape) * 0.02 for shape in shapes]
    theirs = (lambda x, w: onednn_linear(x, w, None)) if onednn else F.linear
    for tokens in BATCH_TOKENS:
        xs = [torch.randn(tokens, w.shape[1]) for w in weights]
        best = _fastest(
            {
                "ours": lambda xs=xs: [torch.ops.llama_adapter.fp32_linear(x, w) for x, w in zip(xs, weights, strict=True)],
                "theirs": lambda xs=xs: [theirs(x, w) for x, w in zip(xs, weights, strict=True)],
            },
            rounds=5,
        )
        if best["ours"] >= best["theirs"]:
            return tokens
    return BATCH_TOKENS[-1] + 1


ATTENTION_POSITIONS = (8, 64, 256, 1024)  # cache lengths at which decoding's attention paths are compared


def _probe_one_query(args: ModelConfig, dtype: torch.dtype) -> tuple[str, int]:
    """Decoding's attention (one query per row, ``attention``): the faster of our kernel and the matmuls over
    ``ATTENTION_POSITIONS``, and the first cache length from which it beats torch's SDPA kernel (or NEVER).

    Timed on slices of a longer cache, strided as the model's preallocated cache is: a copy that a kernel makes
    of a strided slice is part of its cost."""
    gqa = args.kv_heads != args.n_heads
    runs: dict[tuple[str, int], Callable[[], object]] = {}
    cache_len = 2 * ATTENTION_POSITIONS[-1]
    cache_k, cache_v = (torch.randn(1, args.kv_heads, cache_len, args.head_dim, dtype=dtype) for _ in range(2))
    q = torch.randn(1, args.n_heads, 1, args.head_dim, dtype=dtype)
    candidates = {"sdpa": partial(F.scaled_dot_product_attention, enable_gqa=gqa), "matmuls": matmul_attention}
    if native.ops() is not None and dtype in OURS_DTYPES:
        candidates["ours"] = ours_attention
    for positions in ATTENTION_POSITIONS:
        k, v = cache_k[:, :, :positions], cache_v[:, :, :positions]
        for name, fn in candidates.items():
            if _usable(lambda fn=fn, k=k, v=v: fn(q, k, v)):
                runs[name, positions] = lambda fn=fn, k=k, v=v: fn(q, k, v)
    best = _fastest(runs, rounds=9)
    totals = {name: sum(best.get((name, n), float("inf")) for n in ATTENTION_POSITIONS) for name in candidates if name != "sdpa"}
    kernel = min(totals, key=totals.__getitem__)
    inf = float("inf")  # a candidate that failed at a length
    start = next((n for n in ATTENTION_POSITIONS if best.get((kernel, n), inf) < best.get(("sdpa", n), inf)), NEVER)
    return kernel, start


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
        one_query, one_query_from = _probe_one_query(args, dtype)
        plan = replace(plan, one_query=one_query, one_query_from=one_query_from, ours_norm_rope=native.ops() is not None)
        if dtype == torch.float32 and quantize is None:
            onednn = _probe_fp32(shapes)
            plan = replace(plan, fp32_onednn=onednn, fp32_ours_below=_probe_fp32_tokens(shapes, onednn))
        if quantize is not None:
            plan = _probe_mode(quantize, shapes, dtype, plan)
    kernels.set_plan(plan)
    _done[key] = plan
    log.info("CPU kernels (probed in %.1fs on %dx%d): %s", time.perf_counter() - start, *shapes[0], plan.describe(dtype, quantize))
    return plan
