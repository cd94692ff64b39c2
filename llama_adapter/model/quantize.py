"""Weight-only int8 and int4 serving; adapters, LoRA, biases and norms stay in full precision.

- int8: symmetric, one scale per output channel.  A 7B model holds about 6.7 GB of weights.
- int4: asymmetric, one scale and zero point per group of ``INT4_GROUP`` input channels (about
  3.5 GB for 7B).  128 rather than 32: on 7B shapes the kernel ran faster and the model is 0.45 GB
  smaller, for a larger but still small logit error (``bench/cpu.py`` reports it).

On CPU each product takes one of two paths, chosen per call by the number of tokens against the
threshold that ``kernels.probe`` measured at load:
- fused: a weight-only kernel that reads the quantized weight directly.  Either ours
  (``cpu_quant.cpp``, built by ``native``: int8 activations per block and VNNI dot products, as
  llama.cpp does) or torch's (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), whichever
  the probe timed faster.  torch's run in the activation dtype the probe found fastest (bf16: their
  fp32 paths stream 5-10x slower), whatever the model's dtype.  Ours has two kernels: one passes over
  the weight rows for up to 4 tokens at a time (decoding), the other is a GEMM that serves 12 tokens
  per weight chunk (batched decoding, prompts), from the token count where the probe found it faster.
- many tokens: the weight is dequantised into one reused scratch buffer and multiplied by the
  machine's GEMM (oneDNN / MKL, bf16).  For int8, where the probe finds it faster, the int8 GEMM
  instead (``Int8Linear.int_gemm``): no dequantising, the machine's int8 dot products (VNNI, AMX), and
  activations kept to about 15 bits by quantizing them in two int8 passes (the value, then what the
  first pass missed).  Taken from the token count where it beats the fused path (on the machine of
  ``bench/RESULTS.md``, never once our GEMM is in that path: it reads a quarter to an eighth of the bytes).
On other devices the weight is dequantised for ``F.linear``; for int8 the compiled CUDA step fuses
that into the GEMV.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..roles import Role, role_of
from . import kernels

INT4_GROUP = 128


def release_free_memory() -> bool:
    """Hand the memory that loading freed back to the system; False where that is not glibc's to do.

    glibc keeps large freed blocks in its heaps once it has seen blocks of their size freed, so the
    probe's timing copies and the quantizer's temporaries would otherwise stay in the serving footprint, and
    pile up while a model is quantized (``build.fill`` trims after each matrix: a 7B int4 load otherwise
    peaked 1.7 GiB above what it kept).
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # macOS, musl: nothing to trim
        return False
    trim(0)
    return True


HUGE_PAGE = 2 << 20


def huge_page_bytes(size: int) -> Tensor:
    """An uninitialised uint8 CPU tensor of ``size`` bytes in memory that Linux may back with 2 MiB pages (where it
    has ``madvise(MADV_HUGEPAGE)``; plain memory otherwise).

    Decoding streams every weight once per token, and on 4 KiB pages our kernels read 7B's FFN matrices at 27 (int4)
    and 30 (int8) GB/s against 32 on 2 MiB pages (2-core VM, ``bench/RESULTS.md``). Transparent huge pages are
    commonly given only on request (``madvise`` mode), and torch's allocator does not ask. Only whole 2 MiB pages
    inside the tensor are asked for, so the footprint does not grow.
    """
    if size < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(size, dtype=torch.uint8)
    # Private anonymous memory (shared would be shmem, which has its own, usually disabled, huge page setting); it is
    # unmapped when the last tensor on it goes.
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(buf, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, start, size // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel without transparent huge pages: the memory still works
        pass
    return whole[start : start + size]


def on_huge_pages(t: Tensor) -> Tensor:
    """``t`` (a quantized CPU weight) copied into ``huge_page_bytes``; smaller tensors and other devices keep ``t``."""
    size = t.numel() * t.element_size()
    if t.device.type != "cpu" or size < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    return huge_page_bytes(size).view(t.dtype).view(t.shape).copy_(t)


# torch's CPU int4 packing interleaves blocks of this many output rows (with AVX-512 and AVX2 alike).
_INT4_BLOCK_ROWS = 64


class QuantizedLinear(nn.Module):
    """Shared parts of the weight-only modules: shapes, the full-precision bias, the CPU path choice."""

    mode: str

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str | None, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # A tuned V2 bias stays in full precision, as a parameter like any adapter weight.
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            out = self.device_product(x)
        else:
            plan = kernels.PLAN
            tokens = x.numel() // self.in_features
            flat = x.reshape(tokens, self.in_features)
            if tokens >= plan.dequant_from[self.mode] and self.can_dequantize():
                out = self.many_tokens(flat, plan)
            else:
                out = self.fused(flat, plan)
            out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def device_product(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def fused(self, x: Tensor, plan: kernels.CpuKernels) -> Tensor:
        """x [M, in] times the quantized weight by the fused CPU kernel the plan chose."""
        raise NotImplementedError

    def can_dequantize(self) -> bool:
        return True

    def many_tokens(self, x: Tensor, plan: kernels.CpuKernels) -> Tensor:
        """x [M, in] times the weight for a prompt: dequantised into the shared scratch buffer, then the GEMM."""
        gemm = plan.gemm_dtype
        return F.linear(x.to(gemm), self.dequantize(kernels.scratch(self.out_features, self.in_features, gemm)))

    def dequantize(self, out: Tensor) -> Tensor:
        """The full-precision weight [out, in] written into ``out``; returns it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


class Int8Linear(QuantizedLinear):
    mode = "int8"

    def __init__(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str | None = None, bias: bool = False
    ) -> None:
        super().__init__(in_features, out_features, dtype, device, bias)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))

    def device_product(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)

    def fused(self, x: Tensor, plan: kernels.CpuKernels) -> Tensor:
        if plan.ours["int8"] and ours_fits("int8", self.out_features, self.in_features):
            op = torch.ops.llama_adapter.int8_gemm if x.shape[0] >= plan.ours_gemm_from else torch.ops.llama_adapter.int8_linear
            return op(x, self.weight, self.scale)
        x = x.to(plan.kernel_dtype["int8"])
        return torch._weight_int8pack_mm(x, self.weight, self.scale.to(x.dtype))

    def dequantize(self, out: Tensor) -> Tensor:
        if kernels.PLAN.ours["int8"] and out.device.type == "cpu":
            torch.ops.llama_adapter.int8_dequantize(self.weight, self.scale, out)
            return out
        return out.copy_(self.weight).mul_(self.scale.to(out.dtype)[:, None])

    def many_tokens(self, x: Tensor, plan: kernels.CpuKernels) -> Tensor:
        return self.int_gemm(x) if plan.int8_gemm else super().many_tokens(x, plan)

    def int_gemm(self, x: Tensor) -> Tensor:
        """x [M, in] times the weight on the int8 GEMM, in fp32.

        Each row of x is quantized twice with its own absmax scale: q1 ~ x / s1, then q2 ~ (x - q1 s1) / s2.
        One ``_int_mm`` of [q1; q2] gives both products; x W^T ~ s1 (q1 W^T) + s2 (q2 W^T), with an
        activation error about 127x below one int8 pass's, well below bf16's even with outlier channels.
        """
        x = x.float()
        s1 = x.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
        q1 = (x / s1).round_()
        rest = x - q1 * s1
        s2 = rest.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
        q2 = (rest / s2).round_()
        acc = torch._int_mm(torch.cat([q1, q2]).to(torch.int8), self.weight.t()).float()
        m = x.shape[0]
        return torch.addcmul(acc[:m] * s1, acc[m:], s2).mul_(self.scale.float())


class Int4Linear(QuantizedLinear):
    """``weight`` uint8, two 4-bit values q per byte ([out, in/2] but in our layout), in one of three layouts:

    - "panels" (our kernel's, on CPU; see ``cpu_quant.cpp``): ``weight`` [out/16, in/group, 1024] and
      ``scales_and_zeros`` float16 [out/16, in/group, 2, 16] (16 rows' scales, then their lows, w = q * scale + low)
      are views of one buffer, so that decoding reads them as one stream (``panel_int4``);
    - "torch" (torch's CPU kernel's packed order) and "rows" (row by row, low nibble first; other
      devices): ``scales_and_zeros`` [in/group, out, 2] with w = (q - 8) * scale + zero.

    The scales' shape tells the layouts apart, so quantized tensors shared with another model keep theirs.
    """

    mode = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        bias: bool = False,
        group: int = INT4_GROUP,
    ) -> None:
        super().__init__(in_features, out_features, dtype, device, bias)
        self.group = group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group, out_features, 2, dtype=dtype, device=device))

    def device_product(self, x: Tensor) -> Tensor:
        w = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
        return F.linear(x, self.dequantize(w))

    @property
    def layout(self) -> str:
        if self.scales_and_zeros.dim() == 4:
            return "panels"
        return "torch" if self.weight.device.type == "cpu" and int4_cpu_layout() else "rows"

    def fused(self, x: Tensor, plan: kernels.CpuKernels) -> Tensor:
        if self.layout == "panels":  # one kernel for any number of tokens
            return torch.ops.llama_adapter.int4_linear(x, self.weight, self.scales_and_zeros)
        x = x.to(plan.kernel_dtype["int4"])
        return torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group, self.scales_and_zeros.to(x.dtype))

    def can_dequantize(self) -> bool:
        if self.layout != "torch":
            return True
        return self.out_features % _INT4_BLOCK_ROWS == 0 and cpu_unpack_ok()

    def dequantize(self, out: Tensor) -> Tensor:
        if self.layout == "panels":
            torch.ops.llama_adapter.int4_dequantize(self.weight, self.scales_and_zeros, out)
            return out
        q = unpack_int4(self.weight, self.layout == "torch")
        groups = self.in_features // self.group
        sz = self.scales_and_zeros.to(out.dtype)
        scale, zero = sz[..., 0].t()[:, :, None], sz[..., 1].t()[:, :, None]  # [out, groups, 1]
        # (q - 8) * scale + zero == q * scale + (zero - 8 scale): one pass over the weight.
        view = out.view(self.out_features, groups, self.group)
        return torch.addcmul(zero - 8 * scale, q.view_as(view), scale, out=view).view(self.out_features, self.in_features)


def int4_cpu_layout() -> bool:
    """Whether this torch has the packed int4 CPU kernel (torch >= 2.5)."""
    return hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@functools.cache
def cpu_unpack_ok() -> bool:
    """Whether ``unpack_int4`` inverts this torch's CPU packing (checked once, on a small random matrix)."""
    q = torch.randint(0, 16, (2 * _INT4_BLOCK_ROWS, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        return torch.equal(unpack_int4(pack_int4(q, True), True), q)
    except RuntimeError:
        return False


# Weights are quantized this many rows at a time: the fp32 temporaries of a 32000-row head would
# otherwise add about 1.5 GB to the peak while loading.
QUANTIZE_ROWS = 2048


def quantize_weight(weight: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int8 weight and per-row scale with weight ~= q * scale[:, None] (absmax, symmetric)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        w = weight[rows].float()
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        q[rows] = (w / s[:, None]).round_().clamp_(-127, 127)
        scale[rows] = s
    return q, scale


def quantize_int4(weight: Tensor, scale_dtype: torch.dtype, group: int = INT4_GROUP) -> tuple[Tensor, Tensor]:
    """int4 values (0..15, as uint8 [out, in]) and scales_and_zeros [in/group, out, 2] (min-max per group)."""
    out_features, in_features = weight.shape
    q = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales_and_zeros = torch.empty(in_features // group, out_features, 2, dtype=scale_dtype, device=weight.device)
    for start in range(0, out_features, QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        w = weight[rows].float().unflatten(1, (in_features // group, group))
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-10)
        q[rows] = ((w - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).flatten(1)
        scales_and_zeros[:, rows] = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1)
    return q, scales_and_zeros


PANEL_ROWS = 16  # rows per panel of our int4 layout
PANEL_BYTES = PANEL_ROWS * INT4_GROUP // 2  # one panel's weights of one group
PANEL_STRIDE = PANEL_BYTES + PANEL_ROWS * 4  # and their float16 scales and lows


def panel_int4(q: Tensor, scales_and_zeros: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_int4``'s output in our kernel's panel layout (``cpu_quant.cpp``), in one buffer on 2 MiB pages where
    it is large enough: per panel of 16 rows and group, 1 KiB of weights and then the 16 rows' float16 scales and
    lows.  Returns two views of it: weights [out/16, in/group, 1024] and scales [out/16, in/group, 2, 16].  Needs
    out % 16 == 0 (``ours_fits``)."""
    rows, cols = q.shape
    panels, groups = rows // PANEL_ROWS, cols // INT4_GROUP
    buf = huge_page_bytes(panels * groups * PANEL_STRIDE).view(panels, groups, PANEL_STRIDE)
    # [panel, row, group, half, chunk, byte] -> bytes [panel, group, chunk, row, byte]: the low half in low nibbles.
    v = q.view(panels, PANEL_ROWS, groups, 2, 16, 4)
    weight = buf[..., :PANEL_BYTES]
    weight.view(panels, groups, 16, PANEL_ROWS, 4).copy_((v[:, :, :, 0] | (v[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4))
    scale, zero = scales_and_zeros[..., 0].float().t(), scales_and_zeros[..., 1].float().t()  # [out, groups]
    low = zero - 8 * scale  # (q - 8) * scale + zero == q * scale + low
    scales = buf[..., PANEL_BYTES:].view(torch.float16).view(panels, groups, 2, PANEL_ROWS)
    scales.copy_(torch.stack([scale, low], dim=1).view(panels, PANEL_ROWS, 2, groups).permute(0, 3, 2, 1))
    return weight, scales


def ours_fits(mode: str, out_features: int, in_features: int) -> bool:
    """Whether our kernel takes a matrix of this shape: int8 rows of whole 64-byte chunks; int4 the panel
    layout (rows in sixteens, whole groups)."""
    if mode == "int8":
        return in_features % 64 == 0
    return out_features % PANEL_ROWS == 0 and in_features % INT4_GROUP == 0


def int4_layout(device: torch.device, shape: tuple[int, int], ours: bool) -> str:
    """The layout an int4 matrix of ``shape`` takes on ``device`` (``Int4Linear``), ``ours`` if our kernel serves it."""
    if device.type != "cpu":
        return "rows"
    if ours and ours_fits("int4", *shape):
        return "panels"
    return "torch" if int4_cpu_layout() else "rows"


def int4_tensors(weight: Tensor, layout: str, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(weight, scales_and_zeros) of ``weight`` quantized to int4 in ``layout``, the weight on 2 MiB pages where it is
    large enough (``on_huge_pages``; the panel layout's one buffer, float16 scales included, ``panel_int4``)."""
    if layout == "panels":
        return panel_int4(*quantize_int4(weight, torch.float32))
    q, scales_and_zeros = quantize_int4(weight, scale_dtype)
    return on_huge_pages(pack_int4(q, layout == "torch")), scales_and_zeros


def pack_int4(q: Tensor, cpu_layout: bool) -> Tensor:
    """uint8 [out, in] values 0..15 -> [out, in/2] bytes: the CPU kernel's packing, or row by row."""
    if cpu_layout:
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor, cpu_layout: bool) -> Tensor:
    """The inverse of ``pack_int4``: uint8 [out, in] values 0..15.

    torch's CPU layout, per block of 64 rows, stores for input channel k 32 bytes: byte j holds
    row j in its low nibble and row j + 32 in its high one.  ``cpu_unpack_ok`` checks this against
    the packing function before the dequantising path is used.
    """
    rows, half = packed.shape
    if not cpu_layout:
        return torch.stack([packed & 15, packed >> 4], dim=-1).view(rows, 2 * half)
    blocks = packed.view(rows // _INT4_BLOCK_ROWS, 2 * half, _INT4_BLOCK_ROWS // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).transpose(1, 2).reshape(rows, 2 * half)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The big matrices: every Linear whose weight is a base weight (the blocks' projections and the output head).

    Adapter parts (LoRA, the visual adapter) stay in full precision.
    """
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and role_of(f"{n}.weight") is Role.BASE]


def check_int4_shapes(model: nn.Module, names: list[str], group: int = INT4_GROUP) -> None:
    """int4 needs every quantized matrix's input width to be a multiple of the group size."""
    bad = sorted({(m.in_features) for n, m in model.named_modules() if n in names and m.in_features % group})
    if bad:
        raise ValueError(
            f"--quantize int4 needs input widths divisible by its group size {group}, and this model has {bad}"
            " (dim or FFN width): use --quantize int8 for this model"
        )


def swap_to_quantized(model: nn.Module, names: list[str], dtype: torch.dtype, mode: str) -> None:
    """Replace the named Linear modules by empty Int8Linear / Int4Linear ones on the same device (meta works)."""
    kind = {"int8": Int8Linear, "int4": Int4Linear}[mode]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = kind(old.in_features, old.out_features, dtype, old.weight.device, bias=old.bias is not None)
        # V2 LoRA rides on forward hooks of the base projection: they must follow it.
        for hook in old._forward_hooks.values():
            new.register_forward_hook(hook)
        setattr(parent, child, new)


def quantized_modes(model: nn.Module) -> dict[str, list[str]]:
    """The names of the model's quantized Linear modules, by mode."""
    out: dict[str, list[str]] = {"int8": [], "int4": []}
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            out[m.mode].append(n)
    return out


def weight_format(model: nn.Module) -> str:
    """What the model's matrices are, in words (the app's model panel, the load log)."""
    dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
    for mode, names in quantized_modes(model).items():
        if names:
            m = model.get_submodule(names[0])
            detail = f"groups of {m.group}" if isinstance(m, Int4Linear) else "per channel"
            return f"{mode} weight-only ({detail}), {dtype} activations"
    return dtype
