"""The oneDNN-backed Linear against F.linear: values, gradients, and which calls take which kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from llama_adapter.model.linear import ONEDNN_LINEAR, Linear
from llama_adapter.serve.engine import Decoder

needs_onednn = pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")


def frozen_linear(bias: bool = True, in_features: int = 96, out_features: int = 80) -> Linear:
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=bias)
    layer.weight.requires_grad_(False)
    if bias:
        layer.bias.requires_grad_(False)
    return layer


def onednn_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("shape", [(1, 96), (3, 7, 96), (16, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_matches_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    layer = frozen_linear(bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert out.shape == (*shape[:-1], 80)


def test_non_contiguous_input() -> None:
    layer = frozen_linear()
    x = torch.randn(96, 6).t()  # a transposed view
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_frozen_weight_backward_matches_f_linear() -> None:
    """Training a frozen base: gradients reach the input (and a tuned bias), the weight gets none."""
    layer = frozen_linear()
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 96, requires_grad=True)
    grad_out = torch.randn(2, 5, 80)
    layer(x).backward(grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = layer.bias.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.weight, bias_ref).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


def test_trainable_weight_gradients_match_f_linear() -> None:
    layer = frozen_linear()
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 96, requires_grad=True)
    grad_out = torch.randn(2, 5, 80)
    layer(x).backward(grad_out)

    ref = [t.detach().clone().requires_grad_(True) for t in (x, layer.weight, layer.bias)]
    F.linear(*ref).backward(grad_out)
    for got, want in zip((x.grad, layer.weight.grad, layer.bias.grad), (r.grad for r in ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_autocast_is_honoured() -> None:
    layer = frozen_linear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 96)).dtype == torch.bfloat16


def test_other_dtypes_are_plain_linear() -> None:
    layer = frozen_linear().to(torch.bfloat16)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_fp32_cpu_products_take_onednn() -> None:
    """The forward and exactly the gradients that are needed run on oneDNN."""
    layer = frozen_linear()
    x = torch.randn(1, 96)
    with torch.inference_mode():
        assert onednn_calls(lambda: layer(x)) == 1

    xg = torch.randn(4, 96, requires_grad=True)
    assert onednn_calls(lambda: layer(xg).sum().backward()) == 2  # forward, and the input's gradient

    layer.weight.requires_grad_(True)
    assert onednn_calls(lambda: layer(xg).sum().backward()) == 3


@needs_onednn
def test_compiled_graph_keeps_onednn() -> None:
    """torch.compile would lower an fp32 CPU linear to MKL; the custom op keeps oneDNN, with the same values."""
    layer = frozen_linear()
    x = torch.randn(3, 96)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        assert onednn_calls(lambda: compiled(x)) == 1
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_decoding_runs_every_projection_on_onednn(pipe) -> None:
    """The model's q, k, v, o, w1, w2, w3 and output head all use this Linear (fp32, CPU)."""
    decoder = Decoder(pipe.model, pad_id=0)
    steps = decoder.steps([[1, 5, 9]], 2, 0.0, 1.0, None)
    next(steps)  # prefill
    assert onednn_calls(lambda: next(steps)) == 7 * pipe.model.args.n_layers + 1
