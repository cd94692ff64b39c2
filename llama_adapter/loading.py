"""Build a ready pipeline from what the user names: base model directory or repo, plus an adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from . import hub
from .checkpoint import check_state, fit_adapter, read_adapter, read_hf_checkpoint, read_meta_checkpoint, shapes
from .config import AdapterConfig, ModelArgs
from .generation import Pipeline
from .model import Transformer
from .quantize import QUANTIZE_MODES, quantize_state, quantized_linear_names, swap_to_int8
from .tokenizer import Tokenizer

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def find_tokenizer(base_dir: Path) -> Path:
    # Meta's original release keeps tokenizer.model beside the 7B/ directory.
    for candidate in (base_dir / "tokenizer.model", base_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in {base_dir} (or its parent directory)")


def read_model_args(base_dir: Path, vocab_size: int, max_seq_len: int | None) -> ModelArgs:
    overrides = {"max_seq_len": max_seq_len} if max_seq_len else {}
    if (base_dir / "params.json").is_file():
        params = ModelArgs.from_params_json(base_dir / "params.json", vocab_size=vocab_size, **overrides)
        return params
    if (base_dir / "config.json").is_file():
        return ModelArgs.from_hf_config(base_dir / "config.json", **overrides)
    raise FileNotFoundError(f"{base_dir} has neither params.json (Meta layout) nor config.json (Hugging Face layout)")


def read_base_state(base_dir: Path, args: ModelArgs, dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    if (base_dir / "params.json").is_file():
        return read_meta_checkpoint(base_dir, dtype, device)
    return read_hf_checkpoint(base_dir, args, dtype, device)


def fresh_adapter_state(model: Transformer, device: torch.device) -> dict[str, torch.Tensor]:
    """A new adapter, as the official code initialises it: N(0, 1) prompts, zero gates (fp32)."""
    state = {}
    for name, p in model.adapter_parameters().items():
        init = torch.zeros if name.endswith(".gate") else torch.randn
        state[name] = init(p.shape, dtype=torch.float32, device=device)
    return state


def load(
    base: str | Path,
    adapter: str | Path | AdapterConfig | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
) -> Pipeline:
    """Load a LLaMA base model and (optionally) an adapter, ready to stream.

    ``base``: a Meta or Hugging Face checkpoint directory, or a Hub repo id (``owner/name[@rev]``).
    ``adapter``: an adapter file, an official release name, a Hub repo id or file, or an
    ``AdapterConfig`` for a fresh (zero-gated) adapter to train.
    ``quantize="int8"``: weight-only int8 for the transformer's matrices (serving only).
    ``compile=True``: decode with a ``torch.compile``d static-shape step (CUDA graphs on GPU);
    the first request pays the compilation.
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    base_dir = hub.resolve_base(base)
    tokenizer = Tokenizer(find_tokenizer(base_dir))
    args = read_model_args(base_dir, tokenizer.n_words, max_seq_len)

    adapter_cfg: AdapterConfig | None = None
    adapter_file = None
    adapter_source = None
    if isinstance(adapter, AdapterConfig):
        adapter_cfg = adapter
    elif adapter is not None:
        path = hub.resolve_adapter(adapter)
        adapter_file = read_adapter(path)
        adapter_cfg, adapter_source = adapter_file.config, f"adapter {path}"

    with torch.device("meta"):
        model = Transformer(args, adapter_cfg)
    expected = shapes(model.state_dict().items())
    adapter_names = set(model.adapter_parameters())

    # To quantize, read lazily on the CPU in the file's dtype and convert matrix by matrix,
    # so the full-precision model never sits on the device.
    cpu = torch.device("cpu")
    state = read_base_state(base_dir, args, None if quantize else dtype, cpu if quantize else device)
    check_state({k: v for k, v in expected.items() if k not in adapter_names}, state, f"base checkpoint {base_dir}")
    if quantize:
        names = quantized_linear_names(model)
        state = quantize_state(state.items(), names, dtype, device)
        swap_to_int8(model, names, dtype)
    if adapter_file is not None:
        adapter_state = fit_adapter(adapter_file, args, adapter_source or "")
        check_state({k: expected[k] for k in adapter_names}, adapter_state, adapter_source or "")
        state.update({k: v.to(device=device, dtype=torch.float32) for k, v in adapter_state.items()})
    elif adapter_cfg is not None:
        state.update(fresh_adapter_state(model, device))

    model.load_state_dict(state, assign=True)
    model.init_rope(device)
    model.eval().requires_grad_(False)
    label = str(adapter) if adapter is not None and not isinstance(adapter, AdapterConfig) else None
    return Pipeline(model, tokenizer, base=str(base), adapter=label, compile=compile)
