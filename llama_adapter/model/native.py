"""Our CPU kernels (``cpu_quant.cpp``, ``cpu_attention.cpp``, ``cpu_norm_rope.cpp``): built on first use for
this machine, or absent.

They need a C++ compiler (``g++``), ninja and a CPU with AVX-512 VNNI.  The build is torch's JIT
extension build with ``-march=native``, cached under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``) in a directory named for this source and this CPU's features, so a
cache shared between machines never loads code built for another CPU.  It takes 10-20 s once.

When they are absent (no compiler, another CPU, ``LLAMA_ADAPTER_NATIVE=0``), ``ops()`` returns None,
logs why once, and the products run on torch's kernels: the probe only ever chooses among what works.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("llama_adapter.load")
SOURCES = [Path(__file__).with_name(name) for name in ("cpu_quant.cpp", "cpu_attention.cpp", "cpu_norm_rope.cpp")]
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512_vnni", "f16c")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def build_name(flags: set[str]) -> str:
    """The extension's name: one per source text and CPU feature set (the build uses -march=native)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"llama_adapter_cpu_{digest}"


@functools.cache
def ops() -> Any | None:
    """``torch.ops.llama_adapter`` with our kernels, or None (the reason is logged)."""
    if os.environ.get("LLAMA_ADAPTER_NATIVE", "1") == "0":
        log.info("our CPU kernels: off (LLAMA_ADAPTER_NATIVE=0)")
        return None
    flags = cpu_flags()
    missing = [f for f in NEEDED_FLAGS if f not in flags]
    if missing:
        log.info("our CPU kernels: not used, this CPU lacks %s; torch's kernels serve", ", ".join(missing))
        return None
    try:
        from torch.utils.cpp_extension import load

        load(
            name=build_name(flags),
            sources=[str(p) for p in SOURCES],
            # -fopenmp at compile time only: at::parallel_for's OpenMP calls then bind to the libgomp torch
            # already loaded, so the kernels share torch's thread pool instead of starting a second one.
            # -ffp-contract=off: a * b + c rounds twice, as torch's separate ops do (fused multiply-adds are
            # written out as intrinsics where they are meant).
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            is_python_module=False,
            verbose=False,
        )
        namespace = torch.ops.llama_adapter
        namespace.int8_linear(torch.zeros(1, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4))
        _register_fakes()
    except Exception as e:  # any build or load failure: the kernels are optional
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("our CPU kernels: could not be built (%s); torch's kernels serve. Install g++ and ninja to use them.", first)
        return None
    return namespace


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing, so that a compiled decode step (``--compile``) can call our kernels."""

    def _product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # x [M, K], weight [N, K]
        return x.new_empty((x.shape[0], weight.shape[0]))

    for product in ("int8_linear", "int8_gemm"):
        torch.library.register_fake(f"llama_adapter::{product}")(_product)

    @torch.library.register_fake("llama_adapter::int4_linear")
    def _int4(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # weight [N/16, K/128, 1024]
        return x.new_empty((x.shape[0], weight.shape[0] * 16))

    @torch.library.register_fake("llama_adapter::fp32_linear")
    def _fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("llama_adapter::rms_norm")
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))

    @torch.library.register_fake("llama_adapter::rope")
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("llama_adapter::one_query_attention")
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llama_adapter::int4_dequantize")
    def _dequantize(weight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        return None

    @torch.library.register_fake("llama_adapter::int8_dequantize")
    def _dequantize8(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        return None
