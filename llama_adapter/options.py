"""Choices a user makes in several places (Python API, app, command lines), each defined once."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}  # fmt: skip
# The names the command lines and the app offer (the rest are accepted aliases).
DTYPE_CHOICES = ("fp32", "bf16", "fp16")
QUANTIZE_MODES = ("int8", "int4")


def one_of(choices: tuple[str, ...]) -> str:
    """``a, b or c``: the choices as a message names them."""
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use {one_of(DTYPE_CHOICES)}")
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use {one_of(DTYPE_CHOICES)}") from None


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; use {one_of(QUANTIZE_MODES)}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (None: the default), refused with a message if unknown or not on this machine."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)[:100]!r}; use cpu or cuda (cuda:N for the N-th GPU)") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use cpu or cuda")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available on this machine; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return d


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_adapter_shape(text: str) -> tuple[int, int]:
    """``LENxLAYERS`` (e.g. ``10x30``, the official V1 release) as (adapter_len, adapter_layer)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"adapter shape {text!r} is not LENxLAYERS with positive numbers, e.g. 10x30")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class SamplingDefaults:
    """The official demos' settings: near-greedy, nucleus 0.75, replies up to 256 tokens."""

    max_new_tokens: int = 256
    temperature: float = 0.1
    top_p: float = 0.75


SAMPLING = SamplingDefaults()
