"""Which CPU kernel each product takes: one plan per process, measured at load by ``probe.probe_kernels``.

The defaults below hold until a probe runs (tests, tiny models, training): oneDNN for fp32
products, torch's fused weight-only kernels in bf16 activations, and token-count thresholds from
the measurements in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
NEVER = sys.maxsize  # a threshold no forward reaches


@dataclass(frozen=True)
class CpuKernels:
    # fp32 products on oneDNN (``linear.Linear``) rather than F.linear (MKL).
    fp32_onednn: bool = ONEDNN_LINEAR
    # fp32 products of 2 to this many tokens less one (batched decoding) without autograd on ours (``native``:
    # each weight chunk read once for up to four tokens).  Never until the probe finds it faster.
    fp32_ours_below: int = 2
    # Per quantize mode: the fused product is ours (``native``: VNNI, int8 activations per block) rather
    # than torch's.  For int4 this is decided before the weights are quantized: ours has its own layout.
    ours: dict[str, bool] = field(default_factory=lambda: {"int8": False, "int4": False})
    # int8 where ``ours`` (int4's kernel has one path for any number of tokens): from this many tokens on, our fused
    # product is our GEMM on the quantized weights (lanes along the output, one weight chunk for up to 12 tokens)
    # rather than our row kernel.
    ours_gemm_from: int = NEVER
    # Per quantize mode: the activation dtype torch's fused weight-only kernel runs in.
    kernel_dtype: dict[str, torch.dtype] = field(default_factory=lambda: {"int8": torch.bfloat16, "int4": torch.bfloat16})
    # Per quantize mode: from this many tokens on, dequantise into scratch and use the GEMM.
    dequant_from: dict[str, int] = field(default_factory=lambda: {"int8": 32, "int4": 128})
    # The dtype of that GEMM.
    gemm_dtype: torch.dtype = torch.bfloat16
    # int8's many-token path: the int8 GEMM (``quantize.Int8Linear.int_gemm``: activations as two int8
    # passes, ``torch._int_mm``) instead of dequantise + GEMM.  Off until the probe finds it faster.
    int8_gemm: bool = False
    # From this many cached positions on, decoding's attention (one query per row) runs on ``one_query`` rather
    # than torch's SDPA kernel: "ours" (``native``: reads the cache in place) or "matmuls" (two batched matmuls
    # and a softmax, ``attention.matmul_attention``).  SDPA until the probe finds otherwise.
    one_query: str = "matmuls"
    one_query_from: int = NEVER
    # RMSNorm and RoPE without autograd (serving) as one op each (``native``: ``cpu_norm_rope.cpp``) rather than
    # the eager formulas' nine and fifteen small ops.  The same arithmetic: on wherever ours are built.
    ours_norm_rope: bool = False

    def describe(self, dtype: torch.dtype, quantize: str | None) -> str:
        """The choices that matter to a model of this dtype and quantize mode, in words."""
        start, kernel = self.one_query_from, "our kernel" if self.one_query == "ours" else "matmuls"
        attention = "decoding attention on SDPA" if start == NEVER else f"decoding attention on {kernel} from {start} positions"
        return f"{self._products(dtype, quantize)}; {attention}"

    def _products(self, dtype: torch.dtype, quantize: str | None) -> str:
        if quantize is None:
            if dtype != torch.float32:
                return f"{str(dtype).removeprefix('torch.')} products on F.linear"
            fp32 = f"fp32 products on {'oneDNN' if self.fp32_onednn else 'F.linear (MKL)'}"
            below = self.fp32_ours_below
            return fp32 if below <= 2 else f"{fp32}, on our kernel for 2 to {below - 1} tokens"
        start = self.dequant_from[quantize]
        gemm = f"dequantise + {str(self.gemm_dtype).removeprefix('torch.')} GEMM"
        if quantize == "int8" and self.int8_gemm:
            gemm = "int8 GEMM (activations in two int8 passes)"
        if start == 1:
            return f"{quantize}: no fused kernel works here, {gemm} always"
        fused = (
            f"{quantize}: our VNNI kernel (int8 activations per block)"
            if self.ours[quantize]
            else f"{quantize}: torch's fused kernel in {str(self.kernel_dtype[quantize]).removeprefix('torch.')}"
        )
        if quantize == "int8" and self.ours[quantize] and self.ours_gemm_from != NEVER:
            fused += f" (its GEMM from {self.ours_gemm_from} tokens)"
        return f"{fused}, {gemm} never" if start == NEVER else f"{fused} below {start} tokens, {gemm} from {start}"


PLAN = CpuKernels()


def set_plan(plan: CpuKernels) -> None:
    global PLAN
    PLAN = plan


@contextlib.contextmanager
def using(**changes: object) -> Iterator[CpuKernels]:
    """Run a block with some choices of the plan forced (tests exercise every path this way)."""
    old = PLAN
    set_plan(replace(old, **changes))  # type: ignore[arg-type]
    try:
        yield PLAN
    finally:
        set_plan(old)


_scratch: dict[torch.dtype, Tensor] = {}


def scratch(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A [rows, cols] view of one reused buffer per dtype, grown to the largest request.

    Products run one at a time, so every layer's dequantised weight can live in the same memory.
    """
    buf = _scratch.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = _scratch[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].view(rows, cols)
