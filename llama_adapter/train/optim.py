"""The optimizer and its schedule: AdamW with decay by parameter role, linear warmup then half-cycle cosine."""

from __future__ import annotations

import math

import torch

from ..roles import decays


def lr_factor(step: int, warmup_steps: float, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then half-cycle cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: dict[str, torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # As the official scripts, no decay on vectors (biases, norms); and none on the gates, which it would pull
    # back towards zero (the base model), where the official scripts decay the 4-D gates as well (``roles``).
    decay = [p for n, p in params.items() if decays(n, p)]
    no_decay = [p for n, p in params.items() if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
