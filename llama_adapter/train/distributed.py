"""Processes: one, or several under torchrun, with the adapter's gradients summed by hand."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..options import parse_device


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> Dist:
    """One process, or one of torchrun's: nccl between GPUs, gloo between CPU processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    target = parse_device(device or None)
    if world_size == 1:
        return Dist(0, 1, target)
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world_size, target)


def sum_across_ranks(params: Sequence[torch.nn.Parameter], scalars: Tensor, world: Dist) -> Tensor:
    """Sum the adapter's gradients and some scalars over all processes, in one collective.

    Data parallelism is done by hand rather than by wrapping the model in DDP: DDP would
    broadcast every frozen base weight at start-up and reduce in buckets during each backward
    (or need no_sync for accumulation).  The adapter is ~5 MB, so one all-reduce per
    optimizer step, after accumulation, is all the communication needed.
    """
    if world.world_size == 1:
        return scalars
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [scalars.to(grads[0].dtype)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return flat[offset:]
