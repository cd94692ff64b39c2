"""``nn.Linear`` whose fp32 CPU products run on oneDNN.

PyTorch sends fp32 CPU matmuls to MKL, and MKL takes a generic code path on AMD processors
(this project's development and CI machines among them): its matrix-vector product, nearly
all of a decode step, streams the weights at about half the memory bandwidth, and its matrix
products run at about half oneDNN's speed.  oneDNN's linear reaches the bandwidth.

The kernel is wrapped as a custom op with its own gradients, all three of them products on
the same kernel, so that eager code, autograd and ``torch.compile`` (which would otherwise
lower an fp32 CPU linear to MKL again) all take it.  Other dtypes, other devices and autocast
keep ``F.linear``.

Which of the two is faster depends on the machine (on Intel processors with AMX, MKL's
fp32 matrix-vector product was the faster one), so ``probe.probe_kernels`` times both on the model's
shapes at load and sets ``kernels.PLAN.fp32_onednn``; oneDNN is the default until then.

Batched decoding (a few rows at once, no autograd) may take our kernel instead (``native``,
``fp32_linear``): at 4-8 rows oneDNN reached 50-100 GFLOP/s on a 2-core machine, ours 100-140.  The
probe sets the token count up to which it serves (``kernels.PLAN.fp32_ours_below``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .kernels import ONEDNN_LINEAR  # noqa: F401 (re-exported: where tests and callers look for it)


def _product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) on oneDNN; strided operands are accepted as they are."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("llama_adapter::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _product(x, weight, bias)


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _product(grad, weight.t())
    if ctx.needs_input_grad[1]:
        grad_weight = _product(grad.flatten(0, -2).t(), x.flatten(0, -2).t())
    if ctx.needs_input_grad[2]:
        grad_bias = grad.flatten(0, -2).sum(0)
    return grad_x, grad_weight, grad_bias


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        plan = kernels.PLAN
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            tokens = x.numel() // self.in_features
            if 2 <= tokens < plan.fp32_ours_below and not torch.is_grad_enabled():  # a few rows decoding together
                out = torch.ops.llama_adapter.fp32_linear(x.reshape(tokens, self.in_features), self.weight)
                out = out.view(*x.shape[:-1], self.out_features)
                return out if self.bias is None else out + self.bias
            if plan.fp32_onednn:
                return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
