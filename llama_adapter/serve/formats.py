"""Which weight format a CPU model is served in, from the memory actually available.

fp32 when it fits with room to spare, else bf16, int8, int4: the most faithful format that fits
with its loading overshoot and a tenth of the memory left over (a quarter for fp32).
The footprint counted is the serving one: weights, the full-context KV cache, the dequantising
scratch buffer and the runtime itself.  Available memory is the container's (the cgroup limit
less its usage, as on a Hugging Face Space) where there is a limit, and never more than the
kernel's MemAvailable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model.quantize import INT4_GROUP

GiB = 1 << 30
RUNTIME_BYTES = GiB // 2  # Python, torch, the tokenizer, activations
LOADING_BYTES = GiB  # loading may overshoot the serving footprint by this much (one tensor's temporaries)
SPARE = 0.10  # every format leaves a tenth of the memory to the rest of the machine (and the page cache)
FP32_SPARE = 0.25  # fp32 only when it leaves a quarter free: it is the most faithful, not the fastest


@dataclass(frozen=True)
class WeightFormat:
    dtype: torch.dtype
    quantize: str | None
    reason: str

    @property
    def name(self) -> str:
        return self.quantize or str(self.dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")


def serving_bytes(args: ModelConfig, dtype: torch.dtype, quantize: str | None) -> int:
    """Bytes a model of ``args`` holds while serving in this format (batch 1, full-context cache)."""
    d, f, layers, kv = args.dim, args.ffn_hidden_dim, args.n_layers, args.kv_heads * args.head_dim
    act = torch.tensor([], dtype=dtype).element_size()
    matrices = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + args.vocab_size * d
    if quantize == "int8":
        weights = matrices + (layers * (2 * d + 2 * kv + 3 * f) + args.vocab_size) * act  # + per-channel scales
    elif quantize == "int4":
        weights = matrices // 2 + matrices // INT4_GROUP * 2 * 2  # + bf16 scale and zero per group
    else:
        weights = matrices * act
    embeddings_and_norms = (args.vocab_size * d + (2 * layers + 1) * d) * act
    cache = 2 * layers * args.max_seq_len * kv * act
    scratch = f * d * 2 if quantize else 0  # one bf16 FFN matrix for the prefill GEMM
    return weights + embeddings_and_norms + cache + scratch + RUNTIME_BYTES


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(cgroup: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")) -> tuple[int, str]:
    """(bytes this process can still use, where that figure comes from)."""
    available, source = None, "MemAvailable"
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    # cgroup v2, then v1 (whose "no limit" is a huge number).
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit = _read_int(cgroup / limit_file)
        if limit is not None and limit < 1 << 60:
            free = limit - (_read_int(cgroup / usage_file) or 0)
            if available is None or free < available:
                available, source = free, f"cgroup limit {limit / GiB:.1f} GiB"
            break
    if available is None:
        raise RuntimeError("cannot tell how much memory is free here: pass dtype= or quantize= to choose the format")
    return available, source


def choose_format(args: ModelConfig, available: int, source: str = "available", extra_bytes: int = 0) -> WeightFormat:
    """The most faithful CPU format whose serving footprint (plus ``extra_bytes``, e.g. CLIP) fits ``available``."""
    candidates = ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.bfloat16, "int4"))
    sizes = []
    for dtype, quantize in candidates:
        need = serving_bytes(args, dtype, quantize) + extra_bytes
        limit = available * (1 - (FP32_SPARE if dtype == torch.float32 and quantize is None else SPARE))
        sizes.append(need)
        if need + LOADING_BYTES <= limit:
            why = f"needs {need / GiB:.1f} GiB to serve, {available / GiB:.1f} GiB free ({source})"
            larger = [f"{WeightFormat(d, q, '').name} {s / GiB:.1f} GiB" for (d, q), s in zip(candidates, sizes[:-1], strict=False)]
            if larger:
                why += "; too large: " + ", ".join(larger)
            return WeightFormat(dtype, quantize, why)
    return WeightFormat(
        torch.bfloat16,
        "int4",
        f"even int4 needs {sizes[-1] / GiB:.1f} GiB and only {available / GiB:.1f} GiB is free ({source}): loading may fail;"
        " try a smaller max_seq_len",
    )
