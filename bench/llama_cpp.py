"""The bench-only peer for ``bench/cpu.py --llama-cpp DIR``: llama.cpp's ``llama-bench`` on the same random 7B.

Never a dependency or a test.  Build the two tools from the source that the registry's llama-cpp-python
sdist vendors (nothing is downloaded at build time), and install the ``gguf`` writer:

    pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build -j --target llama-bench llama-quantize
    pip install gguf

then pass ``--llama-cpp .../build/bin``.  On a CPU with AMX, build without llama.cpp's AMX backend: the one
vendored by llama-cpp-python 0.3.36 crashed on this project's Xeon VM as soon as a prompt was processed (SIGILL
on Q8_0, SIGSEGV in ``ggml_backend_amx_mul_mat`` on Q4_0), where torch's oneDNN uses AMX without trouble.  Add to the first cmake line

    -DCMAKE_C_FLAGS="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16" -DCMAKE_CXX_FLAGS="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16"

(everything else stays ``-march=native``: its AVX-512 VNNI kernels and weight repacking).  ``check_peer`` tries the
build on both quantizations before the benchmark starts, so that a crash stops it at once, with this advice.

The bf16 Meta checkpoint that ``bench/cpu.py`` measures is written as an F16 GGUF (Meta's q/k row order is the one
llama.cpp's "llama" RoPE expects, and its tokenizer.model gives the vocabulary), quantized by ``llama-quantize`` to
Q8_0 and Q4_0, and each is run by ``llama-bench -t THREADS -p 128,512 -n 64``; the decode rounds then run
``-p 0 -n 64 -d 128 -r 1`` (64 tokens after 128 cached positions, as ours decode after a 128-token prompt), alternating with ours.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

# Meta checkpoint names -> GGUF names (llama.cpp's "llama" architecture).
LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}
QUANTS = ("Q8_0", "Q4_0")


def gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def write_gguf(ckpt: Path, out: Path) -> Path:
    """The Meta checkpoint ``ckpt`` (params.json, consolidated.00.pth, tokenizer.model) as an F16 GGUF, tensor by tensor."""
    if out.is_file():
        return out
    import gguf  # bench-only: pip install gguf
    import sentencepiece as spm

    params = json.loads((ckpt / "params.json").read_text())
    dim, n_heads = params["dim"], params["n_heads"]
    state = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", mmap=True, weights_only=True)
    ffn = state["layers.0.feed_forward.w1.weight"].shape[0]
    writer = gguf.GGUFWriter(out.with_suffix(".part"), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(dim)
    writer.add_block_count(params["n_layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(params.get("n_kv_heads") or n_heads)
    writer.add_rope_dimension_count(dim // n_heads)
    writer.add_layer_norm_rms_eps(params["norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(params["vocab_size"]):
        if i < sp.get_piece_size():
            tokens.append(sp.id_to_piece(i).encode())
            scores.append(sp.get_score(i))
            kind = gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.NORMAL
            types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.BYTE if sp.is_byte(i) else kind)
        else:  # the model's vocabulary is larger than the bench's small tokenizer: unused pieces
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    names = list(state)
    for name in names:
        t = state[name]
        dtype = torch.float32 if t.dim() == 1 else torch.float16  # norms stay F32, as llama.cpp's converter keeps them
        writer.add_tensor_info(gguf_name(name), t.shape, torch.empty(0, dtype=dtype).numpy().dtype, t.numel() * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in names:
        t = state[name]
        writer.write_tensor_data((t.float() if t.dim() == 1 else t.to(torch.float16)).numpy())
    writer.close()
    out.with_suffix(".part").rename(out)
    return out


def quantize(bin_dir: Path, f16: Path, kind: str) -> Path:
    out = f16.with_name(f"model-{kind}.gguf")
    if not out.is_file():
        subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(out), kind], check=True, capture_output=True)
    return out


def gguf_model(bin_dir: Path, ckpt: Path, kind: str) -> Path:
    """The Meta checkpoint ``ckpt`` as a GGUF quantized to ``kind`` (written and quantized once, next to it)."""
    return quantize(bin_dir, write_gguf(ckpt, ckpt / "model-F16.gguf"), kind)


def run_bench(bin_dir: Path, model: Path, threads: int, *options: str) -> list[dict]:
    """``llama-bench -m model -t threads *options``'s JSON results; SystemExit saying what to do if it cannot run or fails."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), *options, "-o", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"llama.cpp peer: cannot run {cmd[0]} ({e}); build it as bench/llama_cpp.py says") from e
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        raise SystemExit(
            f"llama.cpp peer: llama-bench failed on {model.name} ({why}).\n{tail}\n"
            "On a CPU with AMX, rebuild llama.cpp without its AMX backend (see bench/llama_cpp.py), or run without --llama-cpp."
        )
    return json.loads(done.stdout)


def llama_bench(bin_dir: Path, model: Path, threads: int, new_tokens: int = 64) -> tuple[dict[int, float], float]:
    """(prefill tokens/s for 128- and 512-token prompts, decode tokens/s over ``new_tokens``): llama-bench's averages."""
    results = run_bench(bin_dir, model, threads, "-p", "128,512", "-n", str(new_tokens))
    pp = {r["n_prompt"]: r["avg_ts"] for r in results if r["n_gen"] == 0}
    tg = next(r["avg_ts"] for r in results if r["n_gen"] == new_tokens and r["n_prompt"] == 0)
    return pp, tg


def decode_rate(bin_dir: Path, model: Path, threads: int, new_tokens: int, depth: int) -> float:
    """Decode tokens/s over ``new_tokens`` after ``depth`` cached positions, one repetition (``llama-bench -d``): one
    round of ``bench/cpu.py``'s decode rounds, which alternate it with ours so that both see the same machine."""
    return run_bench(bin_dir, model, threads, "-p", "0", "-n", str(new_tokens), "-d", str(depth), "-r", "1")[0]["avg_ts"]


def check_peer(bin_dir: Path, ckpt: Path, threads: int) -> None:
    """Run llama-bench briefly on each quantization (an 8-token prompt, one new token), so that a build that cannot
    run stops ``bench/cpu.py`` before it spends half an hour on its own rows."""
    for kind in QUANTS:
        run_bench(bin_dir, gguf_model(bin_dir, ckpt, kind), threads, "-p", "8", "-n", "1", "-r", "1")


def peer_rows(bin_dir: Path, ckpt: Path, threads: int, bandwidth: float) -> list[str]:
    """One table row per quantization, in ``bench/cpu.py``'s columns ("-" where llama-bench does not measure)."""
    rows = []
    for kind in QUANTS:
        model = gguf_model(bin_dir, ckpt, kind)
        pp, tg = llama_bench(bin_dir, model, threads)
        bound = bandwidth / model.stat().st_size  # every weight read once per token, as for ours
        rows.append(
            f"| llama.cpp {kind} | llama-bench, {threads} threads | - | - | - | - | - | {128 / pp[128]:.2f} | {512 / pp[512]:.2f} "
            f"| {pp[512]:.1f} | {tg:.2f} | {bound:.2f} | {tg / bound:.0%} | - | - |"
        )
    return rows
