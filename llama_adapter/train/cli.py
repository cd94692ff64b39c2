"""Train an adapter on Alpaca-style data: a frozen LLaMA, learnable zero-gated adaption prompts.

python -m llama_adapter.train --base B --data FILE --out DIR [options]
python -m llama_adapter.train --base B --data FILE --image-root DIR --phase pretrain|finetune --out DIR [options]
torchrun --nproc_per_node N -m llama_adapter.train ...   (data parallel over N processes)

The defaults are the paper's recipe (5 epochs, 2 warmup, base lr 9e-3, wd 0.02, 10 x 30 prompts).
With --image-root the data are image-text records and an official-V2-style multimodal adapter
(CLIP + visual adapter, 10 x 31 prompts) is trained in two phases, each with the official recipe's
defaults: pretrain (visual adapter, prompts, gates; blr 1e-4, wd 0.05, 3 epochs, 0.1 warmup), then
finetune from the pretrain output with --init-adapter (biases, norms; blr 1e-3, wd 0.02, 4 epochs, 1 warmup).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..commands import run_command
from ..config import AdapterConfig, VisualConfig
from ..errors import TrainError
from ..inputs.chat_template import CHAT_TEMPLATE_CHOICES, prompt_format
from ..model.visual import ClipSpec, clip_output_dim
from ..options import DTYPE_CHOICES
from ..roles import IMAGE_PHASES, prepare_for_serving, prepare_for_training
from ..serve.loading import load
from ..serve.pipeline import Pipeline
from ..weights.adapter import AdapterFile, save_adapter
from .data import Encoded, LengthGroupedBatches, encode_records, padding_efficiency, read_records, split_records
from .distributed import Dist, init_distributed
from .image_data import read_image_text_records
from .loss import Run, accumulate, evaluate
from .optim import lr_factor, make_optimizer
from .state import Metrics, OutputLock, Position, load_checkpoint, restore, save_checkpoint
from .visual import ImageFeeder, copy_init_adapter, read_init_adapter

CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
# Arguments that decide the course of training: a resumed run must use the same ones.
TRAJECTORY = ("base", "data", "val_data", "val_fraction", "epochs", "global_batch", "accum_steps", "lr", "weight_decay",
              "warmup_epochs", "min_lr", "adapter_len", "adapter_layer", "max_seq_len", "seed", "image_root", "phase",
              "clip", "init_adapter", "lora_rank", "visual_dim", "visual_depth", "visual_heads", "chat_template")  # fmt: skip
# Defaults per kind of run: the paper's text recipe, and the official V2 scripts' (exps/pretrain.sh counts
# 150 epochs of 1/50 of the data with 5 warmup: 3 passes and 0.1; exps/finetune.sh: 4 epochs, 1 warmup).
RECIPES = {
    "text": {"epochs": 5, "warmup_epochs": 2.0, "blr": 9e-3, "weight_decay": 0.02, "adapter_len": 10, "adapter_layer": 30},
    "pretrain": {"epochs": 3, "warmup_epochs": 0.1, "blr": 1e-4, "weight_decay": 0.05, "adapter_len": 10, "adapter_layer": 31},
    "finetune": {"epochs": 4, "warmup_epochs": 1.0, "blr": 1e-3, "weight_decay": 0.02, "adapter_len": 10, "adapter_layer": 31},
}
# The visual adapter of the official V2 models (VisualConfig's defaults): 768 wide, 8 blocks of 16 heads.
_V2 = VisualConfig()
VISUAL_SHAPE = {"visual_dim": _V2.embed_dim, "visual_depth": _V2.depth, "visual_heads": _V2.num_heads}
DEFAULT_CLIP = "ViT-L-14:openai"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base LLaMA: Meta or HF checkpoint directory, or a Hugging Face repo id")
    p.add_argument("--data", required=True, help="training records: a JSON list or JSONL of {instruction, input?, output}")
    p.add_argument("--out", required=True, help="output directory: adapter.safetensors, checkpoint.pt, metrics.jsonl")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-data", help="validation records (same format); eval loss is reported at each epoch end")
    val.add_argument("--val-fraction", type=float, help="hold out this fraction of --data (seeded) for validation")
    p.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATE_CHOICES,
        default="alpaca",
        help="the prompt template: alpaca (the official one), or auto: the base's own chat template when it has one",
    )
    images = p.add_argument_group("image-text training (official LLaMA-Adapter V2 layout)")
    images.add_argument("--image-root", help="the records' 'image' paths are relative to this directory; makes the run multimodal")
    images.add_argument("--phase", choices=IMAGE_PHASES, help="pretrain: visual adapter, prompts, gates; finetune: biases, norms (+LoRA)")
    images.add_argument("--init-adapter", help="start from this multimodal adapter (the pretrain output, or an official V2 file)")
    images.add_argument("--clip", help=f"open_clip CLIP as MODEL[:PRETRAINED] (default: {DEFAULT_CLIP}, or --init-adapter's), "
                        "also hf-hub:ORG/REPO or local-dir:/PATH (a folder with open_clip_config.json and weights)")  # fmt: skip
    images.add_argument("--lora-rank", type=int, default=0, help="finetune phase: also train LoRA of this rank (0: none)")
    images.add_argument("--visual-dim", type=int, help=f"visual adapter width (default {VISUAL_SHAPE['visual_dim']})")
    images.add_argument("--visual-depth", type=int, help=f"visual adapter blocks (default {VISUAL_SHAPE['visual_depth']})")
    images.add_argument("--visual-heads", type=int, help=f"visual adapter attention heads (default {VISUAL_SHAPE['visual_heads']})")
    p.add_argument("--epochs", type=int, help="passes over the data (default: 5; pretrain 3, finetune 4)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per device per micro-batch")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, help="peak learning rate (default: blr * effective batch / 256)")
    lr.add_argument(
        "--blr", type=float, help="base learning rate for an effective batch of 256 (default: 9e-3; pretrain 1e-4, finetune 1e-3)"
    )
    p.add_argument(
        "--weight-decay", type=float, help="AdamW weight decay on matrices, never on gates, biases or norms (default: 0.02; pretrain 0.05)"
    )
    p.add_argument("--warmup-epochs", type=float, help="linear warmup length, in epochs (default: 2; pretrain 0.1, finetune 1)")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
    p.add_argument("--adapter-len", type=int, help="prompt tokens per adapted layer (default 10)")
    p.add_argument("--adapter-layer", type=int, help="number of top layers that get a prompt (default: 30; image-text 31)")
    p.add_argument("--max-seq-len", type=int, default=512, help="longer examples are truncated (their end is lost)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available); torchrun gives each process its GPU")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="frozen base dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps (always at each epoch end)")
    p.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl line every N optimizer steps")
    p.add_argument("--stop-after", type=int, help="stop with a checkpoint after N optimizer steps in all; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out that has no checkpoint")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute adapted layers' activations in backward")
    args = p.parse_args(argv)
    check_multimodal_args(p, args)
    if args.image_root and args.chat_template != "alpaca":
        p.error("image-text training uses the official Alpaca template: drop --chat-template")
    kind = args.phase or "text"
    shape_from_file = args.init_adapter is not None
    defaults = RECIPES[kind] | (VISUAL_SHAPE if kind != "text" else {})
    for name, value in defaults.items():
        if getattr(args, name) is None and not (shape_from_file and name in SHAPE_ARGS):
            setattr(args, name, value)
    positive = ("epochs", "batch_size", "accum_steps", "max_seq_len", "log_every", *SHAPE_ARGS)
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.lr is not None and not args.lr > 0) or not args.blr > 0:
        p.error("the learning rate must be > 0")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        p.error("--val-fraction must be between 0 and 1")
    if args.warmup_epochs < 0 or args.min_lr < 0 or args.weight_decay < 0 or args.save_every < 0:
        p.error("--warmup-epochs, --min-lr, --weight-decay and --save-every must be >= 0")
    if args.stop_after is not None and args.stop_after < 1:
        p.error("--stop-after must be >= 1")
    return args


# The adapter's shape; with --init-adapter it comes from that file.
SHAPE_ARGS = ("adapter_len", "adapter_layer", "visual_dim", "visual_depth", "visual_heads")


def check_multimodal_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Image-text flags go together: --image-root and --phase, and the rest only with them."""
    if (args.image_root is None) != (args.phase is None):
        p.error("image-text training needs both --image-root DIR and --phase pretrain|finetune")
    if args.phase is None:
        used = [f"--{n.replace('_', '-')}" for n in ("init_adapter", "clip", "visual_dim", "visual_depth", "visual_heads")
                if getattr(args, n) is not None] + (["--lora-rank"] if args.lora_rank else [])  # fmt: skip
        if used:
            p.error(f"{', '.join(used)} only apply to image-text training (--image-root and --phase)")
        return
    if args.lora_rank < 0:
        p.error("--lora-rank must be >= 0")
    if args.lora_rank and args.phase != "finetune":
        p.error("--lora-rank is for --phase finetune (the official pretrain phase trains no LoRA)")
    if args.init_adapter is not None:
        given = [f"--{n.replace('_', '-')}" for n in SHAPE_ARGS if getattr(args, n) is not None]
        if given:
            p.error(f"{', '.join(given)}: the adapter's shape comes from --init-adapter; leave them out")


def clip_spec(value: str) -> ClipSpec:
    """``MODEL[:PRETRAINED]``; open_clip's ``hf-hub:`` and ``local-dir:`` schemas carry their own weights."""
    if value.startswith(("hf-hub:", "local-dir:")):
        return ClipSpec(value, None)
    model, _, pretrained = value.partition(":")
    return ClipSpec(model, pretrained or None)


# ---------------------------------------------------------------- the run


def read_data(args: argparse.Namespace) -> tuple[list, list]:
    """Validated train and validation records (images opened, for image-text data), before anything is loaded onto a device."""

    def read(path: str) -> list:
        return read_image_text_records(path, args.image_root) if args.image_root else read_records(path)

    records = read(args.data)
    if args.val_data:
        return records, read(args.val_data)
    if args.val_fraction:
        return split_records(records, args.val_fraction, args.seed)
    return records, []


def multimodal_config(args: argparse.Namespace, init: AdapterFile | None, clip: ClipSpec) -> AdapterConfig:
    """The adapter an image-text phase trains: the shape from --init-adapter or the flags; biases and norms for finetune."""
    if init is not None:
        assert init.config.visual is not None
        shape = init.config
        visual = VisualConfig(**(vars(init.config.visual) | {"clip_model": clip.model, "clip_pretrained": clip.pretrained}))
    else:
        shape = AdapterConfig(args.adapter_len, args.adapter_layer)
        visual = VisualConfig(clip.model, clip.pretrained, clip_output_dim(clip), args.visual_dim, args.visual_depth, args.visual_heads)
    finetune = args.phase == "finetune"
    return AdapterConfig(
        shape.adapter_len, shape.adapter_layer, "tanh", bias=finetune, norm=finetune, lora_rank=args.lora_rank, visual=visual
    )


def build(args: argparse.Namespace, world: Dist) -> tuple[Pipeline, Run]:
    """The pipeline with a fresh (or --init-adapter) adapter, and what of it trains."""
    if args.phase is None:
        pipe = load(args.base, AdapterConfig(args.adapter_len, args.adapter_layer), device=world.device, dtype=args.dtype)
        return pipe, Run(pipe.model, prepare_for_training(pipe.adapter_tensors(), "text"), None, None)
    init_path, init = read_init_adapter(args.init_adapter) if args.init_adapter else (None, None)
    if args.clip:
        clip = clip_spec(args.clip)
    else:  # the CLIP the starting adapter was trained with
        clip = ClipSpec.of(init.config.visual) if init and init.config.visual else clip_spec(DEFAULT_CLIP)
    pipe = load(args.base, multimodal_config(args, init, clip), device=world.device, dtype=args.dtype, clip=clip)
    if init is not None:
        copy_init_adapter(pipe, init, f"--init-adapter {init_path}")
    # fp32 master weights; the forward runs under autocast on a half-precision base
    params = prepare_for_training(pipe.adapter_tensors(), args.phase)
    assert pipe.visual is not None
    half = pipe.dtype if pipe.dtype != torch.float32 else None
    return pipe, Run(pipe.model, params, ImageFeeder(pipe.visual, args.seed), half)


def describe(world: Dist, train: Encoded, val: Encoded, run: Run, plan: LengthGroupedBatches, args, lr: float) -> None:
    model = run.model
    lengths = [e.input_len for e in train.examples]
    grouped = padding_efficiency(plan.epoch(0), lengths, world.world_size)
    padded_to_max = sum(lengths) / (len(lengths) * args.max_seq_len)
    n_params = sum(p.numel() for p in run.params.values())
    effective = args.batch_size * world.world_size * args.accum_steps
    val_part = f", validation {len(val.examples)} examples" if val.examples else ""
    print(f"data: {len(train.examples)} training examples, {train.tokens:,} tokens{val_part}")
    if train.truncated or val.truncated:
        dropped = train.dropped + val.dropped
        print(
            f"      {train.truncated + val.truncated} examples longer than --max-seq-len {args.max_seq_len} were truncated"
            + (f"; {dropped} of them lost their whole response and were dropped" if dropped else "")
        )
    cfg = model.adapter_config
    assert cfg is not None
    what = {
        None: "prompts + gates",
        "pretrain": "prompts, gates and visual adapter",
        "finetune": "biases and norms" + (f" and rank-{cfg.lora_rank} LoRA" if cfg.lora_rank else ""),
    }[args.phase]
    print(f"model: {n_params:,} trainable parameters ({what}; {cfg.adapter_len} x {cfg.adapter_layer} prompts), "
          f"frozen base in {str(model.tok_embeddings.weight.dtype).removeprefix('torch.')} on {world.device}")  # fmt: skip
    how = "--lr" if args.lr is not None else f"blr {args.blr:g} x {effective} / 256"
    print(f"batch: {args.batch_size} per process x {world.world_size} processes x {args.accum_steps} accumulation = "
          f"{effective} effective; lr {lr:.4g} ({how})")  # fmt: skip
    print(f"padding efficiency: {grouped:.1%} with length grouping (padding to {args.max_seq_len} would give {padded_to_max:.1%})")


def check_output_dir(out: Path, args: argparse.Namespace) -> None:
    """Before anything is loaded: ``--out`` is a directory this run may write, and holds no other run's work."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a directory: choose another --out")
    if (out / CHECKPOINT).exists():
        if not args.resume:
            raise TrainError(f"{out} already holds a training checkpoint: pass --resume to continue it, or choose another --out")
        return
    earlier = [name for name in (ADAPTER, METRICS) if (out / name).exists()]
    if earlier and not args.overwrite:
        raise TrainError(
            f"{out} holds an earlier run's {' and '.join(earlier)} but no checkpoint to continue from: "
            "pass --overwrite to replace them, or choose another --out"
        )


def train(args: argparse.Namespace) -> Pipeline:
    """Run (or resume) training as ``args`` say; returns the pipeline holding the trained adapter.

    The output directory is checked, and after the data, created and locked (one run at a time),
    all before the model is loaded.
    """
    world = init_distributed(args.device)
    out = Path(args.out)
    check_output_dir(out, args)
    records = read_data(args)
    if not world.main:  # only the main process writes
        return run_training(args, world, out, records)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out).__enter__()
    except OSError as e:
        raise TrainError(f"cannot write to --out {out}: {e.strerror or e}") from None
    try:
        return run_training(args, world, out, records)
    finally:
        lock.__exit__()


def run_training(args: argparse.Namespace, world: Dist, out: Path, records: tuple[list, list]) -> Pipeline:
    ckpt_path = out / CHECKPOINT
    train_records, val_records = records

    torch.manual_seed(args.seed)  # the fresh adapter's initialisation
    pipe, run = build(args, world)
    model, tokenizer = pipe.model, pipe.tokenizer
    if args.max_seq_len > model.args.max_seq_len:
        raise TrainError(f"--max-seq-len {args.max_seq_len} exceeds the base model's context of {model.args.max_seq_len}")
    adapter = pipe.adapter_tensors()
    if world.world_size > 1:
        for t in adapter.values():
            dist.broadcast(t.data, 0)

    fmt = prompt_format(tokenizer, args.chat_template)
    if fmt.name != args.chat_template and world.main:
        print("note: the base has no chat template of its own; using the Alpaca template")
    train_set = encode_records(train_records, tokenizer, args.max_seq_len, fmt)
    val_set = encode_records(val_records, tokenizer, args.max_seq_len, fmt)
    if not train_set.examples:
        raise TrainError(f"no training example has any response token within --max-seq-len {args.max_seq_len}")
    examples = train_set.examples
    plan = LengthGroupedBatches([e.input_len for e in examples], args.batch_size * world.world_size, args.seed)
    effective = args.batch_size * world.world_size * args.accum_steps
    lr = args.lr if args.lr is not None else args.blr * effective / 256
    steps_per_epoch = math.ceil(len(plan) / args.accum_steps)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = args.warmup_epochs * steps_per_epoch

    optimizer = make_optimizer(run.params, lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, args.min_lr / lr))
    # fp16 activations can underflow in backward; bf16 and fp32 need no loss scaling.
    scaler = torch.amp.GradScaler(world.device.type, enabled=model.tok_embeddings.weight.dtype == torch.float16)

    trajectory = {k: getattr(args, k, None) for k in TRAJECTORY} | {"global_batch": args.batch_size * world.world_size, "lr": lr}
    position = Position()
    if args.resume and ckpt_path.exists():
        position = restore(load_checkpoint(ckpt_path, trajectory), adapter, optimizer, scheduler, scaler)
    elif args.resume and world.main:
        print(f"note: no checkpoint in {out} yet; starting from the beginning")
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        describe(world, train_set, val_set, run, plan, args, lr)
        if position.step:
            print(f"resuming at step {position.step} of {total_steps} (epoch {position.epoch + 1}, batch {position.batch})")
    metrics = Metrics(out / METRICS, world.main, position.metrics_lines)
    saved_step: list[int] = [position.step] if ckpt_path.exists() else []

    def checkpoint() -> None:
        position.metrics_lines = metrics.lines
        if world.main:
            save_checkpoint(ckpt_path, adapter, optimizer, scheduler, scaler, position, trajectory)
        saved_step[:] = [position.step]

    def run_eval() -> None:
        if val_set.examples:
            loss = evaluate(run, val_set.examples, args.batch_size, tokenizer.pad_id, world)
            metrics.write(step=position.step, epoch=position.epoch, eval_loss=loss)
            if world.main:
                tqdm.write(f"step {position.step}: eval loss {loss:.4f}")

    if position == Position():
        run_eval()  # the base model's loss, where every run starts
    window = torch.zeros(2, dtype=torch.float64)  # NLL sum and targets since the last metrics line
    window_tokens, window_start = 0, time.perf_counter()
    with tqdm(total=total_steps, initial=position.step, disable=not world.main, unit="step", dynamic_ncols=True) as bar:
        while position.epoch < args.epochs:
            batches = plan.epoch(position.epoch)
            while position.batch < len(batches):
                group = batches[position.batch : position.batch + args.accum_steps]
                loss_sum, n_targets = accumulate(
                    run, examples, group, tokenizer.pad_id, scaler, world, args.grad_checkpointing, position.epoch
                )
                step_loss = loss_sum / n_targets
                if not math.isfinite(step_loss):
                    kept = f"the last checkpoint, {ckpt_path} (step {saved_step[0]}), is kept" if saved_step else "no checkpoint exists"
                    fp16 = " or --dtype bf16/fp32 instead of fp16" if scaler.is_enabled() else ""
                    raise TrainError(
                        f"the loss is {step_loss} at step {position.step + 1} (epoch {position.epoch + 1}); training stopped "
                        f"without applying that step, and {kept}. Try a lower --lr or --blr{fp16}"
                    )
                step_lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                position.batch += len(group)
                position.step += 1
                window += torch.tensor([loss_sum, n_targets], dtype=torch.float64)
                window_tokens += sum(examples[i].input_len for batch in group for i in batch)
                elapsed = time.perf_counter() - window_start
                bar.update()
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{step_lr:.3g}", tok_s=f"{window_tokens / elapsed:.0f}")
                if position.step % args.log_every == 0 or position.batch >= len(batches):
                    metrics.write(
                        step=position.step,
                        epoch=round(position.epoch + position.batch / len(batches), 4),
                        loss=(window[0] / window[1]).item(),
                        lr=step_lr,
                        tokens_per_s=round(window_tokens / elapsed, 1),
                    )
                    window.zero_()
                    window_tokens, window_start = 0, time.perf_counter()
                if args.save_every and position.step % args.save_every == 0:
                    checkpoint()
                if args.stop_after is not None and position.step >= args.stop_after:
                    checkpoint()
                    bar.close()
                    if world.main:
                        print(f"stopped after step {position.step} as asked; continue with --resume")
                    prepare_for_serving(adapter, pipe.dtype)
                    return pipe
            position.epoch, position.batch = position.epoch + 1, 0
            run_eval()
            checkpoint()
    if world.main:
        training_args = vars(args) | {"lr": lr, "effective_batch": effective, "world_size": world.world_size}
        path = save_adapter(out / ADAPTER, adapter, model.adapter_config, model.args, training_args)
        print(f"wrote {path}")
    prepare_for_serving(adapter, pipe.dtype)
    return pipe


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(
        lambda: train(args),
        out_of_memory="lower --batch-size (raise --accum-steps to keep the effective batch), lower --max-seq-len, "
        "or add --grad-checkpointing",
        interrupted=f"continue from the last checkpoint with --resume (in {args.out})",
    )
