"""What a run leaves on disk to continue from: the training checkpoint and metrics.jsonl."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import TrainError
from ..weights.files import durable_replace, torch_load

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
        "rng": rng_state(),
        "position": asdict(position),
        "trajectory": trajectory,
    }
    write_checkpoint(path, state)


def rng_state() -> dict[str, Tensor]:
    """The generators a resumed run must continue from."""
    return {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})


def write_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint (tensors and plain containers) atomically and durably: a crash or a power loss
    leaves the previous checkpoint or this one, never a partial or empty file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    durable_replace(tmp, path)


def load_checkpoint(path: Path, trajectory: dict) -> dict:
    state = torch_load(path)  # a truncated or foreign file: CheckpointError naming it
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


class OutputLock:
    """An exclusive lock on an output directory (``DIR/.lock``), held while a run writes there.

    ``flock`` locks belong to the open file: they go away when the process ends, however it ends,
    so a crashed run never leaves a stale lock behind.
    """

    NAME = ".lock"

    def __init__(self, directory: Path) -> None:
        self.path = directory / self.NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TrainError(
                f"another training run (pid {holder}) is writing to {self.path.parent}: wait for it to end, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
