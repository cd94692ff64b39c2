"""Training speed: this project's trainer vs transformers + peft AdaptionPrompt, same weights, same data.

    python bench/train.py [--config d1024] [--batch-size 8] [--steps 3]

The data is a synthetic Alpaca-like length mix (template + instruction ~40-200 tokens,
response log-normal around 60 tokens, capped at 512).  Compared, on useful (non-pad) tokens/s:
  - ours: length-grouped batches, frozen layers below the adapter under no_grad, logits only on targets,
    fp32 products on oneDNN (and once more on F.linear, torch's default kernel, to show that share);
  - peft + dynamic padding: random batches padded to their longest example (the usual HF collator);
  - peft + pad to 512: every example padded to 512 tokens, as the official training script does.
Each runs in its own process, so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shlex
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from common import MAX_LEN, BenchConfig, add_peft_adapter, alpaca_like, append_results, make_hf_llama, ours_from_hf

from llama_adapter.model import kernels
from llama_adapter.train import make_optimizer, summed_nll
from llama_adapter.train.data import IGNORE_INDEX, Example, LengthGroupedBatches, padding_efficiency

CONFIGS = {
    "d512": BenchConfig("d512 / 8 layers / 8 heads", 512, 8, 8),
    "d1024": BenchConfig("d1024 / 8 layers / 16 heads", 1024, 8, 16),
}


def hf_batch(examples: list[Example], width: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF-style causal LM batch: inputs, attention mask and labels (-100 on prompt and padding)."""
    width = width or max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n], mask[row, :n] = e.ids, 1
        labels[row, e.response_start : n] = e.ids[e.response_start :]
    return ids, mask, labels


def run(impl: str, cfg: BenchConfig, batch_size: int, steps: int, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    examples = alpaca_like(batch_size * (steps + 1) * 4, cfg.vocab_size)
    hf = add_peft_adapter(make_hf_llama(cfg, torch.float32), cfg)
    if impl.startswith("ours"):
        # This process is the run's own (spawned), so switching the kernel here touches nothing else.
        kernels.set_plan(replace(kernels.PLAN, fp32_onednn=impl == "ours"))
        model = ours_from_hf(hf, cfg, torch.float32, max_seq_len=MAX_LEN)
        del hf
        for p in model.adapter_parameters().values():
            p.requires_grad_(True)
        model.train()
        optimizer = make_optimizer(model.adapter_parameters(), 1e-3, 0.02)
        lengths = [e.input_len for e in examples]
        batches = LengthGroupedBatches(lengths, batch_size, seed=0, group_batches=4).epoch(0)[: steps + 1]

        def step(batch: list[int]) -> int:
            chosen = [examples[i] for i in batch]
            loss = summed_nll(model, chosen, 0, torch.device("cpu"), recompute=False) / sum(e.n_targets for e in chosen)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return sum(e.input_len for e in chosen)

        efficiency = padding_efficiency(batches, lengths)
    else:
        model = hf.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
        width = MAX_LEN if impl == "pad512" else None
        batches = [list(range(i, i + batch_size)) for i in range(0, batch_size * (steps + 1), batch_size)]

        def step(batch: list[int]) -> int:
            ids, mask, labels = hf_batch([examples[i] for i in batch], width)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return int(mask.sum()) - len(batch)

        real = sum(len(examples[i].ids) for b in batches for i in b)
        efficiency = real / sum(len(b) * (width or max(len(examples[i].ids) for i in b)) for b in batches)
    reset_peak_rss()  # setup (building both models to copy weights) is not part of training
    step(batches[0])  # warm-up
    start = time.perf_counter()
    tokens = sum(step(b) for b in batches[1:])
    seconds = time.perf_counter() - start
    queue.put((tokens / seconds, efficiency, peak_rss_gib()))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak resident set size
        f.write("5")


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="d1024", choices=list(CONFIGS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    cfg = CONFIGS[args.config]
    ctx = mp.get_context("spawn")
    names = {
        "ours": "llama_adapter (ours)",
        "ours-flinear": "ours with F.linear (torch's default kernel)",
        "peft": "HF + peft, dynamic padding",
        "pad512": "HF + peft, pad to 512 (official-style)",
    }
    results = {}
    for impl in ("peft", "pad512", "ours-flinear", "ours"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run, args=(impl, cfg, args.batch_size, args.steps, queue))
        proc.start()
        results[impl] = queue.get()
        proc.join()
        print(f"{names[impl]}: {results[impl][0]:.0f} useful tokens/s", flush=True)
    ours = results["ours"][0]
    lines = ["| implementation | useful tokens/s | padding efficiency | peak RSS GiB | ours is |", "|---|---|---|---|---|"]
    for impl, (rate, eff, rss) in results.items():
        lines.append(f"| {names[impl]} | {rate:.0f} | {eff:.0%} | {rss:.2f} | {ours / rate:.2f}x |")
    out = f"{cfg.name}, fp32, batch {args.batch_size}, {args.steps} timed steps\n\n" + "\n".join(lines)
    print(out)
    if not args.no_save:
        append_results("Training (CPU, Alpaca-like lengths)", "python bench/train.py " + shlex.join(sys.argv[1:]), out)


if __name__ == "__main__":
    main()
