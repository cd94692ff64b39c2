"""The fine-tuning loop both backbone commands share.

Data parallel by hand, as the LLaMA trainer: each process takes every world_size-th item of each global
batch, and only the trainable tensors' gradients are summed, in one all-reduce per optimizer step.  The loss
is normalised over the whole step's items, so N processes x accumulation give the same update as one.
AdamW (no decay on gates and vectors), linear warmup then half-cosine, a tqdm bar, ``metrics.jsonl``,
atomic checkpoints with the data position and RNG states, so that ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from llama_adapter.train import Dist, Metrics, Position, TrainError, lr_factor, make_optimizer, sum_across_ranks
from llama_adapter.train.state import rng_state, write_checkpoint
from llama_adapter.weights.files import torch_load

CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = "llama-adapter-backbone-train-1"


class Task(Protocol):
    """What the loop needs from a task: its model, trainable tensors and data."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    n_train: int
    unit: str  # what one training item is, for the throughput figure ("images", "features")

    def micro_batches(self, index_lists: Sequence[Sequence[int]]) -> Iterator[object | None]:
        """One loaded batch per list (None for an empty list), in order."""
        ...

    def loss(self, batch: object) -> Tensor:
        """The summed (not mean) loss of one loaded micro-batch."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over all processes."""
        ...

    def save(self, path: Path, training_args: dict) -> Path: ...


def add_training_args(p: argparse.ArgumentParser, defaults: dict[str, object]) -> None:
    """The flags of the recipe, shared by both commands; ``defaults`` gives the task's."""
    p.add_argument("--out", required=True, help="output directory: adapter.safetensors, checkpoint.pt, metrics.jsonl")
    p.add_argument("--epochs", type=int, default=defaults["epochs"], help="passes over the training data (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=defaults["batch_size"], help="items per process per micro-batch (default: %(default)s)"
    )
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, help="peak learning rate (default: blr * effective batch / 256)")
    lr.add_argument(
        "--blr", type=float, default=defaults["blr"], help="base learning rate for an effective batch of 256 (default: %(default)s)"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=defaults["weight_decay"],
        help="AdamW decay on prompts and head weights (default: %(default)s)",
    )
    p.add_argument("--warmup-epochs", type=float, default=defaults["warmup_epochs"], help="linear warmup, in epochs (default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
    p.add_argument(
        "--adapter-len", type=int, default=defaults["adapter_len"], help="prompt tokens per adapted layer (default: %(default)s)"
    )
    p.add_argument("--adapter-layer", type=int, help="number of top layers that get a prompt (default: all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available); torchrun gives each process its GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps (always at each epoch end)")
    p.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl line every N optimizer steps")
    p.add_argument("--stop-after", type=int, help="stop with a checkpoint after N optimizer steps in all; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def check_training_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "accum_steps", "adapter_len", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.adapter_layer is not None and args.adapter_layer < 1:
        p.error("--adapter-layer must be >= 1")
    if (args.lr is not None and not args.lr > 0) or not args.blr > 0:
        p.error("the learning rate must be > 0")
    if args.warmup_epochs < 0 or args.min_lr < 0 or args.weight_decay < 0 or args.save_every < 0:
        p.error("--warmup-epochs, --min-lr, --weight-decay and --save-every must be >= 0")
    if args.stop_after is not None and args.stop_after < 1:
        p.error("--stop-after must be >= 1")


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle of ``range(n)`` per epoch, cut into global batches (the last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i : i + global_batch] for i in range(0, n, global_batch)]


def autocast(device: torch.device):
    """bf16 autocast on GPUs that have it (the frozen backbone's matmuls); fp32 elsewhere."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def save_checkpoint(path: Path, params: dict[str, Tensor], optimizer, scheduler, position: Position, trajectory: dict) -> None:
    """Atomically write everything needed to continue exactly: tensors and plain containers only."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "params": {n: p.detach().cpu() for n, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        # Dropout in the frozen backbone draws from these; the data order does not (seeded per epoch).
        "rng": rng_state(),
        "position": asdict(position),
        "trajectory": trajectory,
    }
    write_checkpoint(path, state)


def restore(path: Path, trajectory: dict, params: dict[str, nn.Parameter], optimizer, scheduler) -> Position:
    state = torch_load(path)  # a truncated or foreign file: CheckpointError naming it
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a checkpoint of this trainer; use another --out directory")
    before = state["trajectory"]
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in trajectory.items() if before.get(k) != v]
    if changed:
        raise TrainError(
            f"{path} was written with different training arguments ({'; '.join(changed)}); "
            "resume with the original ones, or start a new run in another --out directory"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return Position(**state["position"])


def peak_lr(args: argparse.Namespace, world: Dist) -> tuple[float, int]:
    effective = args.batch_size * world.world_size * args.accum_steps
    return (args.lr if args.lr is not None else args.blr * effective / 256), effective


def fit(task: Task, args: argparse.Namespace, world: Dist, trajectory: dict[str, object]) -> Path | None:
    """Train ``task`` as ``args`` say (resuming if asked); returns the adapter file, or None when stopped early."""
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    lr, effective = peak_lr(args, world)
    global_batch = args.batch_size * world.world_size
    n_batches = math.ceil(task.n_train / global_batch)
    steps_per_epoch = math.ceil(n_batches / args.accum_steps)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = args.warmup_epochs * steps_per_epoch
    params = task.params
    for p in params.values():
        p.requires_grad_(True)
    optimizer = make_optimizer(params, lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, args.min_lr / lr))
    trajectory = trajectory | {"global_batch": global_batch, "accum_steps": args.accum_steps, "lr": lr, "epochs": args.epochs,
                               "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs, "min_lr": args.min_lr,
                               "seed": args.seed, "adapter_len": args.adapter_len, "adapter_layer": args.adapter_layer}  # fmt: skip
    position = Position()
    if args.resume and ckpt_path.exists():
        position = restore(ckpt_path, trajectory, params, optimizer, scheduler)
    elif args.resume and world.main:
        print(f"note: no checkpoint in {out} yet; starting from the beginning")
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        how = "--lr" if args.lr is not None else f"blr {args.blr:g} x {effective} / 256"
        print(f"batch: {args.batch_size} per process x {world.world_size} processes x {args.accum_steps} accumulation = "
              f"{effective} effective; lr {lr:.4g} ({how}); {total_steps} steps")  # fmt: skip
        if position.step:
            print(f"resuming at step {position.step} of {total_steps} (epoch {position.epoch + 1}, batch {position.batch})")
    metrics = Metrics(out / METRICS, world.main, position.metrics_lines)
    saved_step: list[int] = [position.step] if ckpt_path.exists() else []

    def checkpoint() -> None:
        position.metrics_lines = metrics.lines
        if world.main:
            save_checkpoint(ckpt_path, params, optimizer, scheduler, position, trajectory)
        saved_step[:] = [position.step]

    def run_eval() -> None:
        task.model.eval()
        with torch.no_grad(), autocast(world.device):
            result = task.evaluate()
        metrics.write(step=position.step, epoch=position.epoch, **result)
        if world.main:
            tqdm.write(f"step {position.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    if position == Position():
        run_eval()  # the backbone's own score: zero gates change nothing
    window = torch.zeros(2, dtype=torch.float64)  # loss sum and items since the last metrics line
    window_start = time.perf_counter()
    with tqdm(total=total_steps, initial=position.step, disable=not world.main, unit="step", dynamic_ncols=True) as bar:
        while position.epoch < args.epochs:
            batches = epoch_batches(task.n_train, global_batch, args.seed, position.epoch)
            mine = task.micro_batches([b[world.rank :: world.world_size] for b in batches[position.batch :]])
            task.model.train()
            while position.batch < len(batches):
                group = batches[position.batch : position.batch + args.accum_steps]
                n_items = sum(len(b) for b in group)
                loss_sum = torch.zeros(1, device=world.device)
                for _ in group:
                    batch = next(mine)
                    if batch is not None:
                        with autocast(world.device):
                            loss = task.loss(batch)
                        (loss / n_items).backward()
                        loss_sum += loss.detach().float()
                step_loss = sum_across_ranks(list(params.values()), loss_sum, world).item() / n_items
                if not math.isfinite(step_loss):
                    kept = f"the last checkpoint, {ckpt_path} (step {saved_step[0]}), is kept" if saved_step else "no checkpoint exists"
                    raise TrainError(f"the loss is {step_loss} at step {position.step + 1}; training stopped without applying "
                                     f"that step, and {kept}. Try a lower --lr or --blr")  # fmt: skip
                step_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                position.batch += len(group)
                position.step += 1
                window += torch.tensor([step_loss * n_items, n_items], dtype=torch.float64)
                speed = window[1].item() / (time.perf_counter() - window_start)
                bar.update()
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{step_lr:.3g}", **{f"{task.unit}_s": f"{speed:.1f}"})
                if position.step % args.log_every == 0 or position.batch >= len(batches):
                    metrics.write(step=position.step, epoch=round(position.epoch + position.batch / len(batches), 4),
                                  loss=(window[0] / window[1]).item(), lr=step_lr, examples_per_s=round(speed, 2))  # fmt: skip
                    window.zero_()
                    window_start = time.perf_counter()
                if args.save_every and position.step % args.save_every == 0:
                    checkpoint()
                if args.stop_after is not None and position.step >= args.stop_after:
                    checkpoint()
                    if world.main:
                        tqdm.write(f"stopped after step {position.step} as asked; continue with --resume")
                    return None
            position.epoch, position.batch = position.epoch + 1, 0
            run_eval()
            checkpoint()
    if not world.main:
        return None
    training_args = vars(args) | {"lr": lr, "effective_batch": effective, "world_size": world.world_size}
    path = task.save(out / ADAPTER, training_args)
    print(f"wrote {path}")
    return path
