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
    names = dict(
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>"
    )
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, **names)


def save_tiny_roberta(out: str | Path, texts: Iterable[str], seed: int = 0, **overrides: object) -> Path:
    """A tiny RoBERTa QA model and its tokenizer in one directory, loadable with ``from_pretrained``."""
    out = Path(out)
    tokenizer = tiny_roberta_tokenizer(texts)
    tokenizer.save_pretrained(out)
    tiny_roberta(len(tokenizer), seed, **overrides).save_pretrained(out)
    return out


# ---------------------------------------------------------------- synthetic tasks

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def colour_images(root: str | Path, per_class: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """``root/<split>/<colour>/<i>.png``: noisy images of one colour per class, e.g. ``{"train": 8, "val": 4}``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in per_class.items():
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


FILLER = "the a of to in is it that was for on are as with his they at be this from have or one had by".split()
ANSWERS = "river stone cloud apple".split()
KEYWORD = "marker"
QUESTION = "Which word follows the marker?"


def keyword_squad(n: int, seed: int, version_2: bool = False, unanswerable: float = 0.3) -> dict:
    """A SQuAD-format file whose answer is the word after the keyword ``marker`` in a context of filler words;
    with ``version_2``, some contexts have no keyword and the question is unanswerable."""
    import random

    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 20))]
        qa: dict = {"id": f"q{seed}-{i}", "question": QUESTION}
        if version_2 and rng.random() < unanswerable:
            qa |= {"answers": [], "is_impossible": True}
        else:
            answer = rng.choice(ANSWERS)
            at = rng.randint(0, len(words))
            words[at:at] = [KEYWORD, answer]
            start = len(" ".join(words[: at + 1])) + 1
            qa["answers"] = [{"text": answer, "answer_start": start}]
            if version_2:
                qa["is_impossible"] = False
        paragraphs.append({"context": " ".join(words) + ".", "qas": [qa]})
    return {"version": "v2.0" if version_2 else "1.1", "data": [{"title": "keyword", "paragraphs": paragraphs}]}


def squad_texts() -> list[str]:
    """Text to train the tiny tokenizer on: every word the synthetic task uses."""
    return [" ".join(FILLER + ANSWERS + [KEYWORD, QUESTION])] * 20
