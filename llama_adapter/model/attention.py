"""Scaled dot-product attention, with a second path for one query per row (decoding) on CPU.

torch's CPU SDPA kernel is built for many queries.  With one query in bf16 it cost 2-4x what two
batched matmuls and a softmax cost over 64-2048 cached positions with LLaMA-7B's heads, and up to
17x with grouped-query heads; in fp32, or over the adaption prompt's 10 positions, it was as fast
or faster (``bench/attention.py``).  So the probe times both at load and sets the cache length
from which the matmuls serve (``kernels.PLAN.one_query_from``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) [+ mask]) v for q [B, H, T, d] and k, v [B, kv_heads, S, d] (grouped-query when fewer)."""
    if q.shape[2] == 1 and q.device.type == "cpu" and k.shape[2] >= kernels.PLAN.one_query_from:
        return one_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1])


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``attention`` for T == 1: two batched matmuls, the softmax in fp32.  ``mask``: boolean, True = attend,
    broadcastable to [B, 1, 1, S]."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, kv_heads, h // kv_heads, d)  # the query heads that share a key/value head
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float().mul_(d**-0.5)  # [B, kv_heads, H / kv_heads, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).reshape(b, h, 1, d)
