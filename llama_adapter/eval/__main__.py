"""Score a model on the paper's benchmarks: python -m llama_adapter.eval scienceqa|coco-caption|instructions ...

Each task reads the benchmark's official files, generates with batched (greedy by default) generation,
and writes into --out: predictions.jsonl (resumable: rerun the same command to continue), metrics.json,
table.md (the paper's layout, also printed) and, per task, the outputs in the format other tools take.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import llama_adapter
from llama_adapter.commands import run_command

from . import coco_caption, instructions, scienceqa
from .runner import EvalError, Example, Generation, PredictionFile, check_images, digest, generate_all

# Generation lengths that fit each task's answers: a letter sentence, a caption, a free reply.
DEFAULT_MAX_NEW_TOKENS = {"scienceqa": 32, "coco-caption": 64, "instructions": 512}
# Bad files, names or settings: reported in one line, never as a traceback (ImageError and the others are ValueErrors).
USER_ERRORS = (llama_adapter.ResolveError, llama_adapter.CheckpointError, FileNotFoundError, ValueError)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.eval", description=__doc__.split("\n\n")[0])
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")

    sqa = tasks.add_parser("scienceqa", help="ScienceQA accuracy by category (NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg)")
    sqa.add_argument("--data", required=True, help="the ScienceQA release folder: problems.json, pid_splits.json, images/")
    sqa.add_argument("--split", help="split of pid_splits.json (default: test; train with --to-train)")
    sqa.add_argument("--images", help="image folder holding SPLIT/ID/image.png (default: DATA/images)")
    sqa.add_argument("--to-train", metavar="FILE", help="write the split as training records (JSONL) for llama_adapter.train, and stop")

    coco = tasks.add_parser("coco-caption", help="COCO captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)")
    coco.add_argument("--annotations", required=True, help="captions_val2014.json, Karpathy's dataset_coco.json or coco_karpathy_test.json")
    coco.add_argument("--images", required=True, help="image folder (val2014/ for captions_val2014.json; the COCO root for Karpathy files)")
    coco.add_argument("--split", default="test", help="split of Karpathy's dataset_coco.json (default: test)")
    coco.add_argument("--spice", action="store_true", help="also SPICE (downloads Stanford CoreNLP models on first use)")

    ins = tasks.add_parser("instructions", help="outputs for a list of instructions, in AlpacaEval's format")
    ins.add_argument("--data", required=True, help="JSON list or JSONL of {instruction, input?} objects or strings")
    ins.add_argument("--generator", help="the 'generator' name in the outputs (default: --name)")

    for sub in (sqa, coco, ins):
        model = sub.add_argument_group("model")
        model.add_argument("--base", help="base LLaMA: Meta or HF checkpoint directory, or a Hugging Face repo id")
        model.add_argument("--adapter", help="adapter file, directory, official name (e.g. CAPTION-7B) or Hugging Face repo id")
        model.add_argument(
            "--clip", help="open_clip CLIP as MODEL[:PRETRAINED], hf-hub:ORG/REPO or local-dir:/PATH (default: the adapter's own)"
        )
        model.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        model.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
        model.add_argument("--max-seq-len", type=int, help="context length (default: the model's)")
        model.add_argument("--quantize", choices=["int8"], help="weight-only int8")
        model.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on GPU)")
        run = sub.add_argument_group("run")
        run.add_argument("--out", help="output folder; rerunning the same command there resumes")
        run.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
        run.add_argument("--max-new-tokens", type=int, help=f"default: {DEFAULT_MAX_NEW_TOKENS[sub.prog.split()[-1]]}")
        run.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
        run.add_argument("--top-p", type=float, default=0.75)
        run.add_argument("--seed", type=int, help="for sampling (temperature > 0)")
        run.add_argument("--limit", type=int, help="only the first N examples (a quick check; rerun without it to complete)")
        run.add_argument("--name", help="the model's name in the table (default: the adapter's, or the base's)")

    args = p.parse_args(argv)
    sub = {"scienceqa": sqa, "coco-caption": coco, "instructions": ins}[args.task]
    if getattr(args, "to_train", None):
        given = [f"--{k.replace('_', '-')}" for k in ("base", "adapter", "out", "limit") if getattr(args, k) is not None]
        if given:
            sub.error(f"--to-train only converts data; leave out {', '.join(given)}")
        return args
    if args.base is None or args.out is None:
        sub.error("--base and --out are required")
    if args.batch_size < 1:
        sub.error("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        sub.error("--limit must be at least 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[args.task]
    return args


def clip_spec(value: str | None) -> llama_adapter.ClipSpec | None:
    if value is None:
        return None
    if value.startswith(("hf-hub:", "local-dir:")):  # open_clip schemas that carry their own weights
        return llama_adapter.ClipSpec(value, None)
    model, _, pretrained = value.partition(":")
    return llama_adapter.ClipSpec(model, pretrained or None)


def model_name(args: argparse.Namespace) -> str:
    return args.name or Path(str(args.adapter or args.base)).name


def settings(args: argparse.Namespace, data: dict[str, object]) -> dict[str, object]:
    """What a prediction depends on; a resumed run must match it (batch size and device may change)."""
    keys = ("task", "base", "adapter", "clip", "dtype", "max_seq_len", "quantize", "max_new_tokens", "temperature", "top_p", "seed")
    out = {k: getattr(args, k) for k in keys} | data
    for k in ("base", "adapter"):  # local paths as absolute ones, so that a rerun from another folder still matches
        if out[k] is not None and Path(out[k]).exists():
            out[k] = str(Path(out[k]).resolve())
    return out


def load_model(args: argparse.Namespace) -> llama_adapter.Pipeline:
    return llama_adapter.load(
        args.base,
        args.adapter,
        device=args.device,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        quantize=args.quantize,
        compile=args.compile,
        clip=clip_spec(args.clip),
    )


def predict(
    args: argparse.Namespace,
    pipe: llama_adapter.Pipeline,
    examples: list[Example],
    predictions: PredictionFile,
    record: Callable[[Example, str], dict],
) -> list[dict]:
    """Generate what is missing and return the predictions of ``examples`` in order (the file is kept in that order)."""
    chosen = examples[: args.limit] if args.limit else examples
    generation = Generation(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    truncated = generate_all(pipe, chosen, predictions, generation, args.batch_size, record, args.task)
    if truncated:
        print(f"note: {truncated} prompt(s) did not fit the context and lost tokens from their start", file=sys.stderr)
    order = [e.id for e in examples if e.id in predictions.done]
    predictions.finish(order)
    return [predictions.done[e.id] for e in chosen]


def write_results(out: Path, metrics: dict, table: str) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(table)


def run_scienceqa(args: argparse.Namespace) -> None:
    split = args.split or ("train" if args.to_train else "test")
    image_root = Path(args.images) if args.images else Path(args.data) / "images"
    problems = scienceqa.read_problems(args.data, split, image_root)
    if args.to_train:
        check_images(scienceqa.examples(problems, with_images=True), "problem")
        n = scienceqa.write_training_records(problems, image_root, Path(args.to_train))
        # As the paper: adaption prompts, gates and the visual adapter learn ScienceQA (the pretrain phase's parameters).
        print(f"wrote {n} training records to {args.to_train}; train a ScienceQA adapter with:\n"
              f"  python -m llama_adapter.train --base BASE --data {args.to_train} --image-root {image_root} "
              f"--phase pretrain --out runs/scienceqa")  # fmt: skip
        return
    root = Path(args.data).resolve()
    data = {"data": str(root), "split": split, "images": str(image_root.resolve()),
            "data_sha256": digest(root / "problems.json", root / "pid_splits.json")}  # fmt: skip
    predictions = PredictionFile(args.out, settings(args, data))  # a mismatched --out is refused before loading
    pipe = load_model(args)
    examples = scienceqa.examples(problems, with_images=pipe.visual is not None)
    check_images(examples[: args.limit] if args.limit else examples, "problem")
    by_id = {p.id: p for p in problems}
    records = predict(args, pipe, examples, predictions, lambda e, out: scienceqa.prediction(by_id[e.id], out))
    chosen = [by_id[r["id"]] for r in records]
    preds = {r["id"]: None if r["pred"] is None else scienceqa.LETTERS.index(r["pred"]) for r in records}
    result = scienceqa.scores(chosen, preds)
    unparsed = [r["id"] for r in records if r["pred"] is None]
    metrics = {"task": "scienceqa", "model": model_name(args), "split": split, "examples": len(records), **result,
               "unparsed": unparsed, "images_used": pipe.visual is not None}  # fmt: skip
    write_results(Path(args.out), metrics, scienceqa.table(result["accuracy"], model_name(args)))
    if unparsed:
        shown = ", ".join(unparsed[:20]) + (" ..." if len(unparsed) > 20 else "")
        print(f"{len(unparsed)} answer(s) named no option and count as wrong: {shown} (see predictions.jsonl)", file=sys.stderr)


def run_coco(args: argparse.Namespace) -> None:
    items = coco_caption.read_annotations(args.annotations, args.images, args.split)
    coco_caption.require_java()  # before hours of captioning, not after
    examples = coco_caption.examples(items)
    check_images(examples[: args.limit] if args.limit else examples, "image")
    annotations = Path(args.annotations).resolve()
    data = {
        "annotations": str(annotations),
        "split": args.split,
        "images": str(Path(args.images).resolve()),
        "data_sha256": digest(annotations),
    }
    predictions = PredictionFile(args.out, settings(args, data))
    pipe = load_model(args)
    if pipe.visual is None:
        raise EvalError("coco-caption needs a multimodal adapter (e.g. --adapter CAPTION-7B); this model takes no images")
    by_id = {it.id: it for it in items}
    records = predict(args, pipe, examples, predictions, lambda e, out: coco_caption.prediction(by_id[e.id], out))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(coco_caption.coco_results(records), ensure_ascii=False) + "\n")
    scores = coco_caption.scores(
        {r["id"]: by_id[r["id"]].references for r in records}, {r["id"]: r["caption"] for r in records}, args.spice
    )
    metrics = {"task": "coco-caption", "model": model_name(args), "examples": len(records), "scores": scores}
    if not args.spice:
        metrics["spice"] = "skipped (it downloads Stanford CoreNLP models on first use); add --spice to compute it"
    write_results(out, metrics, coco_caption.table(scores, model_name(args)))


def run_instructions(args: argparse.Namespace) -> None:
    items = instructions.read_instructions(args.data)
    data = {"data": str(Path(args.data).resolve()), "data_sha256": digest(Path(args.data))}
    predictions = PredictionFile(args.out, settings(args, data))
    pipe = load_model(args)
    by_id = {it.id: it for it in items}
    records = predict(args, pipe, instructions.examples(items), predictions, lambda e, out: instructions.prediction(by_id[e.id], out))
    generator = args.generator or model_name(args)
    outputs = instructions.alpaca_eval_outputs([by_id[r["id"]] for r in records], records, generator)
    out = Path(args.out)
    (out / "outputs.json").write_text(json.dumps(outputs, indent=2, ensure_ascii=False) + "\n")
    summary = instructions.summary(records)
    metrics = {"task": "instructions", "model": model_name(args), "generator": generator, **summary}
    table = "\n".join(["| Model | outputs | empty | mean words |", "| --- | ---: | ---: | ---: |",
                       f"| {generator} | {summary['count']} | {summary['empty']} | {summary['mean_words']:.1f} |"])  # fmt: skip
    write_results(out, metrics, table)
    print(f"AlpacaEval outputs: {out / 'outputs.json'} (score with: alpaca_eval --model_outputs {out / 'outputs.json'})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = {"scienceqa": run_scienceqa, "coco-caption": run_coco, "instructions": run_instructions}[args.task]
    return run_command(
        lambda: run(args),
        out_of_memory="try a smaller --batch-size, --quantize int8 or a smaller --max-seq-len",
        interrupted=f"the predictions so far are in {args.out}: rerun the same command to continue",
    )


if __name__ == "__main__":
    sys.exit(main())
