"""Evaluation throughput: examples/s of the eval loop (``llama_adapter.eval``) at batch 1 vs batch 8, one run.

    python bench/eval.py [--config d1024] [--examples 32] [--new-tokens 32] [--batches 1 8] [--no-save]

A random LLaMA-shaped model with an adapter in every layer completes the same Alpaca-style instructions
through the eval's own loop (batched generation, progress bar, predictions file), once per batch size.
The peer is batch 1: one example at a time, as the official evaluation scripts generate.  Greedy, so each
batch size should give the same outputs; the table says how many match batch 1.  Prints a table and
appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import BenchConfig, add_peft_adapter, append_results, make_hf_llama, ours_from_hf

import llama_adapter
from llama_adapter.eval.runner import Example, Generation, PredictionFile, generate_all
from llama_adapter.tiny import train_tokenizer

VOCAB = 512  # the sentencepiece model trained here; the output head is that wide (a real LLaMA's is 32000)
CONFIGS = {
    "d512": BenchConfig("d512 / 4 layers / 8 heads", 512, 4, 8, vocab_size=VOCAB),
    "d1024": BenchConfig("d1024 / 8 layers / 16 heads", 1024, 8, 16, vocab_size=VOCAB),
}
WORDS = "the water sun tree river city name list explain describe write a short poem about why how what color animal story".split()


def instructions(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) + "." for _ in range(n)]
    return [Example(str(i), llama_adapter.format_prompt(t)) for i, t in enumerate(texts)]


def run(pipe: llama_adapter.Pipeline, examples: list[Example], batch: int, new_tokens: int, out: Path) -> tuple[float, dict[str, str]]:
    predictions = PredictionFile(out, {"batch": batch})
    start = time.perf_counter()
    generate_all(pipe, examples, predictions, Generation(new_tokens), batch, lambda e, o: {"id": e.id, "output": o}, f"batch {batch}")
    return time.perf_counter() - start, {k: r["output"] for k, r in predictions.done.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="d1024")
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--no-save", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()

    cfg = CONFIGS[args.config]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = llama_adapter.Tokenizer(train_tokenizer(Path(tmp), VOCAB))
        model = ours_from_hf(add_peft_adapter(make_hf_llama(cfg, torch.float32), cfg), cfg, torch.float32, max_seq_len=1024)
        pipe = llama_adapter.Pipeline(model, tokenizer)
        examples = instructions(args.examples)
        pipe.generate([examples[0].prompt], max_new_tokens=2, temperature=0)  # warm-up: first-call allocations
        results = {b: run(pipe, examples, b, args.new_tokens, Path(tmp) / f"b{b}") for b in args.batches}

    base_time, base_out = results[args.batches[0]]
    rows = [
        "| batch size | examples/s | time (s) | speed-up | same outputs as batch 1 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for b, (seconds, outputs) in results.items():
        same = sum(outputs[k] == base_out[k] for k in base_out)
        rows.append(f"| {b} | {len(examples) / seconds:.2f} | {seconds:.1f} | {base_time / seconds:.2f}x | {same}/{len(examples)} |")
    title = (f"Eval throughput: {cfg.name}, adapter in every layer, fp32 CPU, {args.examples} instructions, "
             f"{args.new_tokens} new tokens, greedy")  # fmt: skip
    table = "\n".join(rows)
    print(f"{title}\n\n{table}")
    if not args.no_save:
        append_results(title, "python " + shlex.join(["bench/eval.py", *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
