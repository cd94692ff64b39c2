"""Decoding's attention on CPU: torch's SDPA kernel against our kernel and two matmuls and a softmax.

    python bench/attention.py [--no-save]

One query per row over the first S positions of a 2048-position cache (a strided slice, as the model's
preallocated cache hands them over), LLaMA-7B's heads (32 of 128) and Llama-3-8B's grouped ones (32
query heads on 8), batch 1, bf16 and fp32; median of 50 calls each, every path in the same run.  A
decode step makes one such call per layer, plus one per adapted layer for the adaption prompt (S = 10).
The bound is the time to read the keys and values once at the copy bandwidth measured in the same run
(caches that fit the last-level cache can beat it).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import append_results, copy_bandwidth

from llama_adapter.model import native
from llama_adapter.model.attention import matmul_attention, ours_attention

POSITIONS = (10, 64, 256, 1024, 2048)
HEADS = {"7B (32 heads)": (32, 32), "8B (32 on 8 kv heads)": (32, 8)}


def median_us(fn: Callable[[], object], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    ours = native.ops() is not None
    bw = copy_bandwidth()
    lines = [
        f"Copy bandwidth: {bw / 1e9:.1f} GB/s.",
        "",
        "| heads | dtype | cached positions | SDPA µs | matmuls + softmax µs | ours µs | SDPA / ours | bound µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for name, (heads, kv_heads) in HEADS.items():
            for dtype in (torch.bfloat16, torch.float32):
                cache = torch.randn(2, 1, kv_heads, max(POSITIONS), 128, dtype=dtype)
                q = torch.randn(1, heads, 1, 128, dtype=dtype)
                for s in POSITIONS:
                    k, v = cache[0, :, :, :s], cache[1, :, :, :s]
                    gqa = kv_heads != heads
                    sdpa = median_us(lambda q=q, k=k, v=v, gqa=gqa: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
                    matmuls = median_us(lambda q=q, k=k, v=v: matmul_attention(q, k, v))
                    mine = median_us(lambda q=q, k=k, v=v: ours_attention(q, k, v)) if ours else float("nan")
                    bound = 2 * k.numel() * k.element_size() / bw * 1e6
                    dt = str(dtype).removeprefix("torch.")
                    lines.append(f"| {name} | {dt} | {s} | {sdpa:.0f} | {matmuls:.0f} | {mine:.0f} | {sdpa / mine:.1f}x | {bound:.0f} |")
                    print(lines[-1], file=sys.stderr, flush=True)
    out = "\n".join(lines)
    print(out)
    if not args.no_save:
        append_results(
            f"Decoding attention on CPU, one query ({torch.get_num_threads()} threads)",
            "python bench/attention.py " + shlex.join(sys.argv[1:]),
            out,
        )


if __name__ == "__main__":
    main()
