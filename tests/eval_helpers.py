"""Helpers for the evaluation tests: a tiny multimodal adapter that loads by path alone, pictures, the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llama_adapter
from llama_adapter import AdapterConfig, VisualConfig, save_adapter
from llama_adapter.eval.__main__ import main

from .test_multimodal import write_clip_dir


def write_multimodal_adapter(out: Path, base: Path) -> Path:
    """A random image adapter on ``base`` whose metadata names a local tiny CLIP, so ``--adapter PATH`` is enough.

    Non-zero gates and a visual adapter dominated by the image tokens, so each picture gives its own text."""
    clip_dir = write_clip_dir(out / "clip")
    visual = VisualConfig(clip_model=f"local-dir:{clip_dir}", clip_pretrained=None, clip_dim=16, embed_dim=32, depth=1, num_heads=4)
    cfg = AdapterConfig(adapter_len=4, adapter_layer=2, visual=visual)
    torch.manual_seed(3)
    fresh = llama_adapter.load(base, cfg, device="cpu", dtype="fp32")
    with torch.no_grad():
        for name, p in fresh.adapter_tensors().items():
            if name.endswith(".gate"):
                p.normal_(0.0, 1.5)
            elif name == "visual_query.weight":  # small queries and large image tokens: the picture decides
                p.mul_(0.1)
            elif name.startswith(("clip_proj", "visual_blocks")) and name.endswith("weight") and p.dim() == 2:
                p.mul_(3.0)
    return save_adapter(out / "mm.safetensors", fresh.adapter_tensors(), cfg, fresh.model.args)


def picture(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3)  # a distinct colour each, so that each image gives its own text
    pixels = colour + rng.normal(0, 10, (60 + 7 * seed, 80, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def run_eval(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``python -m llama_adapter.eval ARGS`` in this process (loading a tiny model is fast, starting Python is not)."""
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files(out: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: (out / n).read_text() for n in names}
