"""GPU benchmark: a LLaMA-7B-shaped model with random bf16 weights and a 10 x 30 adapter.

    python bench/gpu.py                         # on a CUDA machine; appends to bench/RESULTS.md
    python bench/gpu.py --small --device cpu    # the same code on a small config (a smoke run)

Measures batch-1 decode tokens/s (eager and compiled) against the HBM bound (weight bytes per
token over the copy bandwidth measured in the same run), prefill tokens/s, training tokens/s at the
paper's recipe with the projected Alpaca 52k x 5 epochs time, and int8 weight-only serving: peak
memory and logit deviation from bf16 on the same weights.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from collections.abc import Callable, Iterator

import torch
from common import alpaca_like, append_results, weight_bytes_per_token

from llama_adapter import AdapterConfig, ModelConfig, Transformer
from llama_adapter.model.build import build_model, meta_model
from llama_adapter.model.quantize import quantized_linear_names
from llama_adapter.options import parse_dtype
from llama_adapter.roles import Role, role_of
from llama_adapter.serve.engine import Decoder
from llama_adapter.train import make_optimizer, summed_nll
from llama_adapter.train.data import LengthGroupedBatches

ALPACA_EXAMPLES = 52_002
SHAPES = {
    "7b": (ModelConfig(max_seq_len=2048), AdapterConfig(adapter_len=10, adapter_layer=30)),
    "small": (ModelConfig(dim=512, n_layers=4, n_heads=8, max_seq_len=512), AdapterConfig(adapter_len=10, adapter_layer=2)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_weights(model: Transformer, device: torch.device, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random fp32 tensors, one at a time (the same seed gives the same model in any dtype)."""
    for i, (name, meta) in enumerate(model.state_dict().items()):
        g = torch.Generator(device).manual_seed(seed + i)
        if role_of(name) is Role.NORM:
            t = torch.ones(meta.shape, device=device)
        elif role_of(name) is Role.GATE:
            t = torch.rand(meta.shape, generator=g, device=device) * 0.5 + 0.25  # non-zero: the adapter is on
        else:
            t = torch.randn(meta.shape, generator=g, device=device) * 0.02
        yield name, t


def build(shape: str, dtype: torch.dtype, device: torch.device, quantize: str | None, seed: int = 0) -> Transformer:
    """The model as load() assembles it, from random weights made one tensor at a time (quantized as they come)."""
    args, adapter = SHAPES[shape]
    skeleton = meta_model(args, adapter, dtype)
    names = quantized_linear_names(skeleton) if quantize else []
    int8, int4 = (names, []) if quantize == "int8" else ([], names)
    return build_model(args, adapter, random_weights(skeleton, device, seed), dtype=dtype, device=device, int8=int8, int4=int4)


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    src = torch.ones(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * n_bytes / best


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decode(decoder: Decoder, prompt: list[int], n: int, device: torch.device) -> tuple[float, float]:
    """(time to first token, decode tokens/s after it), greedy."""
    sync(device)
    start = time.perf_counter()
    first = 0.0
    for i, _ in enumerate(decoder.steps([prompt], n, 0.0, 1.0, None)):
        if i == 0:
            first = time.perf_counter() - start
    sync(device)
    return first, (n - 1) / (time.perf_counter() - start - first)


def prefill_rate(model: Transformer, batch: int, length: int, device: torch.device) -> float:
    decoder = Decoder(model, 0)
    prompts = torch.randint(3, model.args.vocab_size, (batch, length)).tolist()
    seconds = min(timed(lambda: list(decoder.steps(prompts, 1, 0.0, 1.0, None)), device) for _ in range(3))
    return batch * length / seconds


def training_rate(model: Transformer, batch_size: int, steps: int, device: torch.device) -> tuple[float, float]:
    """The project's training step at the paper's recipe (frozen bf16 base, fp32 adapter, AdamW) on
    length-grouped Alpaca-like batches: (useful tokens/s, mean tokens per example)."""
    examples = alpaca_like(batch_size * (steps + 1) * 8, model.args.vocab_size)
    lengths = [e.input_len for e in examples]
    batches = LengthGroupedBatches(lengths, batch_size, seed=0, group_batches=8).epoch(0)[: steps + 1]
    params = model.adapter_parameters()
    initial = {n: p.detach().clone() for n, p in params.items()}  # restored below: later rows compare against this model
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    optimizer = make_optimizer(params, lr=9e-3 * batch_size / 256, weight_decay=0.02)

    def step(batch: list[int]) -> int:
        chosen = [examples[i] for i in batch]
        loss = summed_nll(model, chosen, 0, device, recompute=False) / sum(e.n_targets for e in chosen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(e.input_len for e in chosen)

    step(batches[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    tokens = sum(step(b) for b in batches[1:])
    sync(device)
    seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(initial[n])
    return tokens / seconds, sum(lengths) / len(lengths)


def logit_deviation(a: Transformer, b: Transformer, device: torch.device) -> tuple[float, float]:
    tokens = torch.randint(3, a.args.vocab_size, (1, 128), device=device, generator=torch.Generator(device).manual_seed(1))
    with torch.inference_mode():
        ref, got = a(tokens), b(tokens)
    diff = (got - ref).abs()
    return (diff.max() / ref.abs().max()).item(), (diff.mean() / ref.abs().mean()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a small config instead of 7B (smoke runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--train-batch", type=int, default=32, help="the paper's effective batch (4 per GPU x 8 GPUs)")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    shape = "small" if args.small else "7b"
    rows: list[tuple[str, str]] = []
    prompt = torch.randint(3, 32000, (args.prompt_len,)).tolist()

    model = build(shape, dtype, device, quantize=None)
    bw = copy_bandwidth(device, 1 << 32 if device.type == "cuda" else 1 << 28)
    bound = bw / weight_bytes_per_token(model)
    rows.append(("copy bandwidth", f"{bw / 1e9:.0f} GB/s"))
    rows.append(("decode bound (weights / bandwidth)", f"{bound:.0f} tok/s"))
    variants = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
    for label, compiled in variants:
        decoder = Decoder(model, 0, compile=compiled)
        decode(decoder, prompt, 8, device)  # warm-up (and compilation)
        ttft, rate = decode(decoder, prompt, args.new_tokens, device)
        rows.append((f"{args.dtype} decode, batch 1, {label}", f"{rate:.1f} tok/s ({rate / bound:.0%} of bound), TTFT {ttft * 1e3:.1f} ms"))
    for batch, length in ((1, min(1024, model.args.max_seq_len // 2)), (8, min(512, model.args.max_seq_len // 2))):
        rows.append((f"prefill, {batch} x {length} tokens", f"{prefill_rate(model, batch, length, device):,.0f} tok/s"))

    rate, mean_len = training_rate(model, args.train_batch, args.train_steps, device)
    hours = ALPACA_EXAMPLES * 5 * mean_len / rate / 3600
    adapter = SHAPES[shape][1]
    label = f"training, adapter {adapter.adapter_len} x {adapter.adapter_layer}, batch {args.train_batch}, Alpaca-like lengths"
    rows.append((label, f"{rate:,.0f} useful tok/s"))
    rows.append((f"projected Alpaca {ALPACA_EXAMPLES:,} x 5 epochs on this device", f"{hours:.2f} h"))

    del decoder  # the compiled one holds its own cache (and a reference cycle)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated()
    quant = build(shape, dtype, device, quantize="int8")
    if device.type == "cuda":
        load_peak = torch.cuda.max_memory_allocated() - base_memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    decoder = Decoder(quant, 0)
    decode(decoder, prompt, 8, device)
    ttft, rate = decode(decoder, prompt, args.new_tokens, device)
    rows.append(("int8 decode, batch 1, eager", f"{rate:.1f} tok/s, TTFT {ttft * 1e3:.1f} ms"))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_memory
        rows.append((f"int8 serving peak memory (weights + {model.args.max_seq_len}-token cache + activations)", f"{peak / 1e9:.2f} GB"))
        rows.append(("int8 loading peak memory (weights + quantisation temporaries)", f"{load_peak / 1e9:.2f} GB"))
    worst, mean = logit_deviation(model, quant, device)
    rows.append((f"int8 logits vs {args.dtype} (max / mean relative deviation)", f"{worst:.2%} / {mean:.2%}"))

    out = "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    print(out)
    if not args.no_save:
        title = f"GPU ({shape}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens)"
        append_results(title, "python bench/gpu.py " + shlex.join(sys.argv[1:]), out)


if __name__ == "__main__":
    main()
