"""Decoding's attention path (one query per row, two matmuls and a softmax) against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import llama_adapter
from llama_adapter import ModelConfig
from llama_adapter.model import kernels, probe
from llama_adapter.model.attention import attention, one_query_attention
from llama_adapter.model.kernels import NEVER


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads", [8, 2])  # plain and grouped-query
def test_one_query_attention_equals_sdpa(dtype: torch.dtype, tol: float, kv_heads: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 8, 1, 16, dtype=dtype)
    k, v = (torch.randn(3, kv_heads, 37, 16, dtype=dtype) for _ in range(2))
    mask = torch.rand(3, 1, 1, 37) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=kv_heads != 8)
        got = one_query_attention(q, k, v, m)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_a_cache_slice_is_attended_like_a_contiguous_tensor() -> None:
    """The decode path reads keys from a slice of the preallocated cache (a strided view)."""
    torch.manual_seed(1)
    cache = torch.randn(2, 4, 64, 16)
    q = torch.randn(2, 4, 1, 16)
    k, v = cache[:, :, :20], cache.flip(2)[:, :, :20]
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous()))


def test_greedy_decoding_is_the_same_on_either_path(pipe) -> None:
    """Every decoding forward (the model's attention, the adapter's, the scheduler's rows) takes the path the plan says."""
    adapted = pipe.with_adapter(llama_adapter.AdapterConfig(adapter_len=4, adapter_layer=2))
    texts = {}
    for start in (1, NEVER):
        with kernels.using(one_query_from=start):
            texts[start] = "".join(adapted.stream("the water of the", max_new_tokens=12, temperature=0))
    assert texts[1] == texts[NEVER] and texts[1]


def test_the_probe_sets_where_the_matmuls_take_over() -> None:
    """Below the chosen length attention stays on SDPA; from it on, on the matmuls (counted with the profiler)."""
    start = probe._probe_one_query(ModelConfig(dim=512, n_heads=4, n_layers=1, vocab_size=64), torch.bfloat16)
    assert start == NEVER or start in probe.ATTENTION_POSITIONS
    q = torch.randn(1, 4, 1, 128)
    short, long = (torch.randn(1, 4, n, 128) for n in (15, 16))
    with kernels.using(one_query_from=16), profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(q, short, short)
        attention(q, long, long)
    names = [e.name for e in prof.events()]
    assert names.count("aten::scaled_dot_product_attention") == 1 and names.count("aten::softmax") == 1
