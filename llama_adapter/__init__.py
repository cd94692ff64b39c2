"""LLaMA-Adapter: a frozen LLaMA with zero-init attention adapters, streaming generation."""

from .checkpoint import CheckpointError, read_adapter, save_adapter
from .config import AdapterConfig, ModelArgs
from .generation import Pipeline, PromptTruncatedWarning, TextStream, sample
from .hub import ResolveError
from .loading import load
from .model import Transformer
from .prompts import format_prompt
from .tokenizer import Tokenizer

__all__ = [
    "AdapterConfig",
    "CheckpointError",
    "ModelArgs",
    "Pipeline",
    "PromptTruncatedWarning",
    "ResolveError",
    "TextStream",
    "Tokenizer",
    "Transformer",
    "format_prompt",
    "load",
    "read_adapter",
    "sample",
    "save_adapter",
]
