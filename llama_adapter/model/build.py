"""Assemble a Transformer from tensors without a second copy: built on the meta device, filled by assignment.

Loading (``load``, ``Pipeline.with_adapter``), the tiny model and the benchmarks all build models here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..config import AdapterConfig, ModelConfig
from ..roles import is_adapter, serving_dtype
from . import kernels
from .llama import Transformer
from .quantize import (
    Int4Linear,
    Int8Linear,
    int4_layout,
    int4_tensors,
    on_huge_pages,
    quantize_weight,
    release_free_memory,
    swap_to_quantized,
)

# With tie_word_embeddings the head's weight is the embedding's.
TIED_EMBEDDING, TIED_HEAD = "tok_embeddings.weight", "output.weight"


def meta_model(
    args: ModelConfig, adapter_config: AdapterConfig | None, dtype: torch.dtype, int8: Sequence[str] = (), int4: Sequence[str] = ()
) -> Transformer:
    """An empty Transformer on the meta device; the Linear modules named in ``int8`` / ``int4`` are weight-only int8 / int4."""
    with torch.device("meta"):
        model = Transformer(args, adapter_config)
    swap_to_quantized(model, list(int8), dtype, "int8")
    swap_to_quantized(model, list(int4), dtype, "int4")
    return model


def _quantize_int4(weight: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Packed int4 weight and scales for ``device``: on CPU, in the layout (and dtype) of the kernel the plan chose."""
    layout = int4_layout(device, weight.shape, kernels.PLAN.ours["int4"])
    return int4_tensors(weight.to(device), layout, kernels.PLAN.kernel_dtype["int4"] if layout == "torch" else dtype)


def fill(model: Transformer, tensors: Iterable[tuple[str, Tensor]], *, dtype: torch.dtype, device: torch.device) -> Transformer:
    """Assign ``tensors`` (name, tensor pairs, consumed one at a time) to a meta ``model``; returns it frozen, in eval mode.

    Base tensors take ``dtype`` (integer ones stay as they are), adapter tensors their serving dtypes
    (``roles``).  Full-precision weights of int8 and int4 modules are quantized here, one at a time,
    so that a lazy source never holds the full-precision model on the device; already quantized
    tensors (another model's, for an adapter on a shared base) are taken as they are.  Adapter
    parameters that ``tensors`` lacks start fresh (``Transformer.reset_adapter_parameters``).

    Tied embeddings (``tie_word_embeddings``) are handled here, in one place: a full-precision
    ``output.weight`` in ``tensors`` is ignored and the head is the embedding matrix itself (one
    tensor), or, when the head is quantized, the quantization of that matrix (a quantized head that
    ``tensors`` already holds, from a loaded model, is used as it is).
    """
    modules = dict(model.named_modules())
    int8 = {f"{n}.weight" for n, m in modules.items() if isinstance(m, Int8Linear)}
    int4 = {f"{n}.weight" for n, m in modules.items() if isinstance(m, Int4Linear)}
    int4_scales = {f"{n}.scales_and_zeros" for n, m in modules.items() if isinstance(m, Int4Linear)}
    cfg = model.adapter_config
    tuned_norms = cfg is not None and cfg.norm
    base_biases = model.args.has_base_biases
    tied = model.args.tie_word_embeddings
    quantized_head = TIED_HEAD in int8 or TIED_HEAD in int4
    state: dict[str, Tensor] = {}
    for name, t in tensors:
        # A stored head is not used (the embedding is), unless it is the quantized head of an already loaded model.
        if tied and name == TIED_HEAD and not (quantized_head and t.dtype in (torch.int8, torch.uint8)):
            continue
        if name in int8 and t.dtype != torch.int8:
            q, state[name.removesuffix("weight") + "scale"] = quantize_weight(t.to(device), dtype)
            state[name] = on_huge_pages(q)
            del q
            release_free_memory()  # the quantizer's temporaries, before the next matrix's pile onto them
        elif name in int4 and t.dtype != torch.uint8:
            state[name], state[name.removesuffix("weight") + "scales_and_zeros"] = _quantize_int4(t, dtype, device)
            release_free_memory()
        elif name in int4_scales or name in int4:
            state[name] = t.to(device)
        elif is_adapter(name, tuned_norms, base_biases):
            state[name] = t.to(device=device, dtype=serving_dtype(name, dtype))
        else:
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if tied and not quantized_head:
        state[TIED_HEAD] = state[TIED_EMBEDDING]
    elif tied and TIED_HEAD not in state and TIED_HEAD in int8:
        state[TIED_HEAD], state["output.scale"] = quantize_weight(state[TIED_EMBEDDING], dtype)
    elif tied and TIED_HEAD not in state:
        state[TIED_HEAD], state["output.scales_and_zeros"] = _quantize_int4(state[TIED_EMBEDDING], dtype, device)
    for name in int4_scales & state.keys():  # int4 tensors come in their layout's shapes (``Int4Linear``)
        module = modules[name.removesuffix(".scales_and_zeros")]
        module.scales_and_zeros = torch.empty_like(state[name], device="meta")
        module.weight = torch.empty_like(state[name.removesuffix("scales_and_zeros") + "weight"], device="meta")
    fresh = {n: p for n, p in model.adapter_parameters().items() if n not in state}
    for name, p in fresh.items():
        state[name] = torch.empty(p.shape, dtype=serving_dtype(name, dtype), device=device)
    model.load_state_dict(state, assign=True)
    if tied and not quantized_head:  # assign=True set two Parameters around one tensor: make them one again
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
    int4: Sequence[str] = (),
) -> Transformer:
    """``meta_model`` filled with ``tensors``: the one way a model is assembled from weights."""
    return fill(meta_model(args, adapter_config, dtype, int8, int4), tensors, dtype=dtype, device=device)
