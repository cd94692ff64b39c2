"""Attaching an adapter to a loaded base: resolve the name, read the file, validate it in one step, assemble."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..config import AdapterConfig
from ..model.build import fill, meta_model
from ..model.llama import Transformer
from ..model.quantize import quantized_modes
from ..model.visual import ClipSpec, VisualEncoder, build_visual
from ..weights import hub
from ..weights.adapter import AdapterFile, AdapterShape, fit_adapter, read_adapter
from ..weights.peft import check_peft_base, is_peft_dir, read_peft_adapter
from ..weights.state import shapes

# What names an adapter: a file, an official release name, a Hub repo id or file, or a config for a fresh one.
AdapterSource = str | Path | AdapterConfig


def read_adapter_source(adapter: str | Path, shape: AdapterShape | None = None, n_layers: int | None = None) -> AdapterFile:
    """The adapter file that ``adapter`` names, downloaded (and cached) when it is a release name or repo id;
    a peft AdaptionPrompt directory (``adapter_config.json`` + ``adapter_model.safetensors``) too."""
    path = hub.resolve_adapter(adapter)
    return read_peft_adapter(path) if is_peft_dir(path) else read_adapter(path, shape=shape, n_layers=n_layers)


def attach_adapter(
    base: Transformer, adapter: AdapterSource | AdapterFile, clip: ClipSpec | None, shape: AdapterShape | None = None
) -> tuple[Transformer, VisualEncoder | None]:
    """A model with ``adapter`` on ``base``'s very tensors (no copy), plus its visual encoder for multimodal adapters.

    An ``AdapterConfig`` gives a fresh adapter (zero gates: the base model's outputs).  ``shape``
    is (adapter_len, adapter_layer) for files that do not record it (official V1).
    """
    file = adapter if isinstance(adapter, AdapterFile) else None
    if file is None and not isinstance(adapter, AdapterConfig):
        file = read_adapter_source(adapter, shape, base.args.n_layers)
    elif shape is not None:
        raise ValueError("adapter_shape is for adapter files that do not record their shape (official V1)")
    cfg = file.config if file is not None else adapter
    assert isinstance(cfg, AdapterConfig)
    args, dtype, device = base.args, base.tok_embeddings.weight.dtype, base.rope_cos.device
    if file is not None and file.metadata.get("format") == "peft":
        check_peft_base(args, f"peft adapter {file.path.parent}")
    visual: VisualEncoder | None = None
    if cfg.visual is not None:
        visual = build_visual(cfg.visual, cfg.adapter_len, args.dim, clip, fresh=file is None)
    elif clip is not None:
        raise ValueError("clip= is only for multimodal adapters, and this adapter has no visual part")

    quantized = quantized_modes(base)
    model = meta_model(args, cfg, dtype, quantized["int8"], quantized["int4"])
    own = base.state_dict()
    tensors = {k: own[k] for k in model.base_parameter_names()}  # the very same tensors
    visual_tensors: dict[str, Tensor] = {}
    if file is not None:
        expected = shapes(model.state_dict().items())
        required = set(model.adapter_parameters())
        if visual is not None:
            expected |= shapes(visual.state_dict().items())
            required |= set(visual.adapter_parameters())
        model_keys = set(model.state_dict())
        for name, t in fit_adapter(file, args, expected, required).items():
            # A file may also carry tuned norms (which replace the base's) and a copy of CLIP.
            (tensors if name in model_keys else visual_tensors)[name] = t
    fill(model, tensors.items(), dtype=dtype, device=device)
    if visual is not None:
        if file is not None:
            visual.load_state_dict(visual.clip_state() | visual_tensors, assign=True)
        visual.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, visual
