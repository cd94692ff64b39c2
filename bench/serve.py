"""Serving many users: continuous batching against serving one stream at a time, same weights, same prompts.

    python bench/serve.py [--configs d1024 d2048] [--streams 1 2 4 8 16] [--new-tokens 128] [--join-len 1000]

For N concurrent greedy streams (each its own thread reading a ``Pipeline``-style row handle of the
scheduler) it measures the aggregate decode tokens/s while all N decode, and each stream's median and
p95 time between tokens.  The peer is the one-at-a-time server (the app before batching): it serves N streams at the
lone stream's rate, so "vs one at a time" is the aggregate over the 1-stream figure.  Then a
``--join-len``-token prompt joins 4 running streams: the longest (and p95) gap those streams see while
it is prefilled, against their median gap over 40 steps before it came; the longest gap of those 40
steps is printed too, as the machine's own noise.  Peak RSS is read after the 16-stream run, with
the KV cache those rows hold next to what 16 preallocated full contexts would take.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import shlex
import statistics
import sys
import threading
import time

import torch
from common import BenchConfig, append_results

from llama_adapter import AdapterConfig, Transformer
from llama_adapter.model.build import build_model, meta_model
from llama_adapter.model.probe import probe_kernels
from llama_adapter.model.quantize import quantized_linear_names
from llama_adapter.roles import Role, role_of
from llama_adapter.serve.scheduler import Limits, Row, RowHandle, Scheduler, kv_bytes_per_token
from llama_adapter.threads import in_passing_thread

CONFIGS = {
    "d1024": BenchConfig("d1024 / 8 layers / 16 heads", 1024, 8, 16),
    "d2048": BenchConfig("d2048 / 16 layers / 16 heads", 2048, 16, 16),
}
MAX_SEQ_LEN = 2048
JOIN_STREAMS = 4
CONTROL_STEPS = 40


@in_passing_thread  # as load() builds: no OpenMP pool left in the main thread (llama_adapter/threads.py)
def random_model(cfg: BenchConfig, quantize: str | None, seed: int = 0) -> Transformer:
    """Random weights and a prompt-only adapter (10 tokens in every layer, non-zero gates), tensor by tensor: fp32, or
    with ``quantize`` weight-only int8 / int4 in bf16 activations, as ``load()`` serves them on a CPU."""
    args = cfg.model_args(MAX_SEQ_LEN)
    adapter = AdapterConfig(adapter_len=cfg.adapter_len, adapter_layer=cfg.adapted_layers)
    dtype = torch.bfloat16 if quantize else torch.float32
    skeleton = meta_model(args, adapter, dtype)
    names = quantized_linear_names(skeleton) if quantize else []
    probe_kernels(args, dtype, quantize)  # the CPU kernels load() would choose for this model (before: int4's layout)

    def tensors():
        for i, (name, meta) in enumerate(skeleton.state_dict().items()):
            g = torch.Generator().manual_seed(seed + i)
            if role_of(name) is Role.NORM:
                yield name, torch.ones(meta.shape)
            elif role_of(name) is Role.GATE:
                yield name, torch.rand(meta.shape, generator=g) * 0.5 + 0.25
            else:
                yield name, torch.randn(meta.shape, generator=g) * 0.02

    int8, int4 = (names, []) if quantize == "int8" else ([], names)
    return build_model(args, adapter, tensors(), dtype=dtype, device=torch.device("cpu"), int8=int8, int4=int4)


@in_passing_thread  # as Pipeline does: no OpenMP pool in the caller's thread
def adapter_kv(model: Transformer) -> list:
    with torch.inference_mode():
        return model.adapter_kv()


def submit(scheduler: Scheduler, model: Transformer, prompt: list[int], n: int) -> RowHandle:
    return scheduler.submit(Row(prompt, model, adapter_kv(model), n, 0.0, 1.0, None))


def read_all(handles: list[RowHandle], stop_when: threading.Event | None = None) -> list[list[float]]:
    """Each handle read in its own thread; the time each token arrived.  ``stop_when`` set: close them all."""
    times: list[list[float]] = [[] for _ in handles]

    def read(i: int) -> None:
        for _ in handles[i]:
            times[i].append(time.perf_counter())
            if stop_when is not None and stop_when.is_set():
                handles[i].close()
                return

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def p95(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def concurrent(scheduler: Scheduler, model: Transformer, prompts: list[list[int]], n: int) -> tuple[float, float, float]:
    """Aggregate decode tokens/s while all the streams decode (from the last one's first token to the first
    one's last: admission, one prefill at a time, staggers them), median of the streams' median gaps, worst p95 gap."""
    handles = [submit(scheduler, model, p, n) for p in prompts]
    times = read_all(handles)
    start = max(t[0] for t in times)
    end = min(t[-1] for t in times)
    if end <= start:
        raise SystemExit(f"{len(prompts)} streams never all decoded at once: raise --new-tokens above {n}")
    after = sum(1 for t in times for s in t if start < s <= end)
    per_stream = [gaps(t) for t in times]
    return after / (end - start), statistics.median(statistics.median(g) for g in per_stream), max(p95(g) for g in per_stream)


def join(scheduler: Scheduler, model: Transformer, prompts: list[list[int]], long_prompt: list[int]) -> dict[str, float]:
    """Running streams' gaps over a stretch of ``CONTROL_STEPS`` steps with nobody joining (the reference, and
    the machine's own noise), then while a long prompt joins; and the newcomer's time to first token."""
    done = threading.Event()
    handles = [submit(scheduler, model, p, MAX_SEQ_LEN - len(p)) for p in prompts]
    result: list[list[list[float]]] = []
    reader = threading.Thread(target=lambda: result.append(read_all(handles, done)))
    reader.start()
    started = scheduler.steps
    while scheduler.steps < started + 4:  # every stream is decoding
        time.sleep(0.005)
    control_start = time.perf_counter()
    while scheduler.steps < started + 4 + CONTROL_STEPS:
        time.sleep(0.005)
    joined = time.perf_counter()
    long = submit(scheduler, model, long_prompt, 1)
    next(long)
    first_token = time.perf_counter()
    long.close()
    done.set()
    reader.join()
    (times,) = result
    # Every gap that overlaps the window, including the one that spans its start or its end.
    control = [b - a for t in times for a, b in itertools.pairwise(t) if b > control_start and a < joined]
    during = [b - a for t in times for a, b in itertools.pairwise(t) if b > joined and a < first_token]
    return {
        "median": statistics.median(control),
        "control_max": max(control),
        "during_max": max(during),
        "during_p95": p95(during),
        "ttft": first_token - joined,
    }


def bench_config(
    cfg: BenchConfig, streams: list[int], n: int, prompt_len: int, join_len: int, quantize: str | None
) -> tuple[list[list[str]], list[str]]:
    model = random_model(cfg, quantize)
    scheduler = Scheduler(model, eos_id=-1, limits=Limits(max_rows=max(streams), max_cached_tokens=max(streams) * MAX_SEQ_LEN))
    g = torch.Generator().manual_seed(1)

    def prompts(k: int, length: int = prompt_len) -> list[list[int]]:
        return torch.randint(3, cfg.vocab_size, (k, length), generator=g).tolist()

    concurrent(scheduler, model, prompts(2), 16)  # warm up
    rows = []
    lone_rate = lone_gap = 0.0
    for k in streams:
        rate, median_gap, worst_p95 = concurrent(scheduler, model, prompts(k), n)
        if k == 1:
            lone_rate, lone_gap = rate, median_gap
        rows.append(
            [
                cfg.name,
                str(k),
                f"{rate:.1f}",
                f"{rate / lone_rate:.2f}x",
                f"{median_gap * 1e3:.0f}",
                f"{median_gap / lone_gap:.2f}x",
                f"{worst_p95 * 1e3:.0f}",
            ]
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    per_token = kv_bytes_per_token(model)
    admitted = max(streams) * (prompt_len + n) * per_token / 2**20
    full = max(streams) * MAX_SEQ_LEN * per_token / 2**20
    memory = (
        f"{cfg.name}: peak RSS after {max(streams)} streams {rss:.2f} GiB; "
        f"their KV cache {admitted:.0f} MiB (preallocated full contexts: {full:.0f} MiB)"
    )
    j = join(scheduler, model, prompts(JOIN_STREAMS), prompts(1, join_len)[0])
    joining = (
        f"{cfg.name}: {join_len}-token prompt joining {JOIN_STREAMS} streams. Before, over {CONTROL_STEPS} steps: median gap "
        f"{j['median'] * 1e3:.0f} ms, longest {j['control_max'] * 1e3:.0f} ms ({j['control_max'] / j['median']:.1f}x). "
        f"While it was prefilled: longest gap {j['during_max'] * 1e3:.0f} ms ({j['during_max'] / j['median']:.1f}x the median), "
        f"p95 {j['during_p95'] * 1e3:.0f} ms ({j['during_p95'] / j['median']:.1f}x); its first token after {j['ttft']:.1f} s"
    )
    print(memory, joining, sep="\n")
    return rows, [memory, joining]


def table(rows: list[list[str]]) -> str:
    head = ["config", "streams", "aggregate tok/s", "vs one at a time", "median gap ms", "vs lone stream", "worst p95 gap ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--join-len", type=int, default=1000)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only, bf16 activations (default: fp32)")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if 1 not in args.streams:
        p.error("--streams must include 1: the lone stream is the reference")
    print(f"threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f}")
    rows, notes = [], []
    for name in args.configs:
        r, n = bench_config(CONFIGS[name], sorted(args.streams), args.new_tokens, args.prompt_len, args.join_len, args.quantize)
        rows += r
        notes += n
    out = table(rows) + "\n\n" + "\n".join(f"- {line}" for line in notes)
    print(out)
    if not args.no_save:
        command = "python bench/serve.py " + shlex.join(sys.argv[1:])
        weights = f"{args.quantize} weight-only, bf16 activations" if args.quantize else "fp32"
        append_results(f"Serving concurrent streams ({weights}, {args.new_tokens} new tokens each, continuous batching)", command, out)


if __name__ == "__main__":
    main()
