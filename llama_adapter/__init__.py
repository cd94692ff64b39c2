"""LLaMA-Adapter: a frozen LLaMA with zero-init attention adapters (and images through CLIP), streaming generation.

The package, by room: ``model`` (the networks), ``weights`` (files and names), ``inputs`` (tokenizer,
prompts, images), ``serve`` (loading and generation), ``train`` (the trainer), plus ``config``,
``roles`` (what each parameter is), ``options`` and ``errors`` at the bottom of the import graph.
"""

from .config import AdapterConfig, ModelArgs, ModelConfig, VisualConfig
from .errors import CheckpointError, DataError, ImageError, LlamaAdapterError, ResolveError, TrainError
from .inputs.images import check_image_file
from .inputs.prompts import caption_prompt, format_prompt
from .inputs.tokenizer import Tokenizer
from .model.llama import Transformer
from .model.visual import ClipSpec
from .serve.engine import sample
from .serve.loading import load, load_base
from .serve.pipeline import Pipeline, PromptTruncatedWarning, TextStream
from .serve.scheduler import CapacityError
from .weights.adapter import read_adapter, save_adapter

__all__ = [
    "AdapterConfig",
    "CapacityError",
    "CheckpointError",
    "ClipSpec",
    "DataError",
    "ImageError",
    "LlamaAdapterError",
    "ModelArgs",
    "ModelConfig",
    "Pipeline",
    "PromptTruncatedWarning",
    "ResolveError",
    "TextStream",
    "Tokenizer",
    "TrainError",
    "Transformer",
    "VisualConfig",
    "caption_prompt",
    "check_image_file",
    "format_prompt",
    "load",
    "load_base",
    "read_adapter",
    "sample",
    "save_adapter",
]
