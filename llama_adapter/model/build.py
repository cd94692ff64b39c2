"""Assemble a Transformer from tensors without a second copy: built on the meta device, filled by assignment.

Loading (``load``, ``Pipeline.with_adapter``), the tiny model and the benchmarks all build models here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..config import AdapterConfig, ModelConfig
from ..roles import is_adapter, serving_dtype
from .llama import Transformer
from .quantize import Int8Linear, quantize_weight, swap_to_int8

# With tie_word_embeddings the head's weight is the embedding's.
TIED_EMBEDDING, TIED_HEAD = "tok_embeddings.weight", "output.weight"


def meta_model(args: ModelConfig, adapter_config: AdapterConfig | None, dtype: torch.dtype, int8: Sequence[str] = ()) -> Transformer:
    """An empty Transformer on the meta device; the Linear modules named in ``int8`` are weight-only int8."""
    with torch.device("meta"):
        model = Transformer(args, adapter_config)
    swap_to_int8(model, list(int8), dtype)
    return model


def fill(model: Transformer, tensors: Iterable[tuple[str, Tensor]], *, dtype: torch.dtype, device: torch.device) -> Transformer:
    """Assign ``tensors`` (name, tensor pairs, consumed one at a time) to a meta ``model``; returns it frozen, in eval mode.

    Base tensors take ``dtype`` (integer ones stay as they are), adapter tensors their serving dtypes
    (``roles``).  Full-precision weights of int8 modules are quantized here, one at a time, so that a
    lazy source never holds the full-precision model on the device.  Adapter parameters that
    ``tensors`` lacks start fresh (``Transformer.reset_adapter_parameters``).

    Tied embeddings (``tie_word_embeddings``) are handled here, in one place: a full-precision
    ``output.weight`` in ``tensors`` is ignored and the head is the embedding matrix itself (one
    tensor), or, when the head is quantized, the int8 quantization of that matrix (an int8 head
    that ``tensors`` already holds, from a loaded model, is used as it is).
    """
    to_quantize = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    cfg = model.adapter_config
    tuned_norms = cfg is not None and cfg.norm
    base_biases = model.args.has_base_biases
    tied = model.args.tie_word_embeddings
    state: dict[str, Tensor] = {}
    for name, t in tensors:
        # A stored head is not used (the embedding is), unless it is the int8 head of an already loaded model.
        if tied and name == TIED_HEAD and not (name in to_quantize and t.dtype == torch.int8):
            continue
        if name in to_quantize and t.dtype != torch.int8:
            state[name], state[name.removesuffix("weight") + "scale"] = quantize_weight(t.to(device), dtype)
        elif is_adapter(name, tuned_norms, base_biases):
            state[name] = t.to(device=device, dtype=serving_dtype(name, dtype))
        else:
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if tied and TIED_HEAD not in to_quantize:
        state[TIED_HEAD] = state[TIED_EMBEDDING]
    elif tied and TIED_HEAD not in state:
        state[TIED_HEAD], state["output.scale"] = quantize_weight(state[TIED_EMBEDDING], dtype)
    fresh = {n: p for n, p in model.adapter_parameters().items() if n not in state}
    for name, p in fresh.items():
        state[name] = torch.empty(p.shape, dtype=serving_dtype(name, dtype), device=device)
    model.load_state_dict(state, assign=True)
    if tied and TIED_HEAD not in to_quantize:  # assign=True set two Parameters around one tensor: make them one again
        model.output.weight = model.tok_embeddings.weight
    model.reset_adapter_parameters(only=fresh.keys())
    model.init_rope(device)
    return model.eval().requires_grad_(False)


def build_model(
    args: ModelConfig,
    adapter_config: AdapterConfig | None,
    tensors: Iterable[tuple[str, Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device,
    int8: Sequence[str] = (),
) -> Transformer:
    """``meta_model`` filled with ``tensors``: the one way a model is assembled from weights."""
    return fill(meta_model(args, adapter_config, dtype, int8), tensors, dtype=dtype, device=device)
