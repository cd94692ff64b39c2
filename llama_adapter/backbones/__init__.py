"""Zero-init attention beyond LLaMA: gated adaption prompts in timm Vision Transformers and transformers RoBERTa.

``python -m llama_adapter.backbones.classify`` fine-tunes a ViT on an image folder or CSV (top-1 accuracy);
``python -m llama_adapter.backbones.squad`` fine-tunes RoBERTa on SQuAD v1.1 / v2.0 (exact match and F1).
"""

from .adapter_file import AdapterInfo, read_backbone_adapter, save_backbone_adapter
from .attention import ZeroInitPrompt, adapter_parameters, adapters
from .errors import BackboneError, DataError
from .roberta import add_roberta_adapters
from .vit import add_vit_adapters

__all__ = [
    "AdapterInfo",
    "BackboneError",
    "DataError",
    "ZeroInitPrompt",
    "adapter_parameters",
    "adapters",
    "add_roberta_adapters",
    "add_vit_adapters",
    "read_backbone_adapter",
    "save_backbone_adapter",
]
