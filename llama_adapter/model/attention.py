"""Scaled dot-product attention, with its own paths for one query per row (decoding) on CPU.

torch's CPU SDPA kernel is built for many queries.  With one query its batched matmuls first copy
the keys and values out of the preallocated cache (a strided slice) into contiguous memory, and in
the 7B model those copies cost more than reading the cache: at 160 positions about 1 ms per layer
and token in bf16.  Two paths read the cache for one query instead:

- ours (``cpu_attention.cpp``, built by ``native`` where the CPU has AVX-512): reads each key and
  value once, in place, for all the query heads that share it;
- two batched matmuls and a softmax (``matmul_attention``), for CPUs without ours: faster than SDPA
  in bf16 from a few dozen positions, not in fp32.

The probe times them on cache slices at load (``kernels.PLAN.one_query`` and ``one_query_from``;
``bench/attention.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

OURS_DTYPES = (torch.float32, torch.bfloat16)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) [+ mask]) v for q [B, H, T, d] and k, v [B, kv_heads, S, d] (grouped-query when fewer).
    ``mask``: boolean, True = attend."""
    plan = kernels.PLAN
    if q.shape[2] == 1 and q.device.type == "cpu" and k.shape[2] >= plan.one_query_from:
        if plan.one_query == "ours" and q.dtype in OURS_DTYPES and k.dtype == q.dtype == v.dtype:
            return ours_attention(q, k, v, mask)
        return matmul_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1])


def ours_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``attention`` for T == 1 on our kernel (needs ``native.ops()``); ``mask`` broadcastable to [B, 1, 1, S]."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rows = None if mask is None else mask.reshape(mask.shape[0], mask.shape[-1]).expand(q.shape[0], k.shape[2])
    return torch.ops.llama_adapter.one_query_attention(q, k, v, rows)


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``attention`` for T == 1: two batched matmuls, the softmax in fp32.  ``mask``: broadcastable to [B, 1, 1, S]."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, kv_heads, h // kv_heads, d)  # the query heads that share a key/value head
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float().mul_(d**-0.5)  # [B, kv_heads, H / kv_heads, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).reshape(b, h, 1, d)
