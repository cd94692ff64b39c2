"""Training speed of zero-init adapters on timm ViT and transformers RoBERTa vs full fine-tuning, on CPU.

    python bench/backbones.py [--configs tiny,small] [--steps 10] [--threads 2] [--no-save]

Same random backbone, same batches, same loss as the two commands (cross-entropy over classes; the mean of the
start and end cross-entropies over token positions, with padded batches), AdamW on what trains:
  - adapter: the backbone frozen, prompts + gates in every block + the task head (llama_adapter.backbones);
  - adapter, top half: prompts in the top half of the blocks only; the frozen lower half then keeps no graph;
  - full: every parameter trains, no adapter (the usual fine-tuning of the same model).
Figures are training examples per second (forward, backward, optimizer step), the median step of ``--steps``
after two warm-up steps; the three methods take their steps in turn.  Data loading is left out: both would pay it alike.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results

from llama_adapter.backbones import adapter_parameters, add_roberta_adapters, add_vit_adapters
from llama_adapter.backbones.attention import freeze_all_but
from llama_adapter.backbones.squad import head_parameters as qa_head
from llama_adapter.backbones.tiny import tiny_roberta, tiny_vit
from llama_adapter.backbones.vit import head_parameters as vit_head
from llama_adapter.train import make_optimizer


@dataclass(frozen=True)
class Shape:
    name: str
    vit: dict  # timm VisionTransformer arguments
    roberta: dict  # RobertaConfig overrides
    images: int  # per batch
    seq_len: int  # tokens per QA window (some rows padded shorter)
    windows: int  # per batch


CONFIGS = {
    "tiny": Shape(
        "the shapes the tests train: ViT 32 px, width 32, 4 blocks; RoBERTa width 32, 3 layers, 64-token windows",
        dict(img_size=32, embed_dim=32, depth=4, num_heads=4),
        {},
        16,
        64,
        16,
    ),
    "small": Shape(
        "ViT-Ti/16 at 224 px (12 blocks, width 192); RoBERTa width 256, 4 layers, 256-token windows",
        dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=514),
        8,
        256,
        8,
    ),
}
VOCAB = 1000
METHODS = (("zero-init adapter, all blocks", 1.0), ("zero-init adapter, top half", 0.5), ("full fine-tuning", 0.0))
ADAPTER_LEN = 10


def vit_case(shape: Shape, adapter: float) -> tuple[torch.nn.Module, dict, Callable[[], torch.Tensor]]:
    """``adapter``: the fraction of blocks adapted (0: full fine-tuning)."""
    model = tiny_vit(0, num_classes=10, **shape.vit)
    if adapter:
        add_vit_adapters(model, ADAPTER_LEN, max(1, round(adapter * len(model.blocks))))
        params = adapter_parameters(model) | vit_head(model)
    else:
        params = dict(model.named_parameters())
    freeze_all_but(model, params)
    size = shape.vit["img_size"]
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(shape.images, 3, size, size, generator=g), torch.randint(0, 10, (shape.images,), generator=g)
    return model, params, lambda: F.cross_entropy(model(images), labels)


def roberta_case(shape: Shape, adapter: float) -> tuple[torch.nn.Module, dict, Callable[[], torch.Tensor]]:
    model = tiny_roberta(VOCAB, 0, **shape.roberta)
    if adapter:
        add_roberta_adapters(model, ADAPTER_LEN, max(1, round(adapter * len(model.roberta.encoder.layer))))
        params = adapter_parameters(model) | qa_head(model)
    else:
        params = dict(model.named_parameters())
    freeze_all_but(model, params)
    g = torch.Generator().manual_seed(1)
    n, t = shape.windows, shape.seq_len
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for row in range(n // 2):  # half the windows are shorter, as the last window of a context is
        mask[row, t // 2 + row :] = 0
    ids[mask == 0] = 1
    starts, ends = torch.randint(1, t // 2, (n,), generator=g), torch.randint(t // 2, t, (n,), generator=g) * mask[:, -1]

    def loss() -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask)
        return (F.cross_entropy(out.start_logits, starts) + F.cross_entropy(out.end_logits, ends)) / 2

    return model, params, loss


class Trainer:
    """One method on one backbone: a timed training step, and what it trains."""

    def __init__(self, case, shape: Shape, adapter: float) -> None:
        self.model, self.params, self.loss = case(shape, adapter)
        self.model.train()
        self.optimizer = make_optimizer(self.params, 1e-3, 0.02)
        self.times: list[float] = []

    def step(self) -> float:
        t = time.perf_counter()
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.optimizer.state.values() for t in st.values() if t.ndim)


def measure(case, shape: Shape, steps: int) -> list[Trainer]:
    """The methods' steps taken in turn (two warm-up steps each), so that a busy spell on a shared machine
    slows them alike instead of skewing the ratio."""
    trainers = [Trainer(case, shape, fraction) for _, fraction in METHODS]
    for i in range(steps + 2):
        for trainer in trainers:
            took = trainer.step()
            if i >= 2:
                trainer.times.append(took)
    return trainers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,small", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadiest on a shared machine)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        "| config | backbone | method | trainable params | AdamW state | examples/s | vs full |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in args.configs.split(","):
        shape = CONFIGS[key]
        for backbone, case, batch in (("timm ViT", vit_case, shape.images), ("RoBERTa QA", roberta_case, shape.windows)):
            trainers = measure(case, shape, args.steps)
            full = batch / statistics.median(trainers[-1].times)
            for (method, _), t in zip(METHODS, trainers, strict=True):
                speed = batch / statistics.median(t.times)
                rows.append(f"| {key} | {backbone} (batch {batch}) | {method} | {t.trainable:,} | {t.state_bytes / 2**20:.2f} MiB | "
                            f"{speed:.1f} | {speed / full:.2f}x |")  # fmt: skip
                print(rows[-1], flush=True)
    legend = "\n".join(f"- {k}: {CONFIGS[k].name}" for k in args.configs.split(","))
    table = "\n".join(rows) + f"\n\n{legend}; torch threads: {args.threads}; the median step of {args.steps}."
    print("\n" + table)
    if not args.no_save:
        append_results(
            "Backbones: zero-init adapter vs full fine-tuning (CPU training)",
            "python bench/backbones.py " + shlex.join(sys.argv[1:]),
            table,
        )


if __name__ == "__main__":
    main()
