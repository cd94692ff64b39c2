"""Build a ready pipeline from what the user names: a base model directory or repo, then optionally an adapter."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.build import TIED_HEAD, build_model, meta_model
from ..model.probe import probe_kernels
from ..model.quantize import check_int4_shapes, quantized_linear_names, release_free_memory, weight_format
from ..model.visual import ClipSpec
from ..options import check_quantize, default_dtype, parse_device, parse_dtype
from ..threads import in_passing_thread
from ..weights import hub
from ..weights.adapter import AdapterShape
from ..weights.base import open_tokenizer, read_base_state, read_model_config
from ..weights.state import check_state, shapes
from .adapters import AdapterSource
from .formats import available_memory, choose_format
from .pipeline import Pipeline

# The one line per load that says which weight format and kernels were chosen and why.
log = logging.getLogger("llama_adapter.load")
if not log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("llama_adapter: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@in_passing_thread
def load_base(
    base: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
) -> Pipeline:
    """Load a LLaMA base model (no adapter): a Meta or Hugging Face checkpoint directory, or a Hub repo id.

    Add adapters with ``Pipeline.with_adapter``; every pipeline made that way shares these weights.
    ``quantize="int8"`` / ``"int4"``: weight-only int8 / int4 for the transformer's matrices (serving only).
    On CPU with neither ``dtype`` nor ``quantize`` given, the format is chosen from the memory
    available (``formats.choose_format``: fp32, bf16, int8 or int4), and a quantized model
    defaults to bf16; the choice, and the CPU kernels measured for it, are logged in one line each.
    ``compile=True``: decode with a ``torch.compile``d static-shape step (CUDA graphs on GPU);
    the first request pays the compilation.
    """
    check_quantize(quantize)
    device = parse_device(device)
    base_dir = hub.resolve_base(base)
    tokenizer = open_tokenizer(base_dir)
    args = read_model_config(base_dir, tokenizer.n_words, max_seq_len)
    if tokenizer.n_words > args.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path} has {tokenizer.n_words} tokens but the model in {base_dir} has only {args.vocab_size} embeddings "
            "(vocab_size): this tokenizer does not belong to this model; put the model's own tokenizer beside its weights"
        )
    if dtype is not None:
        dtype, why = parse_dtype(dtype), "as asked"
    elif device.type == "cpu" and quantize is None:
        try:
            fmt = choose_format(args, *available_memory())
            dtype, quantize, why = fmt.dtype, fmt.quantize, fmt.reason
        except RuntimeError as e:  # no /proc/meminfo (macOS, Windows): the old default
            dtype, why = default_dtype(device), str(e)
    elif device.type == "cpu":
        dtype, why = torch.bfloat16, "as asked; bf16 activations, which the CPU weight-only kernels are fast in"
    else:
        dtype, why = default_dtype(device), "as asked" if quantize else "the device's default"
    skeleton = meta_model(args, None, dtype)
    names = quantized_linear_names(skeleton) if quantize else []
    if quantize == "int4":
        check_int4_shapes(skeleton, names)
    if device.type == "cpu":
        probe_kernels(args, dtype, quantize)
        release_free_memory()  # the probe's timing copies: not under the model that is loaded next
    # To quantize, read lazily on the CPU in the file's dtype and convert matrix by matrix,
    # so the full-precision model never sits on the device.
    cpu = torch.device("cpu")
    state = read_base_state(base_dir, args, None if quantize else dtype, cpu if quantize else device)
    tied = {TIED_HEAD} if args.tie_word_embeddings else set()  # the head is the embedding: not read
    check_state(shapes(skeleton.state_dict().items()), state, f"base checkpoint {base_dir}", optional=tied)
    int8, int4 = (names, []) if quantize == "int8" else ([], names)
    model = build_model(args, None, state.items(), dtype=dtype, device=device, int8=int8, int4=int4)
    release_free_memory()
    log.info("weights: %s (%s)", weight_format(model), why)
    return Pipeline(model, tokenizer, base=str(base), compile=compile)


@in_passing_thread
def load(
    base: str | Path | Pipeline,
    adapter: AdapterSource | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
    clip: ClipSpec | None = None,
    adapter_shape: AdapterShape | None = None,
) -> Pipeline:
    """Load a LLaMA base model and (optionally) an adapter, ready to stream: ``load_base`` then ``with_adapter``.

    ``base``: a Meta or Hugging Face checkpoint directory, or a Hub repo id (``owner/name[@rev]``).
    ``adapter``: an adapter file, an official release name, a Hub repo id or file, or an
    ``AdapterConfig`` for a fresh (zero-gated) adapter to train.
    ``clip``: for multimodal adapters, where CLIP comes from (see ``ClipSpec``).  By default it
    is the CLIP the adapter names (``ViT-L-14`` / ``openai`` for the official V2 models), fetched
    by open_clip into the Hugging Face cache; CLIP weights are never stored in adapter files.
    ``adapter_shape``: (adapter_len, adapter_layer) of an official V1 file, which does not record
    it; without it the shape comes from a ``lenX_layerY`` file name, the non-zero gates, or the
    official length 10, and otherwise the file is refused with a message.
    The other options are ``load_base``'s.

    Passing an already loaded ``Pipeline`` as ``base`` is the older spelling of
    ``base.with_adapter(adapter)`` (kept for one release).
    """
    if isinstance(base, Pipeline):
        warnings.warn("load(pipeline, adapter) is deprecated: use pipeline.with_adapter(adapter)", DeprecationWarning, stacklevel=2)
        _check_shared(base, device, dtype, max_seq_len, quantize)
        return base.with_adapter(adapter, clip=clip, adapter_shape=adapter_shape)
    pipe = load_base(base, device=device, dtype=dtype, max_seq_len=max_seq_len, quantize=quantize, compile=compile)
    if adapter is None:
        if clip is not None or adapter_shape is not None:
            raise ValueError("clip= and adapter_shape= are for adapters, and no adapter was given")
        return pipe
    return pipe.with_adapter(adapter, clip=clip, adapter_shape=adapter_shape)


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
