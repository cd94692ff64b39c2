"""What a run leaves on disk to continue from: the training checkpoint and metrics.jsonl."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import TrainError

CHECKPOINT_FORMAT = "llama-adapter-train-1"


@dataclass
class Position:
    """Where training stands: next epoch, next micro-batch in it, optimizer steps done, metrics lines written."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    metrics_lines: int = 0


def save_checkpoint(path: Path, adapter: dict[str, Tensor], optimizer, scheduler, scaler, position: Position, trajectory: dict) -> None:
    """Atomically write everything needed to continue exactly: tensors and plain containers only.

    ``adapter`` is every adapter tensor, trained or not (``Pipeline.adapter_tensors``).
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "adapter": {n: p.detach().cpu() for n, p in adapter.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        # Training itself draws no random numbers (no dropout; batches come from seeded
        # generators), so every process has the same state; it is kept for exact resumption.
        "rng": {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        "position": asdict(position),
        "trajectory": trajectory,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, trajectory: dict) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a training checkpoint of this version")
    before = state["trajectory"]
    changed = [f"{k}: {before.get(k)!r} -> {trajectory[k]!r}" for k in trajectory if before.get(k) != trajectory[k]]
    if changed:
        raise TrainError(
            f"{path} was written with different training arguments ({'; '.join(changed)}); "
            "resume with the original ones, or start a new run in another --out directory"
        )
    return state


def restore(state: dict, adapter: dict[str, Tensor], optimizer, scheduler, scaler) -> Position:
    with torch.no_grad():
        for name, p in adapter.items():
            p.copy_(state["adapter"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return Position(**state["position"])


class Metrics:
    """``metrics.jsonl``, one JSON object per line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, keep_lines: int) -> None:
        self.path, self.enabled, self.lines = path, enabled, keep_lines
        if enabled:
            old = path.read_text().splitlines(keepends=True)[:keep_lines] if path.is_file() else []
            path.write_text("".join(old))

    def write(self, **record: object) -> None:
        self.lines += 1
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
