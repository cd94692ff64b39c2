"""``nn.Linear`` whose fp32 CPU products run on oneDNN.

PyTorch sends fp32 CPU matmuls to MKL, and MKL takes a generic code path on AMD processors
(this project's development and CI machines among them): its matrix-vector product, nearly
all of a decode step, streams the weights at about half the memory bandwidth, and its matrix
products run at about half oneDNN's speed.  oneDNN's linear (the kernel ``torch.compile``'s
CPU backend uses for frozen weights) reaches the bandwidth.

It has no autograd formula of its own, so a frozen weight gets one here (the input's gradient
is another oneDNN product, with the weight transposed); a trainable weight, autocast and
anything being traced by the compiler keep ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenWeightLinear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _onednn(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (weight,) = ctx.saved_tensors
        grad_x = _onednn(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_bias = grad.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        fast = (
            ONEDNN_LINEAR
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        )
        grad = torch.is_grad_enabled()
        if not fast or (grad and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if grad and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _FrozenWeightLinear.apply(x, self.weight, self.bias)
        return _onednn(x, self.weight, self.bias)
