"""Decoding's attention paths (one query per row: our kernel, two matmuls and a softmax) against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import llama_adapter
from llama_adapter import ModelConfig
from llama_adapter.model import kernels, native, probe
from llama_adapter.model.attention import attention, matmul_attention, ours_attention
from llama_adapter.model.kernels import NEVER

OURS = not [f for f in native.NEEDED_FLAGS if f not in native.cpu_flags()]
needs_ours = pytest.mark.skipif(not OURS, reason="this CPU lacks AVX-512 VNNI: our kernels are not built here")


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """Our kernels loaded where this CPU takes them (in a model, the probe loads them before choosing them)."""
    if OURS:
        assert native.ops() is not None, "our CPU kernels did not build: the README's test command installs g++ and ninja"


def cache_slices(batch: int, kv_heads: int, positions: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v as the model's cache hands them over: the first ``positions`` of a longer preallocated cache (strided)."""
    cache = torch.randn(2, batch, kv_heads, positions + 13, head_dim, dtype=dtype)
    return cache[0, :, :, :positions], cache[1, :, :, :positions]


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads", [8, 2])  # plain and grouped-query
@pytest.mark.parametrize("path", [pytest.param(ours_attention, id="ours", marks=needs_ours), pytest.param(matmul_attention, id="matmuls")])
def test_one_query_attention_equals_sdpa(path, dtype: torch.dtype, tol: float, kv_heads: int) -> None:
    torch.manual_seed(0)
    for head_dim in (16, 20, 128):  # whole 16-lane chunks, a partial one, LLaMA's
        q = torch.randn(3, 8, 1, head_dim, dtype=dtype)
        k, v = cache_slices(3, kv_heads, 37, head_dim, dtype)
        mask = torch.rand(3, 1, 1, 37) > 0.3
        mask[..., 0] = True  # every row attends somewhere
        for m in (None, mask, mask[:1]):  # none, one per row, one for all rows
            want = sdpa_reference(q, k, v, m)
            got = path(q, k, v, m)
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@needs_ours
def test_our_kernel_gives_zeros_where_nothing_is_attended_and_reads_long_caches() -> None:
    torch.manual_seed(1)
    q = torch.randn(2, 4, 1, 64)
    k, v = cache_slices(2, 4, 300, 64, torch.float32)  # more positions than one of the kernel's blocks
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    mask[1] = False
    got = ours_attention(q, k, v, mask)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got[0], sdpa_reference(q[:1], k[:1], v[:1], None)[0])


@pytest.mark.parametrize("kernel", [pytest.param("ours", marks=needs_ours), "matmuls"])
def test_greedy_decoding_is_the_same_on_every_path(pipe, kernel: str) -> None:
    """Every decoding forward (the model's attention, the adapter's, the scheduler's rows) takes the path the plan says."""
    adapted = pipe.with_adapter(llama_adapter.AdapterConfig(adapter_len=4, adapter_layer=2))
    texts = {}
    for start in (1, NEVER):
        with kernels.using(one_query=kernel, one_query_from=start):
            texts[start] = "".join(adapted.stream("the water of the", max_new_tokens=12, temperature=0))
    assert texts[1] == texts[NEVER] and texts[1]


def test_the_probe_sets_where_the_faster_path_takes_over() -> None:
    """Below the chosen length attention stays on SDPA; from it on, on the chosen path (counted with the profiler)."""
    kernel, start = probe._probe_one_query(ModelConfig(dim=512, n_heads=4, n_layers=1, vocab_size=64), torch.bfloat16)
    assert kernel in (("ours", "matmuls") if OURS else ("matmuls",))  # a timed choice: either path that exists here
    assert start == NEVER or start in probe.ATTENTION_POSITIONS
    q = torch.randn(1, 4, 1, 128)
    short, long = (torch.randn(1, 4, n, 128) for n in (15, 16))
    expected = {"ours": "llama_adapter::one_query_attention", "matmuls": "aten::softmax"}
    for path in ["ours", "matmuls"] if OURS else ["matmuls"]:
        with kernels.using(one_query=path, one_query_from=16), profile(activities=[ProfilerActivity.CPU]) as prof:
            attention(q, short, short)
            attention(q, long, long)
        names = [e.name for e in prof.events()]
        assert names.count("aten::scaled_dot_product_attention") == 1 and names.count(expected[path]) == 1
