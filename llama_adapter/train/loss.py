"""The training objective: NLL of response tokens, accumulated over an optimizer step and across processes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..model.llama import Transformer
from .data import IGNORE_INDEX, Example, collate, shard
from .distributed import Dist, sum_across_ranks
from .visual import ImageFeeder


def summed_nll(
    model: Transformer,
    examples: Sequence[Example],
    pad_id: int,
    device: torch.device,
    recompute: bool,
    visual_prompt: Tensor | None = None,
) -> Tensor:
    """Sum of the negative log-likelihoods of the response tokens (and EOS) of a batch."""
    inputs, targets = collate(examples, pad_id)
    inputs, targets = inputs.to(device), targets.to(device)
    hidden = model.training_hidden(inputs, visual_prompt=visual_prompt, checkpoint=recompute)
    keep = targets != IGNORE_INDEX
    # The vocabulary projection only runs where there is a target: prompts cost no logits.
    logits = model.output(hidden[keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum")


@dataclass
class Run:
    """What the training step needs besides the data: the model, what it trains, how images come in."""

    model: Transformer
    params: dict[str, torch.nn.Parameter]  # the trained ones
    images: ImageFeeder | None
    # Mixed precision for multimodal runs on a bf16/fp16 base: fp32 trained tensors meet half-precision ones.
    autocast_dtype: torch.dtype | None

    def precision(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def accumulate(
    run: Run,
    examples: Sequence[Example],
    group: Sequence[Sequence[int]],
    pad_id: int,
    scaler: torch.amp.GradScaler,
    world: Dist,
    recompute: bool,
    epoch: int,
) -> tuple[float, int]:
    """Backward over one optimizer step's global micro-batches (this process's shards); grads summed over processes.

    The loss is normalised by the response tokens of the whole step, across micro-batches
    and processes, so every split into processes and accumulation steps gives the same update.
    Returns the step's NLL sum and target count over all processes.
    """
    n_targets = sum(examples[i].n_targets for batch in group for i in batch)
    loss_sum = torch.zeros(1, dtype=torch.float32, device=world.device)
    for batch in group:
        indices = shard(batch, world.rank, world.world_size)
        mine = [examples[i] for i in indices]
        if mine:
            with run.precision(world.device):
                visual = run.images.train_prompts(mine, indices, epoch) if run.images else None
                loss = summed_nll(run.model, mine, pad_id, world.device, recompute, visual)
            scaler.scale(loss / n_targets).backward()
            loss_sum += loss.detach()
    return sum_across_ranks(list(run.params.values()), loss_sum, world).item(), n_targets


@torch.no_grad()
def evaluate(run: Run, examples: Sequence[Example], batch_size: int, pad_id: int, world: Dist) -> float:
    """Mean NLL per response token over ``examples``, split across processes."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].input_len)
    mine = shard(order, world.rank, world.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    for start in range(0, len(mine), batch_size):
        batch = [examples[i] for i in mine[start : start + batch_size]]
        with run.precision(world.device):
            visual = run.images.eval_prompts(batch) if run.images else None
            total[0] += summed_nll(run.model, batch, pad_id, world.device, False, visual).double()
        total[1] += sum(e.n_targets for e in batch)
    if world.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()
