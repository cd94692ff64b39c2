"""State dicts against a model: every missing, unexpected and mis-shaped key named at once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError


def check_state(expected: Mapping[str, torch.Size], got: Mapping[str, Tensor], source: str, optional: Iterable[str] = ()) -> None:
    """Raise a CheckpointError naming every missing (unless ``optional``), unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(got) - set(optional))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys: {names(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {names(unexpected)}")
    for k in wrong[:20]:
        lines.append(f"  {k}: checkpoint has shape {list(got[k].shape)}, model expects {list(expected[k])}")
    if len(wrong) > 20:
        lines.append(f"  ... and {len(wrong) - 20} more keys with mismatched shapes")
    raise CheckpointError("\n".join(lines))


def names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def shapes(state: Iterable[tuple[str, Tensor]]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state}
