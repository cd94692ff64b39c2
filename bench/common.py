"""Shared benchmark setup: identical random weights in our Transformer and in transformers + peft."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_adapter import AdapterConfig, ModelConfig, Transformer
from llama_adapter.model.build import build_model
from llama_adapter.train.data import Example
from llama_adapter.weights.base import hf_to_meta_name, hf_to_meta_tensor

RESULTS = Path(__file__).with_name("RESULTS.md")
MAX_LEN = 512  # the paper's max sequence length


@dataclass(frozen=True)
class BenchConfig:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int = 32000
    adapter_len: int = 10
    adapter_layer: int | None = None  # default: every layer

    def model_args(self, max_seq_len: int = 1024) -> ModelConfig:
        return ModelConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=self.vocab_size, max_seq_len=max_seq_len)

    @property
    def adapted_layers(self) -> int:
        return self.adapter_layer or self.n_layers


def make_hf_llama(cfg: BenchConfig, dtype: torch.dtype, seed: int = 0):
    """A random transformers LlamaForCausalLM with the Meta FFN width for ``cfg``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    args = cfg.model_args()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=cfg.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        initializer_range=0.05,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def add_peft_adapter(hf_model, cfg: BenchConfig, seed: int = 1):
    """peft's AdaptionPrompt on the top layers, with non-zero (raw, scalar) gates."""
    from peft import AdaptionPromptConfig, get_peft_model

    model = get_peft_model(
        hf_model, AdaptionPromptConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.adapted_layers, task_type="CAUSAL_LM")
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("adaption_gate"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
    return model.eval()


def ours_from_hf(hf_model, cfg: BenchConfig, dtype: torch.dtype, max_seq_len: int = 1024) -> Transformer:
    """Our Transformer with the same weights (and the same adapter, if peft wrapped ``hf_model``)."""
    args = cfg.model_args(max_seq_len)
    state, prompts, gates = {}, {}, {}
    for name, t in hf_model.state_dict().items():
        name = name.removeprefix("base_model.model.")
        if "adaption_prompt" in name or "adaption_gate" in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            (prompts if "adaption_prompt" in name else gates)[layer] = t
            continue
        meta = hf_to_meta_name(name.replace(".self_attn.model.", ".self_attn."))  # peft wraps attention modules
        if meta is not None:
            state[meta] = hf_to_meta_tensor(meta, t, args).detach().clone()
    adapter = None
    if prompts:
        # peft multiplies by its raw scalar gate: identity activation, same gate for every head.
        adapter = AdapterConfig(adapter_len=cfg.adapter_len, adapter_layer=cfg.adapted_layers, gate_activation="identity")
        layers = sorted(prompts)
        state["adapter_query.weight"] = torch.cat([prompts[i][0] for i in layers]).float()
        for i in layers:
            state[f"layers.{i}.attention.gate"] = gates[i].float().reshape(1, 1, 1, 1).expand(1, cfg.n_heads, 1, 1).clone()
    return build_model(args, adapter, state.items(), dtype=dtype, device=torch.device("cpu"))


def copy_bandwidth(n_bytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes per second moved by a large tensor copy (read + write, STREAM's convention).

    The median of several copies: on a shared VM a single copy is now and then twice as fast.
    """
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * n_bytes / statistics.median(_timed(lambda: dst.copy_(src)) for _ in range(repeats))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes a decode step must read: every weight except the embedding table (one row is read)."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    return total + model.args.dim * model.tok_embeddings.weight.element_size()


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {gpu}"


def append_results(title: str, command: str, table: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a") as f:
        f.write(f"\n## {title}\n\n- date: {stamp}\n- machine: {machine()}\n- command: `{command}`\n\n{table}\n")


def alpaca_like(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Random examples with an Alpaca-like length mix: template + instruction ~40-300 tokens, response
    log-normal around 60 tokens, capped at MAX_LEN (the real Alpaca 52k is not downloadable here)."""
    g = torch.Generator().manual_seed(seed)
    prompt = (40 + torch.empty(n).log_normal_(3.2, 0.7, generator=g)).clamp(max=300).long()
    response = torch.empty(n).log_normal_(4.1, 0.9, generator=g).clamp(min=2).long()
    out = []
    for p, r in zip(prompt.tolist(), response.tolist(), strict=True):
        total = min(p + r + 2, MAX_LEN)  # BOS ... EOS
        ids = torch.randint(3, vocab, (total,), generator=g)
        out.append(Example(ids, min(p + 1, total - 1)))
    return out
