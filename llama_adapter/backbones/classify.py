"""Fine-tune a frozen timm Vision Transformer for image classification with zero-init adaption prompts.

python -m llama_adapter.backbones.classify --model vit_base_patch16_224.augreg_in21k --data DIR --out RUN [options]
torchrun --nproc_per_node N -m llama_adapter.backbones.classify ...   (data parallel over N processes)

DIR holds train/<class>/*.jpg and val/<class>/*.jpg (VTAB-1k's layout after export); or give
--train and --val as CSV files of path,label.  Only the prompts, the gates and the new head train.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llama_adapter.commands import run_command
from llama_adapter.train import Dist, TrainError, init_distributed

from .adapter_file import AdapterInfo, load_into, read_backbone_adapter, save_backbone_adapter
from .attention import adapter_parameters, freeze_all_but
from .image_folder import ImageDataset, LabelledImage, checked, read_labelled_images
from .training import CHECKPOINT, add_training_args, check_training_args, fit
from .vit import add_vit_adapters, create_vit, eval_transform, head_parameters, vit_shape

DEFAULT_MODEL = "vit_base_patch16_224.augreg_in21k"
# Common VTAB-1k practice for prompt-style tuning of ViT-B/16 (the paper gives no recipe of its own):
# 100 epochs, 10 of warmup, AdamW at lr 1e-3 for a batch of 64.
DEFAULTS = {"epochs": 100, "batch_size": 64, "blr": 4e-3, "weight_decay": 1e-4, "warmup_epochs": 10, "adapter_len": 10}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.backbones.classify", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name, hf-hub:ORG/REPO or local-dir:/PATH (default: %(default)s)")
    p.add_argument("--data", help="folder with train/ and val/ class folders")
    p.add_argument("--train", help="training images: a folder of class folders, or a CSV of path,label")
    p.add_argument("--val", help="validation images: a folder of class folders, or a CSV of path,label")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes per training process (default: 0, in-process)")
    add_training_args(p, DEFAULTS)
    args = p.parse_args(argv)
    if (args.data is None) == (args.train is None and args.val is None):
        p.error("give either --data DIR (with train/ and val/) or both --train and --val")
    if args.data is None and (args.train is None or args.val is None):
        p.error("--train and --val go together")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    check_training_args(p, args)
    return args


class ImageTask:
    """Cross-entropy on labelled images; top-1 accuracy on the validation split."""

    unit = "images"

    def __init__(self, model: nn.Module, train: ImageDataset, val: ImageDataset, world: Dist, batch_size: int, workers: int) -> None:
        self.model, self.train_set, self.val_set, self.world = model, train, val, world
        self.batch_size, self.workers = batch_size, workers
        self.params = adapter_parameters(model) | head_parameters(model)
        self.n_train = len(train)

    def _loader(self, dataset: ImageDataset, index_lists: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        if not index_lists:
            return iter(())
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=index_lists, num_workers=self.workers)
        return map(checked, loader)

    def micro_batches(self, index_lists: Sequence[Sequence[int]]) -> Iterator[object | None]:
        loaded = self._loader(self.train_set, [list(x) for x in index_lists if x])
        for indices in index_lists:
            yield next(loaded) if indices else None

    def loss(self, batch: object) -> Tensor:
        images, labels = batch  # type: ignore[misc]
        logits = self.model(images.to(self.world.device))
        return F.cross_entropy(logits.float(), labels.to(self.world.device), reduction="sum")

    def evaluate(self) -> dict[str, float]:
        mine = list(range(self.world.rank, len(self.val_set), self.world.world_size))
        lists = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        total = torch.zeros(3, dtype=torch.float64, device=self.world.device)  # correct, loss, count
        for images, labels in self._loader(self.val_set, lists):
            logits = self.model(images.to(self.world.device)).float()
            labels = labels.to(self.world.device)
            total += torch.stack([(logits.argmax(-1) == labels).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                                  torch.tensor(len(labels), device=labels.device)]).double()  # fmt: skip
        if self.world.world_size > 1:
            dist.all_reduce(total)
        return {"accuracy": (100 * total[0] / total[2]).item(), "val_loss": (total[1] / total[2]).item()}

    def save(self, path: Path, training_args: dict) -> Path:
        args = training_args
        info = AdapterInfo("timm", args["model"], "classify", args["adapter_len"], args["adapter_layer"], vit_shape(self.model),
                           {"classes": self.classes}, trainable_parameters=sum(p.numel() for p in self.params.values()),
                           training_args=training_args)  # fmt: skip
        return save_backbone_adapter(path, self.params, info)

    @property
    def classes(self) -> list[str]:
        return sorted(self.train_set.index, key=self.train_set.index.__getitem__)


def sources(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.data is not None:
        return Path(args.data) / "train", Path(args.data) / "val"
    return Path(args.train), Path(args.val)


def build(args: argparse.Namespace, classes: list[str], world: Dist) -> nn.Module:
    torch.manual_seed(args.seed)  # the new head and the prompts
    model = create_vit(args.model, len(classes))
    depth = vit_shape(model)["depth"]
    args.adapter_layer = args.adapter_layer or depth
    add_vit_adapters(model, args.adapter_len, args.adapter_layer)
    model.to(world.device)
    params = adapter_parameters(model) | head_parameters(model)
    freeze_all_but(model, params)
    if world.world_size > 1:
        for p in params.values():
            dist.broadcast(p.data, 0)
    return model


def train(args: argparse.Namespace) -> nn.Module:
    """Run (or resume) training as ``args`` say; returns the model with its trained adapter and head.

    The adapter file is written to ``OUT/adapter.safetensors`` at the end (not when stopped by --stop-after)."""
    world = init_distributed(args.device)
    out = Path(args.out)
    if (out / CHECKPOINT).exists() and not args.resume:
        raise TrainError(f"{out} already holds a training checkpoint: pass --resume to continue it, or choose another --out")
    train_source, val_source = sources(args)
    train_items, val_items, classes = read_labelled_images(train_source, val_source)
    model = build(args, classes, world)
    transform = eval_transform(model)
    task = ImageTask(model, ImageDataset(train_items, classes, transform), ImageDataset(val_items, classes, transform), world,
                     args.batch_size, args.workers)  # fmt: skip
    if world.main:
        describe(args, model, task, train_items, val_items, classes, world)
    trajectory = {"model": args.model, "train": str(train_source), "val": str(val_source)}
    fit(task, args, world, trajectory)
    return model


def describe(
    args, model: nn.Module, task: ImageTask, train: list[LabelledImage], val: list[LabelledImage], classes: list[str], world: Dist
) -> None:
    shape = vit_shape(model)
    n = sum(p.numel() for p in task.params.values())
    total = sum(p.numel() for p in model.parameters())
    print(f"data: {len(train)} training and {len(val)} validation images, {len(classes)} classes")
    print(f"model: {args.model} ({shape['depth']} blocks, width {shape['dim']}, {shape['heads']} heads), frozen on {world.device}")
    print(f"trainable: {n:,} parameters ({n / total:.3%} of {total:,}): {args.adapter_len} prompt tokens x {args.adapter_layer} "
          f"top blocks + per-head gates + a {len(classes)}-class head")  # fmt: skip


@dataclass
class Classifier:
    """A backbone with a trained adapter: ``predict`` takes PIL images."""

    model: nn.Module
    transform: object
    classes: list[str]

    @torch.no_grad()
    def predict(self, images: Sequence) -> list[str]:
        device = next(self.model.parameters()).device
        batch = torch.stack([self.transform(img.convert("RGB")) for img in images]).to(device)
        return [self.classes[i] for i in self.model(batch).argmax(-1).tolist()]


def load_classifier(path: str | Path, model: str | None = None, device: str = "cpu") -> Classifier:
    """The backbone named in the adapter file (or ``model``, e.g. a local copy of it) with the adapter applied."""
    tensors, info = read_backbone_adapter(path, task="classify")
    classes = info.task_config["classes"]
    vit = create_vit(model or info.backbone, len(classes))
    add_vit_adapters(vit, info.adapter_len, info.adapter_layer)
    expected = set(adapter_parameters(vit) | head_parameters(vit))
    load_into(vit, tensors, info, vit_shape(vit), expected, str(path))
    return Classifier(vit.to(device).eval(), eval_transform(vit), classes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(
        lambda: train(args),
        out_of_memory="lower --batch-size (raise --accum-steps to keep the effective batch)",
        interrupted=f"continue from the last checkpoint with --resume (in {args.out})",
    )


if __name__ == "__main__":
    sys.exit(main())
