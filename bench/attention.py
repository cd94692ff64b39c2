"""Decoding's attention on CPU: torch's SDPA kernel against two matmuls and a softmax (``one_query_attention``).

    python bench/attention.py [--no-save]

One query per row over a cache of S positions, LLaMA-7B's heads (32 of 128) and Llama-3-8B's grouped
ones (32 query heads on 8), batch 1, bf16 and fp32; median of 50 calls each, both paths in the same run.
A decode step makes one such call per layer, plus one per adapted layer for the adaption prompt (S = 10).
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
from common import append_results

from llama_adapter.model.attention import one_query_attention

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
    lines = ["| heads | dtype | cached positions | SDPA µs | matmuls + softmax µs | speed-up |", "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for name, (heads, kv_heads) in HEADS.items():
            for dtype in (torch.bfloat16, torch.float32):
                for s in POSITIONS:
                    q = torch.randn(1, heads, 1, 128, dtype=dtype)
                    k, v = (torch.randn(1, kv_heads, s, 128, dtype=dtype) for _ in range(2))
                    gqa = kv_heads != heads
                    sdpa = median_us(lambda q=q, k=k, v=v, gqa=gqa: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
                    ours = median_us(lambda q=q, k=k, v=v: one_query_attention(q, k, v))
                    dt = str(dtype).removeprefix("torch.")
                    lines.append(f"| {name} | {dt} | {s} | {sdpa:.0f} | {ours:.0f} | {sdpa / ours:.1f}x |")
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
