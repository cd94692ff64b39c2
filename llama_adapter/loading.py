"""Build a ready pipeline from what the user names: base model directory or repo, plus an adapter."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from . import hub
from .checkpoint import check_state, fit_adapter, read_adapter, read_hf_checkpoint, read_meta_checkpoint, shapes
from .config import AdapterConfig, ModelArgs, VisualConfig
from .generation import Pipeline
from .model import Transformer
from .quantize import QUANTIZE_MODES, Int8Linear, quantize_state, quantized_linear_names, swap_to_int8
from .tokenizer import Tokenizer
from .visual import ClipSpec, VisualEncoder, build_clip

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
        return ModelArgs.from_params_json(base_dir / "params.json", tokenizer_vocab=vocab_size, **overrides)
    if (base_dir / "config.json").is_file():
        return ModelArgs.from_hf_config(base_dir / "config.json", **overrides)
    raise FileNotFoundError(f"{base_dir} has neither params.json (Meta layout) nor config.json (Hugging Face layout)")


def read_base_state(base_dir: Path, args: ModelArgs, dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    if (base_dir / "params.json").is_file():
        return read_meta_checkpoint(base_dir, dtype, device)
    return read_hf_checkpoint(base_dir, args, dtype, device)


# Read only by adapter_kv, once per request: kept in fp32.  Everything else meets activations in the model dtype.
_FP32_ADAPTER_NAMES = ("adapter_query.weight", ".attention.gate", ".attention.new_gate")


def adapter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith(_FP32_ADAPTER_NAMES) else dtype


def fresh_adapter_state(model: Transformer, device: torch.device, dtype: torch.dtype, skip: set[str]) -> dict[str, Tensor]:
    """A new adapter, as the official code initialises it: N(0, 1) prompts, zero gates and biases,
    new_gate 1, LoRA down-projections as nn.Linear and zero up-projections.  Names in ``skip``
    (tuned norms, which start at the base model's) are left out."""
    state = {}
    for name, p in model.adapter_parameters().items():
        if name in skip:
            continue
        t = torch.empty(p.shape, dtype=adapter_dtype(name, dtype), device=device)
        if name == "adapter_query.weight":
            torch.nn.init.normal_(t)
        elif name.endswith(".new_gate"):
            torch.nn.init.ones_(t)
        elif name.endswith("_l1.weight"):
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        else:  # gates, biases, LoRA up-projections
            torch.nn.init.zeros_(t)
        state[name] = t
    return state


def build_visual(cfg: VisualConfig, query_len: int, dim: int, clip: ClipSpec | None, fresh: bool) -> VisualEncoder:
    """CLIP from open_clip plus the visual adapter; the adapter's parameters are on the meta device unless ``fresh``."""
    tower, preprocess = build_clip(clip or ClipSpec.of(cfg))
    if fresh:
        return VisualEncoder(tower, preprocess, cfg, query_len, dim)
    with torch.device("meta"):  # the adapter's weights come from the file; CLIP (built above) stays as it is
        return VisualEncoder(tower, preprocess, cfg, query_len, dim)


def load(
    base: str | Path | Pipeline,
    adapter: str | Path | AdapterConfig | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
    clip: ClipSpec | None = None,
) -> Pipeline:
    """Load a LLaMA base model and (optionally) an adapter, ready to stream.

    ``base``: a Meta or Hugging Face checkpoint directory, or a Hub repo id (``owner/name[@rev]``), or
    an already loaded ``Pipeline`` whose base weights the new one shares (no second copy in memory;
    its device, dtype, context length and quantization carry over).
    ``adapter``: an adapter file, an official release name, a Hub repo id or file, or an
    ``AdapterConfig`` for a fresh (zero-gated) adapter to train.
    ``quantize="int8"``: weight-only int8 for the transformer's matrices (serving only).
    ``compile=True``: decode with a ``torch.compile``d static-shape step (CUDA graphs on GPU);
    the first request pays the compilation.
    ``clip``: for multimodal adapters, where CLIP comes from (see ``ClipSpec``).  By default it
    is the CLIP the adapter names (``ViT-L-14`` / ``openai`` for the official V2 models), fetched
    by open_clip into the Hugging Face cache; CLIP weights are never stored in adapter files.
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")
    shared = base if isinstance(base, Pipeline) else None
    if shared is not None:
        _check_shared(shared, device, dtype, max_seq_len, quantize)
        device, dtype, tokenizer, args = shared.device, shared.dtype, shared.tokenizer, shared.model.args
    else:
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

    visual: VisualEncoder | None = None
    if adapter_cfg is not None and adapter_cfg.visual is not None:
        visual = build_visual(adapter_cfg.visual, adapter_cfg.adapter_len, args.dim, clip, fresh=adapter_file is None)
    elif clip is not None:
        raise ValueError("clip= is only for multimodal adapters, and this adapter has no visual part")

    with torch.device("meta"):
        model = Transformer(args, adapter_cfg)
    expected = shapes(model.state_dict().items())
    base_names = model.base_parameter_names()

    if shared is not None:
        swap_to_int8(model, [n for n, m in shared.model.named_modules() if isinstance(m, Int8Linear)], dtype)
        own = shared.model.state_dict()
        state = {k: own[k] for k in model.base_parameter_names()}  # the very same tensors
    else:
        # To quantize, read lazily on the CPU in the file's dtype and convert matrix by matrix,
        # so the full-precision model never sits on the device.
        cpu = torch.device("cpu")
        state = read_base_state(base_dir, args, None if quantize else dtype, cpu if quantize else device)
        check_state({k: expected[k] for k in base_names}, state, f"base checkpoint {base_dir}")
        if quantize:
            names = quantized_linear_names(model)
            state = quantize_state(state.items(), names, dtype, device)
            swap_to_int8(model, names, dtype)
    visual_state: dict[str, Tensor] = {}
    if adapter_file is not None:
        adapter_state = fit_adapter(adapter_file, args, adapter_source or "")
        check_adapter_state(adapter_state, model, visual, adapter_source or "")
        for k, v in adapter_state.items():
            if k in expected:
                state[k] = v.to(device=device, dtype=adapter_dtype(k, dtype))
            else:
                visual_state[k] = v.to(device=device, dtype=dtype)
    elif adapter_cfg is not None:
        state.update(fresh_adapter_state(model, device, dtype, skip=base_names))

    model.load_state_dict(state, assign=True)
    model.init_rope(device)
    model.eval().requires_grad_(False)
    if visual is not None:
        if adapter_file is not None:
            clip_state = {f"clip.{k}": v for k, v in visual.clip.state_dict().items()}
            visual.load_state_dict(clip_state | visual_state, assign=True)
        visual.to(device=device, dtype=dtype).eval().requires_grad_(False)
    label = str(adapter) if adapter is not None and not isinstance(adapter, AdapterConfig) else None
    base_label = shared.base if shared is not None else str(base)
    slot = shared.cache_slot if shared is not None else None
    return Pipeline(model, tokenizer, base=base_label, adapter=label, visual=visual, compile=compile, cache_slot=slot)


def _check_shared(
    shared: Pipeline, device: str | torch.device | None, dtype: str | torch.dtype | None, max_seq_len: int | None, quantize: str | None
) -> None:
    """A shared base comes as it was loaded; asking for it otherwise is a mistake worth saying."""
    if device is not None and torch.device(device).type != shared.device.type:
        raise ValueError(f"the shared base is on {shared.device}; it cannot be moved to {device} (load the base again instead)")
    if dtype is not None and parse_dtype(dtype) != shared.dtype:
        raise ValueError(f"the shared base is {shared.dtype}; it cannot be converted to {dtype} (load the base again instead)")
    if max_seq_len is not None or quantize is not None:
        raise ValueError("a shared base keeps its max_seq_len and quantization; pass neither")


def check_adapter_state(tensors: dict[str, Tensor], model: Transformer, visual: VisualEncoder | None, source: str) -> None:
    """Every key in an adapter file must belong to the model; every adapter parameter must be there.

    Only two kinds of keys may be absent: base weights (the base checkpoint has them) and CLIP's
    (open_clip has them).  A file may still carry either, e.g. tuned norms or a CLIP copy.
    """
    expected = shapes(model.state_dict().items())
    required = set(model.adapter_parameters())
    if visual is not None:
        expected |= shapes(visual.state_dict().items())
        required |= set(visual.adapter_parameters())
    check_state(expected, tensors, source, optional=set(expected) - required)
