"""Fine-tune a frozen RoBERTa for extractive question answering (SQuAD v1.1 / v2.0) with zero-init adaption prompts.

python -m llama_adapter.backbones.squad --model roberta-large --train train-v2.0.json --val dev-v2.0.json --out RUN [options]
torchrun --nproc_per_node N -m llama_adapter.backbones.squad ...   (data parallel over N processes)

Only the prompts, the gates and the span head (``qa_outputs``) train.  Validation reports exact match and
F1 as the official SQuAD scripts compute them; v2.0 (unanswerable questions) is recognised from the files.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
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
from .errors import BackboneError, DataError
from .roberta import add_roberta_adapters, load_qa_model, roberta_shape
from .squad_data import Question, Windows, best_answer, collate, read_squad, tokenize
from .squad_metric import squad_scores
from .training import CHECKPOINT, add_training_args, check_training_args, fit

DEFAULT_MODEL = "roberta-large"
# Our defaults (the paper gives no recipe): prompt-tuning learning rates are far above full fine-tuning's.
DEFAULTS = {"epochs": 10, "batch_size": 32, "blr": 4e-2, "weight_decay": 0.02, "warmup_epochs": 1, "adapter_len": 10}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.backbones.squad", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model id or local directory with a fast tokenizer "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--train", required=True, help="training questions, SQuAD JSON (train-v1.1.json, train-v2.0.json)")
    p.add_argument("--val", required=True, help="validation questions, SQuAD JSON (dev-v1.1.json, dev-v2.0.json)")
    p.add_argument("--max-seq-len", type=int, default=384, help="tokens per window, question included (default: %(default)s)")
    p.add_argument(
        "--doc-stride", type=int, default=128, help="tokens shared by consecutive windows of a long context (default: %(default)s)"
    )
    p.add_argument("--max-answer-len", type=int, default=30, help="longest answer span, in tokens (default: %(default)s)")
    add_training_args(p, DEFAULTS)
    args = p.parse_args(argv)
    check_training_args(p, args)
    if args.max_seq_len < 16 or args.max_answer_len < 1 or args.doc_stride < 0:
        p.error("--max-seq-len must be >= 16, --max-answer-len >= 1 and --doc-stride >= 0")
    if args.doc_stride >= args.max_seq_len // 2:
        p.error("--doc-stride must be below half of --max-seq-len (windows must advance)")
    return args


@dataclass(frozen=True)
class QASettings:
    max_seq_len: int
    doc_stride: int
    max_answer_len: int
    version_2: bool


class QATask:
    """Span cross-entropy on the training windows; exact match and F1 on the validation questions."""

    unit = "windows"

    def __init__(self, model: nn.Module, tokenizer, train: Windows, val: list[Question], settings: QASettings, world: Dist,
                 batch_size: int) -> None:  # fmt: skip
        self.model, self.tokenizer, self.train_windows, self.val = model, tokenizer, train, val
        self.settings, self.world, self.batch_size = settings, world, batch_size
        self.val_windows = tokenize(val, tokenizer, settings.max_seq_len, settings.doc_stride)
        self.params = adapter_parameters(model) | head_parameters(model)
        self.n_train = len(train)

    def micro_batches(self, index_lists: Sequence[Sequence[int]]) -> Iterator[object | None]:
        for indices in index_lists:
            yield collate(self.train_windows, list(indices), self.tokenizer.pad_token_id) if indices else None

    def loss(self, batch: object) -> Tensor:
        b = {k: v.to(self.world.device) for k, v in batch.items()}  # type: ignore[union-attr]
        out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        start = F.cross_entropy(out.start_logits.float(), b["start"], reduction="sum")
        end = F.cross_entropy(out.end_logits.float(), b["end"], reduction="sum")
        return (start + end) / 2

    def predict(self, questions: list[int]) -> dict[str, str]:
        """Answers for these validation questions (by index), by id."""
        return predict(self.model, self.tokenizer, self.val, self.val_windows, questions, self.settings, self.batch_size)

    def evaluate(self) -> dict[str, float]:
        mine = self.predict(list(range(self.world.rank, len(self.val), self.world.world_size)))
        if self.world.world_size > 1:
            parts: list[dict[str, str] | None] = [None] * self.world.world_size
            dist.all_gather_object(parts, mine)
            mine = {k: v for part in parts if part for k, v in part.items()}
        golds = {q.qid: [text for text, _ in q.answers] for q in self.val}
        return squad_scores(mine, golds, self.settings.version_2)

    def save(self, path: Path, training_args: dict) -> Path:
        args = training_args
        n = sum(p.numel() for p in self.params.values())
        info = AdapterInfo("transformers", args["model"], "squad", args["adapter_len"], args["adapter_layer"], roberta_shape(self.model),
                           vars(self.settings), trainable_parameters=n, training_args=args)  # fmt: skip
        return save_backbone_adapter(path, self.params, info)


def predict(model: nn.Module, tokenizer, questions: list[Question], windows: Windows, which: list[int], settings: QASettings,
            batch_size: int) -> dict[str, str]:  # fmt: skip
    """Decode answers for ``questions[i] for i in which`` from their windows' logits."""
    wanted = set(which)
    mine = sorted((w for w in range(len(windows)) if windows.question[w] in wanted), key=lambda w: len(windows.input_ids[w]))
    device = next(model.parameters()).device
    logits: dict[int, dict[int, tuple[Tensor, Tensor]]] = defaultdict(dict)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        b = collate(windows, chunk, tokenizer.pad_token_id)
        out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        for row, w in enumerate(chunk):
            n = len(windows.input_ids[w])
            logits[windows.question[w]][w] = (out.start_logits[row, :n].float().cpu(), out.end_logits[row, :n].float().cpu())
    return {questions[q].qid: best_answer(questions[q], windows, logits[q], settings.max_answer_len, settings.version_2) for q in which}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The span head's parameters by state-dict name: everything outside the base encoder."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    params = {n: p for n, p in model.named_parameters() if not n.startswith(prefix) and ".adapter." not in n}
    if not params:
        raise BackboneError(f"{type(model).__name__} has no head outside its encoder; use a ...ForQuestionAnswering model")
    return params


def build(args: argparse.Namespace, world: Dist):
    torch.manual_seed(args.seed)  # the new span head and the prompts
    model, tokenizer = load_qa_model(args.model)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.max_seq_len > positions - 2:  # RoBERTa's positions start after the padding index
        raise BackboneError(f"--max-seq-len {args.max_seq_len} exceeds what {args.model} can take ({positions - 2} tokens)")
    args.adapter_layer = args.adapter_layer or roberta_shape(model)["depth"]
    add_roberta_adapters(model, args.adapter_len, args.adapter_layer)
    model.to(world.device)
    params = adapter_parameters(model) | head_parameters(model)
    freeze_all_but(model, params)
    if world.world_size > 1:
        for p in params.values():
            dist.broadcast(p.data, 0)
    return model, tokenizer


def train(args: argparse.Namespace) -> nn.Module:
    """Run (or resume) training as ``args`` say; returns the model with its trained adapter and head.

    The adapter file is written to ``OUT/adapter.safetensors`` at the end (not when stopped by --stop-after)."""
    world = init_distributed(args.device)
    out = Path(args.out)
    if (out / CHECKPOINT).exists() and not args.resume:
        raise TrainError(f"{out} already holds a training checkpoint: pass --resume to continue it, or choose another --out")
    train_questions, train_v2 = read_squad(args.train)
    val_questions, val_v2 = read_squad(args.val)
    if train_v2 != val_v2:
        which = ("--train", "--val") if train_v2 else ("--val", "--train")
        raise DataError(f"{which[0]} is SQuAD v2.0 (unanswerable questions) but {which[1]} is not; use files of one version")
    settings = QASettings(args.max_seq_len, args.doc_stride, args.max_answer_len, train_v2)
    model, tokenizer = build(args, world)
    windows = tokenize(train_questions, tokenizer, args.max_seq_len, args.doc_stride)
    task = QATask(model, tokenizer, windows, val_questions, settings, world, args.batch_size)
    if world.main:
        shape = roberta_shape(model)
        n = sum(p.numel() for p in task.params.values())
        total = sum(p.numel() for p in model.parameters())
        version = "v2.0 (with unanswerable questions)" if train_v2 else "v1.1"
        print(f"data: SQuAD {version}: {len(train_questions)} training questions in {len(windows)} windows of <= {args.max_seq_len} "
              f"tokens; {len(val_questions)} validation questions")  # fmt: skip
        print(f"model: {args.model} ({shape['depth']} layers, width {shape['dim']}, {shape['heads']} heads), frozen on {world.device}")
        print(f"trainable: {n:,} parameters ({n / total:.3%} of {total:,}): {args.adapter_len} prompt tokens x {args.adapter_layer} "
              "top layers + per-head gates + the span head")  # fmt: skip
    trajectory = {"model": args.model, "train": str(args.train), "val": str(args.val), "max_seq_len": args.max_seq_len,
                  "doc_stride": args.doc_stride}  # fmt: skip
    fit(task, args, world, trajectory)
    return model


@dataclass
class QuestionAnswerer:
    """A backbone with a trained adapter: ``answer(question, context)``; "" means no answer (v2.0)."""

    model: nn.Module
    tokenizer: object
    settings: QASettings

    @torch.no_grad()
    def answer(self, question: str, context: str) -> str:
        q = Question("q", question.strip(), context, (), False, "question")
        windows = tokenize([q], self.tokenizer, self.settings.max_seq_len, self.settings.doc_stride)
        return predict(self.model, self.tokenizer, [q], windows, [0], self.settings, 16)["q"]


def load_question_answerer(path: str | Path, model: str | None = None, device: str = "cpu") -> QuestionAnswerer:
    """The backbone named in the adapter file (or ``model``, e.g. a local copy of it) with the adapter applied."""
    tensors, info = read_backbone_adapter(path, task="squad")
    qa, tokenizer = load_qa_model(model or info.backbone)
    add_roberta_adapters(qa, info.adapter_len, info.adapter_layer)
    expected = set(adapter_parameters(qa) | head_parameters(qa))
    load_into(qa, tensors, info, roberta_shape(qa), expected, str(path))
    return QuestionAnswerer(qa.to(device).eval(), tokenizer, QASettings(**info.task_config))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(
        lambda: train(args),
        out_of_memory="lower --batch-size (raise --accum-steps to keep the effective batch) or --max-seq-len",
        interrupted=f"continue from the last checkpoint with --resume (in {args.out})",
    )


if __name__ == "__main__":
    sys.exit(main())
