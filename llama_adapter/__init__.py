"""LLaMA-Adapter: a frozen LLaMA with zero-init attention adapters (and images through CLIP), streaming generation."""

from .checkpoint import CheckpointError, read_adapter, save_adapter
from .config import AdapterConfig, ModelArgs, VisualConfig
from .generation import Pipeline, PromptTruncatedWarning, TextStream, sample
from .hub import ResolveError
from .images import ImageError, check_image_file
from .loading import load
from .model import Transformer
from .prompts import caption_prompt, format_prompt
from .tokenizer import Tokenizer
from .visual import ClipSpec

__all__ = [
    "AdapterConfig",
    "CheckpointError",
    "ClipSpec",
    "ImageError",
    "ModelArgs",
    "Pipeline",
    "PromptTruncatedWarning",
    "ResolveError",
    "TextStream",
    "Tokenizer",
    "Transformer",
    "VisualConfig",
    "caption_prompt",
    "check_image_file",
    "format_prompt",
    "load",
    "read_adapter",
    "sample",
    "save_adapter",
]
