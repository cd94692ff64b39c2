"""Tiny random backbones saved the way the real ones load (timm ``local-dir:``, a transformers directory),
for the tests and the benchmark: no downloads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


def tiny_vit(seed: int = 0, num_classes: int = 0, img_size: int = 32, **overrides: object) -> nn.Module:
    """A random timm ViT (``vit_tiny_patch16_224``'s architecture, shrunk): 32 px, 8 px patches, width 32, 4 blocks."""
    import timm

    args: dict[str, object] = dict(img_size=img_size, patch_size=8, embed_dim=32, depth=4, num_heads=4) | overrides
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **args)
    return model.eval()


def save_tiny_vit(out: str | Path, seed: int = 0, **overrides: object) -> str:
    """Write a tiny ViT as timm's local folder (config.json with its preprocessing, model.safetensors); returns its
    ``local-dir:`` name for ``timm.create_model``."""
    from timm.models import save_for_hf

    model = tiny_vit(seed, **overrides)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4) | overrides
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)
    return f"local-dir:{out}"


SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def tiny_roberta(vocab_size: int, seed: int = 0, **overrides: object) -> nn.Module:
    """A random ``RobertaForQuestionAnswering``: width 32, 3 layers, 4 heads."""
    from transformers import RobertaConfig, RobertaForQuestionAnswering

    cfg: dict[str, object] = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=260, type_vocab_size=1, pad_token_id=1,
                                  bos_token_id=0, eos_token_id=2) | overrides  # fmt: skip
    torch.manual_seed(seed)
    return RobertaForQuestionAnswering(RobertaConfig(**cfg)).eval()


def tiny_roberta_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A byte-level BPE trained on ``texts``, with RoBERTa's special tokens and pair template, as a fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    names = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, **names)


def save_tiny_roberta(out: str | Path, texts: Iterable[str], seed: int = 0, **overrides: object) -> Path:
    """A tiny RoBERTa QA model and its tokenizer in one directory, loadable with ``from_pretrained``."""
    out = Path(out)
    tokenizer = tiny_roberta_tokenizer(texts)
    tokenizer.save_pretrained(out)
    tiny_roberta(len(tokenizer), seed, **overrides).save_pretrained(out)
    return out
