"""CPU serving benchmark: a LLaMA-7B-shaped model with random weights in each weight format.

    python bench/cpu.py            # 7B shapes: bf16, int8 and int4 (fp32 when it fits); appends to bench/RESULTS.md
    python bench/cpu.py --small    # a small config, about a minute: a smoke run

The random weights are ``bench/gpu.py``'s (the same generator and seed), written once as a bf16
Meta checkpoint (``--workdir``, reused by later runs) so that every format is measured as a user
gets it: ``llama_adapter.load`` streaming the mmapped file tensor by tensor into ``build_model``.
Each format is measured in a fresh process.  Per format: load time and peak RSS while loading, serving RSS
between requests (the KV cache's pages are resident up to the longest context served, 512 + 1 positions; then
again with the whole 2048-position cache touched) and its peak while the prompts and tokens were computed
(the prompt path's dequantisation scratch and activations), each as anonymous memory / total (the difference is mapped checkpoint
pages: page cache the kernel can take back, and for bf16 the weights themselves, used in place),
time to first token for 128- and 512-token prompts, batch-1 decode
tokens/s against the memory-bandwidth bound (bytes read per token over the copy bandwidth
measured just before), and the logits of a 128-token prompt against fp32, plus greedy agreement
with fp32 over 64 tokens.  The fp32 reference streams the checkpoint layer by layer, so it needs
no fp32 model in memory.

Then the decode rounds: the quantized formats loaded together in one process, each decoding 64 tokens after the
128-token prompt in turn (and llama.cpp's quantization of the same width after as many cached positions, with
``--llama-cpp``), five times over.  This VM's memory bandwidth moves by a third from one minute to the next, so
the per-format table compares numbers from different minutes; the rounds' ratios are the comparison to read.  Each
of our decodes in a round also gets its own bandwidth bound, from copies just before and just after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import append_results, copy_bandwidth
from gpu import SHAPES, random_weights
from llama_cpp import check_peer, decode_rate, gguf_model, peer_rows

import llama_adapter
from llama_adapter.model import kernels
from llama_adapter.model.build import meta_model
from llama_adapter.model.llama import Block, RMSNorm, rope_tables
from llama_adapter.serve.engine import Decoder
from llama_adapter.serve.formats import LOADING_BYTES, GiB, available_memory, serving_bytes
from llama_adapter.tiny import train_tokenizer

FORMATS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (None, "int8"), "int4": (None, "int4")}
PEERS = {"int8": "Q8_0", "int4": "Q4_0"}  # llama.cpp's quantization of the same bit width
ROUNDS = 5  # decode rounds (``decode_rounds``)
OF_BOUND = "of bound"  # a decode rounds column: tokens/s over the bandwidth bound


def write_checkpoint(shape: str, out: Path) -> Path:
    """gpu.py's random weights as a bf16 Meta checkpoint, made one tensor at a time through file-backed buffers."""
    args, _ = SHAPES[shape]
    if (out / "params.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    state = {}
    for i, (name, t) in enumerate(random_weights(meta_model(args, None, torch.bfloat16), torch.device("cpu"), seed=0)):
        # Page-cache backed, so the whole model never has to sit in anonymous memory before it is saved.
        buf = torch.from_file(str(raw / f"{i}.bin"), shared=True, size=t.numel(), dtype=torch.bfloat16)
        state[name] = buf.view(t.shape).copy_(t)
    torch.save(state, out / "consolidated.00.pth")
    del state
    shutil.rmtree(raw)
    train_tokenizer(out)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "vocab_size": args.vocab_size}
    (out / "params.json").write_text(json.dumps(params | {"multiple_of": args.multiple_of, "norm_eps": args.norm_eps}))
    return out


def rss() -> tuple[int, int]:
    """(anonymous, total) resident bytes; the rest of the total is file-backed: mapped checkpoint pages."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
            fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    return fields["RssAnon"], sum(fields.values())


class PeakRss:
    """Samples ``rss()`` every 20 ms in a thread while the block runs; ``.anon`` and ``.total`` are the peaks."""

    def __enter__(self) -> PeakRss:
        self.anon, self.total = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            anon, total = rss()
            self.anon, self.total = max(self.anon, anon), max(self.total, total)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bytes_per_token(model: torch.nn.Module) -> int:
    """What one decode step reads: every weight tensor (quantized ones included) but the embedding table and the prompts."""
    skip = ("tok_embeddings.weight", "adapter_query.weight")
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in skip) + model.args.dim * 2


def greedy(decoder: Decoder, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(time to first token, decode tokens/s after it, the n greedy tokens)."""
    start = time.perf_counter()
    tokens, first = [], 0.0
    for i, step in enumerate(decoder.steps([prompt], n, 0.0, 1.0, None)):
        if i == 0:
            first = time.perf_counter() - start
        tokens.append(step[0])
    return first, (n - 1) / (time.perf_counter() - start - first), tokens


@torch.inference_mode()
def fp32_reference(ckpt: Path, args: llama_adapter.ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, T, V] of the checkpoint, one layer in fp32 at a time."""
    sd = torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
    t = tokens.shape[1]
    cos, sin = (x[None, :t] for x in rope_tables(args.head_dim, args.max_seq_len, args.rope_theta))
    h = F.embedding(tokens, sd["tok_embeddings.weight"].float())
    for i in range(args.n_layers):
        with torch.device("meta"):
            block = Block(args, i, adapted=False)
        prefix = f"layers.{i}."
        block.load_state_dict({k.removeprefix(prefix): v.float() for k, v in sd.items() if k.startswith(prefix)}, assign=True)
        h = block(h, cos, sin, None, None)
    norm = RMSNorm(args.dim, args.norm_eps)
    norm.weight.data = sd["norm.weight"].float()
    return F.linear(norm(h), sd["output.weight"].float()).float()


def measure(name: str, ckpt: Path, args: llama_adapter.ModelConfig, prompts: dict[int, list[int]], new_tokens: int) -> dict:
    dtype, quantize = FORMATS[name]
    gc.collect()
    start = time.perf_counter()
    with PeakRss() as load_peak:
        base = llama_adapter.load(ckpt, device="cpu", dtype=dtype, quantize=quantize, max_seq_len=args.max_seq_len)
    load_s = time.perf_counter() - start
    adapter = SHAPES["7b" if args.dim == 4096 else "small"][1]
    pipe = base.with_adapter(adapter)  # a fresh 10 x 30 adapter on the same tensors: its work is timed, its zero gates change nothing
    decoder = Decoder(pipe.model, 0)
    greedy(decoder, prompts[128][:8], 2)  # warm-up; allocates the KV cache
    with PeakRss() as long_prompt:
        ttft512 = greedy(decoder, prompts[512], 1)[0]
    bw = copy_bandwidth()  # (its buffers are outside the peaks)
    with PeakRss() as short_prompt:
        ttft128, rate, tokens = greedy(decoder, prompts[128], new_tokens)
    bound = bw / bytes_per_token(pipe.model)
    serving = rss()  # between requests: weights, the cache as far as the longest context served, the runtime
    serving_peak = max(long_prompt.anon, short_prompt.anon)  # while prompts are prefilled and tokens decoded
    with torch.inference_mode():  # the cache was made in inference mode
        for t in (*decoder.cache_slot._cache.k, *decoder.cache_slot._cache.v):  # the longest context the model takes
            t.zero_()
    full_context = rss()
    with torch.inference_mode():  # all 128 positions' logits: not a serving step, so measured after the footprint
        logits = pipe.model(torch.tensor([prompts[128]])).float()[0]
    row = dict(
        format=name,
        weights=llama_adapter.model.quantize.weight_format(pipe.model),
        plan=kernels.PLAN.describe(pipe.dtype, quantize),
        load_s=load_s,
        load_peak=(load_peak.anon, load_peak.total),
        serving=serving,
        serving_peak=serving_peak,
        full_context=full_context,
        ttft128=ttft128,
        ttft512=ttft512,
        decode=rate,
        bound=bound,
        bw=bw,
        tokens=tokens,
        logits=logits,
    )
    del pipe, base, decoder
    gc.collect()
    return row


def measure_in_child(name: str, argv: list[str], workdir: Path) -> dict:
    """``measure`` in a fresh process: no format's memory figures include what an earlier one left in the allocator."""
    out = workdir / f"result-{name}.pt"
    subprocess.run([sys.executable, __file__, *argv, "--child", name, "--child-out", str(out)], check=True)
    row = torch.load(out, weights_only=True)
    out.unlink()
    return row


def decode_rounds(
    ckpt: Path, args: llama_adapter.ModelConfig, prompt: list[int], new_tokens: int, names: list[str], peer: Path | None
) -> list[dict]:
    """Decode tokens/s after ``prompt`` of each quantized format in ``names`` (all loaded at once), and of llama.cpp's
    quantization of the same width after as many cached positions when ``peer`` is given, alternating in ROUNDS
    rounds: the ratios within a round compare the same minute of the machine (this VM's memory bandwidth moves by a
    third between minutes, more than the differences measured)."""
    decoders, weight_bytes = {}, {}
    for name in names:
        base = llama_adapter.load(ckpt, device="cpu", quantize=name, max_seq_len=args.max_seq_len)
        decoders[name] = Decoder(base.model, 0)
        weight_bytes[name] = bytes_per_token(base.model)
        greedy(decoders[name], prompt[:8], 2)  # warm-up; allocates the KV cache
    threads, rounds = torch.get_num_threads(), []
    for _ in range(ROUNDS):
        rates = {}
        for name, decoder in decoders.items():
            before = copy_bandwidth()
            rates[name] = greedy(decoder, prompt, new_tokens)[1]
            # The bound from copies just before and just after: one copy alone may fall in another minute than the decode.
            rates[f"{name} {OF_BOUND}"] = rates[name] * weight_bytes[name] * 2 / (before + copy_bandwidth())
            if peer is not None:
                model = gguf_model(peer, ckpt, PEERS[name])
                rates[PEERS[name]] = decode_rate(peer, model, threads, new_tokens, depth=len(prompt))
        rounds.append(rates)
    return rounds


def rounds_table(rounds: list[dict]) -> list[str]:
    """One row per round and a row of medians: tokens/s, ours over llama.cpp's, int4 over int8 (where measured), ours
    against the bandwidth bound."""
    columns = [(k, f"{k} tok/s") for k in rounds[0] if not k.endswith(OF_BOUND)]
    bounds = [k for k in rounds[0] if k.endswith(OF_BOUND)]
    ratios = [(a, b) for a, b in PEERS.items() if a in rounds[0] and b in rounds[0]]
    if "int8" in rounds[0] and "int4" in rounds[0]:
        ratios.append(("int4", "int8"))
    head = [title.replace("Q", "llama.cpp Q", 1) if key in PEERS.values() else title for key, title in columns]
    titles = head + [f"{a} / {b}" for a, b in ratios] + bounds
    lines = ["| round | " + " | ".join(titles) + " |", "|---" * (1 + len(titles)) + "|"]
    for i, r in enumerate(rounds, 1):
        cells = [f"{r[k]:.2f}" for k, _ in columns] + [f"{r[a] / r[b]:.2f}x" for a, b in ratios] + [f"{r[k]:.0%}" for k in bounds]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    median = [torch.tensor([r[k] for r in rounds]).median().item() for k, _ in columns]
    median_ratio = [torch.tensor([r[a] / r[b] for r in rounds]).median().item() for a, b in ratios]
    median_bound = [torch.tensor([r[k] for r in rounds]).median().item() for k in bounds]
    cells = [f"{v:.2f}" for v in median] + [f"**{v:.2f}x**" for v in median_ratio] + [f"**{v:.0%}**" for v in median_bound]
    lines.append("| median | " + " | ".join(cells) + " |")
    return lines


def clip_rows() -> list[str]:
    """CLIP ViT-L/14's image tower (random weights, OpenAI's architecture) on one 224 px image, fp32 against bf16."""
    import open_clip

    tower = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True).visual.eval()
    image = torch.randn(1, 3, 224, 224)
    out = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            tower.to(dtype)
            x = image.to(dtype)
            tower(x)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                out[dtype] = tower(x).float()
                times.append(time.perf_counter() - start)
            out[dtype, "s"] = sorted(times)[1]
    diff = (out[torch.bfloat16] - out[torch.float32]).abs()
    ref = out[torch.float32].abs()
    dev = f"{(diff.max() / ref.max()).item():.2%} max, {(diff.mean() / ref.mean()).item():.2%} mean"
    cos = F.cosine_similarity(out[torch.bfloat16], out[torch.float32]).min().item()
    return [
        "| CLIP ViT-L/14 image encoding | seconds per image |",
        "|---|---|",
        f"| fp32 | {out[torch.float32, 's']:.2f} |",
        f"| bf16 | {out[torch.bfloat16, 's']:.2f} (deviation from fp32: {dev}; cosine {cos:.4f}) |",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a small config instead of 7B (smoke runs, about a minute)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llama_adapter_bench_cpu"))
    p.add_argument("--clip", action="store_true", help="only time CLIP ViT-L/14's image encoding, fp32 against bf16")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", choices=[*FORMATS, "rounds"], help=argparse.SUPPRESS)  # measure one format, in its own process
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="llama.cpp's build/bin (llama-bench, llama-quantize): the peer's rows, see bench/llama_cpp.py",
    )
    args_ns = p.parse_args()
    if args_ns.clip:
        out = "\n".join(clip_rows())
        print(out)
        if not args_ns.no_save:
            append_results("CPU: CLIP ViT-L/14 image encoding, fp32 and bf16", "python bench/cpu.py " + shlex.join(sys.argv[1:]), out)
        return
    shape = "small" if args_ns.small else "7b"
    torch.manual_seed(0)
    start = time.perf_counter()
    ckpt = write_checkpoint(shape, args_ns.workdir / shape)
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    args = dataclasses.replace(SHAPES[shape][0], max_seq_len=2048)  # LLaMA's context, for the small config too
    vocab = args.vocab_size
    prompts = {n: torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (128, 512)}

    n = args_ns.new_tokens
    quantized = [name for name in args_ns.formats if name in PEERS]
    if args_ns.llama_cpp is not None and args_ns.child is None:
        check_peer(args_ns.llama_cpp, ckpt, torch.get_num_threads())
    if args_ns.child == "rounds":
        torch.save(decode_rounds(ckpt, args, prompts[128], n, quantized, args_ns.llama_cpp), args_ns.child_out)
        return
    if args_ns.child:
        torch.save(measure(args_ns.child, ckpt, args, prompts, n), args_ns.child_out)
        return
    lines = [
        "| format | weights | load s | peak RSS loading, anon / total GiB | serving RSS, anon / total GiB "
        "| peak anon while serving GiB | anon with a full 2048 context GiB | TTFT 128 s | TTFT 512 s | prefill tok/s (512) "
        "| decode tok/s | bound tok/s "
        f"| of bound | logits vs fp32, max / mean | greedy agreement, {n} tokens |",
        "|---" * 15 + "|",
    ]
    rows, notes = [], []
    for name in args_ns.formats:
        dtype, quantize = FORMATS[name]
        need = serving_bytes(args, dtype or torch.bfloat16, quantize) + LOADING_BYTES
        free, source = available_memory()
        if need > free:
            why = f"it needs {need / GiB:.1f} GiB with its loading overshoot, {free / GiB:.1f} GiB is free ({source})"
            notes.append(f"{name} skipped: {why}")
            continue
        child_argv = ["--workdir", str(args_ns.workdir), "--new-tokens", str(n), *(["--small"] if args_ns.small else [])]
        r = measure_in_child(name, child_argv, args_ns.workdir)
        # Against fp32: the prompt's logits, and fp32's greedy choice after each generated token.
        ref = fp32_reference(ckpt, args, torch.tensor([prompts[128] + r["tokens"][:-1]]))[0]
        want = ref[:128]
        diff = (r["logits"] - want).abs()
        dev = f"{(diff.max() / want.abs().max()).item():.2%} / {(diff.mean() / want.abs().mean()).item():.2%}"
        agree = (ref[127 : 127 + len(r["tokens"])].argmax(-1) == torch.tensor(r["tokens"])).float().mean().item()
        rows.append(r)
        peak, serving = r["load_peak"], r["serving"]
        lines.append(
            f"| {name} | {r['weights']} | {r['load_s']:.0f} | {peak[0] / GiB:.2f} / {peak[1] / GiB:.2f} "
            f"| {serving[0] / GiB:.2f} / {serving[1] / GiB:.2f} | {r['serving_peak'] / GiB:.2f} | {r['full_context'][0] / GiB:.2f} "
            f"| {r['ttft128']:.2f} | {r['ttft512']:.2f} | {512 / r['ttft512']:.1f} | {r['decode']:.2f} | {r['bound']:.2f} "
            f"| {r['decode'] / r['bound']:.0%} | {dev} | {agree:.0%} |"
        )
        print(lines[-1], f"({r['plan']})", file=sys.stderr, flush=True)  # each format as soon as it is measured

    if args_ns.llama_cpp is not None:
        bw, threads = copy_bandwidth(), torch.get_num_threads()
        lines += peer_rows(args_ns.llama_cpp, ckpt, threads, bw)
        notes.append(f"llama.cpp: same weights as GGUF, `llama-bench -t {threads} -p 128,512 -n 64`; copy bandwidth {bw / 1e9:.1f} GB/s")
        print("\n".join(lines[-2:]), file=sys.stderr, flush=True)
    notes += [f"{r['format']} kernels: {r['plan']}; copy bandwidth before decoding {r['bw'] / 1e9:.1f} GB/s" for r in rows]
    rounds: list[str] = []
    need = sum(serving_bytes(args, torch.bfloat16, name) for name in quantized) + LOADING_BYTES
    if quantized and need > available_memory()[0]:
        notes.append(f"decode rounds skipped: {', '.join(quantized)} together need {need / GiB:.1f} GiB")
    elif quantized:
        child_argv = ["--workdir", str(args_ns.workdir), "--new-tokens", str(n), "--formats", *quantized]
        child_argv += ["--small"] if args_ns.small else []
        child_argv += ["--llama-cpp", str(args_ns.llama_cpp)] if args_ns.llama_cpp is not None else []
        rounds = ["", f"Decode rounds: {n} tokens after 128 cached positions, formats alternating in one process, {ROUNDS} rounds", ""]
        rounds += rounds_table(measure_in_child("rounds", child_argv, args_ns.workdir))
        print("\n".join(rounds), file=sys.stderr, flush=True)
    out = "\n".join(lines + [""] + [f"- {n}" for n in notes] + rounds)
    print(out)
    if not args_ns.no_save:
        title = f"CPU serving formats ({shape}, 2-thread VM, {args_ns.new_tokens} new tokens, prompts of 128 and 512)"
        append_results(title, "python bench/cpu.py " + shlex.join(sys.argv[1:]), out)


if __name__ == "__main__":
    main()
