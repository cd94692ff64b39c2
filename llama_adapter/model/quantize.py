"""Weight-only int8 serving: per-output-channel symmetric scales; activations stay in the model dtype.

A 7B model then holds about 6.7 GB of weights instead of 13.5 GB.  On CUDA the dequantisation
is a plain ``weight.to(dtype)`` before the matmul: eager decoding materialises each dequantised
matrix for its call, while the compiled step (``--compile``, whose coordinate-descent tuning lets
inductor turn a one-row matmul into a fusable reduction) fuses it into the GEMV.  On CPU torch's
``_weight_int8pack_mm`` kernel avoids materialising the dequantised weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..roles import Role, role_of


class Int8Linear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str | None = None, bias: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        # A tuned V2 bias stays in full precision, as a parameter like any adapter weight.
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features)
            out = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(x.dtype)).view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_weight(weight: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int8 weight and per-row scale with weight ~= q * scale[:, None] (absmax, symmetric)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.to(scale_dtype)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The big matrices: every Linear whose weight is a base weight (the blocks' projections and the output head).

    Adapter parts (LoRA, the visual adapter) stay in full precision.
    """
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and role_of(f"{n}.weight") is Role.BASE]


def swap_to_int8(model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
    """Replace the named Linear modules by empty Int8Linear ones on the same device (meta works)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = Int8Linear(old.in_features, old.out_features, dtype, old.weight.device, bias=old.bias is not None)
        # V2 LoRA rides on forward hooks of the base projection: they must follow it.
        for hook in old._forward_hooks.values():
            new.register_forward_hook(hook)
        setattr(parent, child, new)
