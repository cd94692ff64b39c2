"""Decode speed: this project vs Hugging Face transformers + peft AdaptionPrompt, same weights, same prompts.

    python bench/decode.py [--configs d1024 d2048] [--new-tokens 64] [--batches 1 4 16]

Prints a table and appends it to bench/RESULTS.md.  Batch-1 tokens/s excludes the first token
(time to first token, TTFT, is its own column).  The bandwidth bound is the weight bytes one
decode step must read divided by the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
from common import BenchConfig, add_peft_adapter, append_results, copy_bandwidth, make_hf_llama, ours_from_hf, weight_bytes_per_token

from llama_adapter.model import kernels
from llama_adapter.options import parse_dtype
from llama_adapter.serve.engine import Decoder

CONFIGS = {
    "d1024": BenchConfig("d1024 / 8 layers / 16 heads", 1024, 8, 16),
    "d2048": BenchConfig("d2048 / 16 layers / 16 heads", 2048, 16, 16),
}


def ours_run(decoder: Decoder, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float, float]:
    """Greedy tokens, time to first token, total time."""
    start = time.perf_counter()
    first = 0.0
    out: list[list[int]] = []
    for i, step in enumerate(decoder.steps(prompts, n, 0.0, 1.0, None)):
        if i == 0:
            first = time.perf_counter() - start
        out.append(step)
    return [list(col) for col in zip(*out, strict=True)], first, time.perf_counter() - start


@torch.inference_mode()
def hf_run(model, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :].tolist(), time.perf_counter() - start


@torch.inference_mode()
def gemv_ceiling(model, repeats: int) -> float:
    """Tokens/s if a decode step were nothing but its matrix-vector products (the model's own Linear modules, batch 1)."""
    layers = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (name.startswith("layers.") or name == "output")]
    inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in layers]

    def step() -> float:
        start = time.perf_counter()
        for x, m in zip(inputs, layers, strict=True):
            m(x)
        return time.perf_counter() - start

    step()
    return 1 / min(step() for _ in range(max(repeats, 3)))


def torch_default_kernel():
    """Our model with F.linear (MKL for fp32 on CPU), to separate the kernel's share of the speed-up from the rest."""
    return kernels.using(fp32_onednn=False)


def best(fn, repeats: int):
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: r[-1])


def bench_config(
    cfg: BenchConfig, dtype: torch.dtype, n: int, prompt_len: int, batches: list[int], repeats: int, bw: float
) -> list[list[str]]:
    rows = []
    hf = make_hf_llama(cfg, dtype)
    hf.generation_config.eos_token_id = None  # never stop early: every implementation decodes n tokens
    g = torch.Generator().manual_seed(0)

    def prompts(b: int) -> list[list[int]]:
        return torch.randint(3, cfg.vocab_size, (b, prompt_len), generator=g).tolist()

    p1 = prompts(1)
    # Plain HF first (no adapter), then wrap the same model with peft.
    _, hf_ttft = best(lambda: hf_run(hf, p1, 1), repeats)
    _, hf_total = best(lambda: hf_run(hf, p1, n), repeats)
    hf_plain = (n - 1) / (hf_total - hf_ttft)

    peft = add_peft_adapter(hf, cfg)
    peft.generation_config.eos_token_id = None
    ours = ours_from_hf(peft, cfg, dtype)
    decoder = Decoder(ours, pad_id=0)
    ours_tokens, _, _ = ours_run(decoder, p1, n)
    peft_tokens, _ = hf_run(peft, p1, n)
    same = ours_tokens == peft_tokens
    if not same:
        agree = next((i for i, (a, b) in enumerate(zip(ours_tokens[0], peft_tokens[0], strict=True)) if a != b), n)
        print(f"warning: greedy tokens differ from peft after {agree} of {n} tokens", file=sys.stderr)

    _, peft_ttft = best(lambda: hf_run(peft, p1, 1), repeats)
    _, peft_total = best(lambda: hf_run(peft, p1, n), repeats)
    peft_tps = (n - 1) / (peft_total - peft_ttft)
    _, ours_ttft, ours_total = best(lambda: ours_run(decoder, p1, n), repeats)
    ours_tps = (n - 1) / (ours_total - ours_ttft)
    with torch_default_kernel():
        _, mkl_ttft, mkl_total = best(lambda: ours_run(decoder, p1, n), repeats)
    mkl_tps = (n - 1) / (mkl_total - mkl_ttft)
    bound = bw / weight_bytes_per_token(ours)
    ceiling = gemv_ceiling(ours, repeats)

    rows.append([cfg.name, "1", "HF Llama (no adapter)", f"{hf_plain:.1f}", f"{hf_ttft * 1e3:.0f}", "", ""])
    rows.append(
        [cfg.name, "1", "HF + peft AdaptionPrompt", f"{peft_tps:.1f}", f"{peft_ttft * 1e3:.0f}", f"{peft_tps / bound:.0%}", "1.00x"]
    )
    rows.append(
        [
            cfg.name,
            "1",
            "llama_adapter (ours)",
            f"{ours_tps:.1f}",
            f"{ours_ttft * 1e3:.0f}",
            f"{ours_tps / bound:.0%}",
            f"{ours_tps / peft_tps:.2f}x",
        ]
    )
    rows.append(
        [
            cfg.name,
            "1",
            "ours with F.linear (torch's default kernel)",
            f"{mkl_tps:.1f}",
            f"{mkl_ttft * 1e3:.0f}",
            f"{mkl_tps / bound:.0%}",
            f"{mkl_tps / peft_tps:.2f}x",
        ]
    )
    rows.append([cfg.name, "1", "matrix-vector products only (our Linear)", f"{ceiling:.1f}", "", f"{ceiling / bound:.0%}", ""])
    rows.append([cfg.name, "1", "bandwidth bound", f"{bound:.1f}", "", "100%", ""])
    for b in batches:
        if b == 1:
            continue
        pb = prompts(b)
        _, peft_b = best(lambda pb=pb: hf_run(peft, pb, n), repeats)
        _, _, ours_b = best(lambda pb=pb: ours_run(decoder, pb, n), repeats)
        rows.append([cfg.name, str(b), "HF + peft AdaptionPrompt", f"{b * n / peft_b:.1f}", "", "", "1.00x"])
        rows.append([cfg.name, str(b), "llama_adapter (ours)", f"{b * n / ours_b:.1f}", "", "", f"{peft_b / ours_b:.2f}x"])
    print(f"{cfg.name}: greedy tokens identical to peft: {same}")
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["config", "batch", "implementation", "tokens/s", "TTFT ms", "of bound", "vs peft"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s, threads: {torch.get_num_threads()}")
    rows = []
    for name in args.configs:
        rows += bench_config(CONFIGS[name], dtype, args.new_tokens, args.prompt_len, args.batches, args.repeats, bw)
    out = table(rows)
    print(out)
    if not args.no_save:
        command = "python bench/decode.py " + shlex.join(sys.argv[1:])
        append_results(f"Decode ({args.dtype}, {args.new_tokens} new tokens, copy bandwidth {bw / 1e9:.1f} GB/s)", command, out)


if __name__ == "__main__":
    main()
