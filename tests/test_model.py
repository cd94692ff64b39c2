"""The model against independent references: transformers for the base, the paper's formula for the adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import llama_adapter
from llama_adapter import AdapterConfig, ModelArgs, Transformer
from llama_adapter.model.llama import CacheStep, KVCache

from .conftest import write_meta_dir


def tokens_for(pipe, texts: list[str]) -> torch.Tensor:
    """A batch of the texts' ids, cut to the shortest."""
    ids = [pipe.tokenizer.encode(t) for t in texts]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


SAMPLE = ["the water is long and the people come to find oil", "which way do they go now that it is day, said she"]


def test_base_logits_match_transformers(pipe, hf_model) -> None:
    tokens = torch.tensor([pipe.tokenizer.encode(SAMPLE[0])])
    with torch.no_grad():
        ref = hf_model(tokens).logits
        ours = pipe.model(tokens)
    assert ours.shape == ref.shape == (1, tokens.shape[1], pipe.model.args.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sharded_safetensors_load_to_same_logits(hf_sharded_dir: Path, pipe) -> None:
    sharded = llama_adapter.load(hf_sharded_dir, device="cpu", dtype="fp32")
    tokens = torch.tensor([pipe.tokenizer.encode(SAMPLE[1])])
    assert torch.equal(sharded.model(tokens), pipe.model(tokens))


def test_meta_two_shard_dir_loads_to_same_logits(tmp_path: Path, pipe, tokenizer_path: Path) -> None:
    args = pipe.model.args
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "multiple_of": 16, "norm_eps": args.norm_eps, "vocab_size": -1, "hidden_dim": args.ffn_hidden_dim}  # fmt: skip
    write_meta_dir(tmp_path / "meta", pipe.model.state_dict(), params, tokenizer_path, shards=2)
    meta = llama_adapter.load(tmp_path / "meta", device="cpu", dtype="fp32")
    tokens = torch.tensor([pipe.tokenizer.encode(SAMPLE[0])])
    assert torch.allclose(meta.model(tokens), pipe.model(tokens), atol=1e-5, rtol=0)


def test_ffn_width_follows_meta_rounding() -> None:
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden_dim == 11008  # LLaMA-7B
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672  # Llama-2-70B


def test_7b_adapter_has_1229760_parameters() -> None:
    with torch.device("meta"):
        model = Transformer(ModelArgs(), AdapterConfig(adapter_len=10, adapter_layer=30))
    params = model.adapter_parameters()
    assert sum(p.numel() for p in params.values()) == 1_229_760
    assert set(params) == {"adapter_query.weight"} | {f"layers.{i}.attention.gate" for i in range(2, 32)}


# ---------------------------------------------------------------- the adapter against the formula


def reference_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA + adapter written out plainly: complex RoPE, explicit mask, two separate softmaxes."""
    sd, args, cfg = model.state_dict(), model.args, model.adapter_config
    b, t = tokens.shape
    hd, h_q, h_kv = args.head_dim, args.n_heads, args.kv_heads

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    rot = torch.polar(torch.ones(t, hd // 2), torch.outer(torch.arange(t).float(), freqs))

    def rope(x):  # x [b, t, heads, hd], pairs (2i, 2i+1) as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * rot[None, :, None]).flatten(-2)

    mask = torch.full((t, t), float("-inf")).triu(1)
    x = sd["tok_embeddings.weight"][tokens]
    first = args.n_layers - (cfg.adapter_layer if cfg else 0)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        xn = rms(x, sd[p + "attention_norm.weight"])
        q = rope((xn @ sd[p + "attention.wq.weight"].T).view(b, t, h_q, hd)).transpose(1, 2)
        k = rope((xn @ sd[p + "attention.wk.weight"].T).view(b, t, h_kv, hd)).transpose(1, 2)
        v = (xn @ sd[p + "attention.wv.weight"].T).view(b, t, h_kv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(h_q // h_kv, 1), v.repeat_interleave(h_q // h_kv, 1)
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        if i >= first:
            j = i - first
            prompt = sd["adapter_query.weight"][j * cfg.adapter_len : (j + 1) * cfg.adapter_len]
            kp = (prompt @ sd[p + "attention.wk.weight"].T).view(cfg.adapter_len, h_kv, hd).transpose(0, 1)
            vp = (prompt @ sd[p + "attention.wv.weight"].T).view(cfg.adapter_len, h_kv, hd).transpose(0, 1)
            kp, vp = kp.repeat_interleave(h_q // h_kv, 0), vp.repeat_interleave(h_q // h_kv, 0)
            gate = sd[p + "attention.gate"]
            g = torch.tanh(gate) if cfg.gate_activation == "tanh" else gate
            out = out + g * (torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(hd), -1) @ vp)
        x = x + out.transpose(1, 2).reshape(b, t, -1) @ sd[p + "attention.wo.weight"].T
        xn = rms(x, sd[p + "ffn_norm.weight"])
        w1, w2, w3 = (sd[p + f"feed_forward.w{n}.weight"] for n in (1, 2, 3))
        x = x + (torch.nn.functional.silu(xn @ w1.T) * (xn @ w3.T)) @ w2.T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def adapted_copy(pipe, activation: str, gate_scale: float, layers: int = 2, length: int = 3, seed: int = 1) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(pipe.model.args, AdapterConfig(adapter_len=length, adapter_layer=layers, gate_activation=activation))
    state = dict(pipe.model.state_dict())
    state["adapter_query.weight"] = torch.randn(layers * length, pipe.model.args.dim)
    for i in range(model.first_adapted_layer, model.args.n_layers):
        state[f"layers.{i}.attention.gate"] = gate_scale * torch.randn(1, model.args.n_heads, 1, 1)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_adapter_matches_paper_formula(pipe, activation: str) -> None:
    model = adapted_copy(pipe, activation, gate_scale=1.0)
    tokens = tokens_for(pipe, SAMPLE[:1])
    with torch.no_grad():
        ours, ref, base = model(tokens), reference_forward(model, tokens), pipe.model(tokens)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ours - base).abs().max().item() > 1e-2  # the adapter does change the output


def test_reference_forward_matches_base(pipe, hf_model) -> None:
    """The plain restatement itself agrees with transformers, so the formula test checks something real."""
    tokens = tokens_for(pipe, SAMPLE[:1])
    with torch.no_grad():
        assert (reference_forward(pipe.model, tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-4


def test_zero_gates_give_exactly_the_base_logits(pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.0, layers=4, length=10)
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        assert torch.equal(model(tokens), pipe.model(tokens))


# ---------------------------------------------------------------- KV cache


def cached_logits(model: Transformer, rows: list[list[int]], prefill: int) -> list[torch.Tensor]:
    """Prefill ``prefill`` tokens, then decode one at a time; logits at every position from prefill-1 on.

    The cache is left uninitialised when served; here it starts as NaN, so a read of a position not
    yet written would show in the logits."""
    cache = KVCache(model.args, len(rows), model.args.max_seq_len, torch.float32, torch.device("cpu"))
    for t in (*cache.k, *cache.v):
        t.fill_(float("nan"))
    tokens = torch.tensor(rows)
    adapter = model.adapter_kv()
    out = []
    with torch.no_grad():
        pos = torch.arange(prefill)[None].expand(len(rows), -1)
        out.append(model.forward_cached(tokens[:, :prefill], pos, CacheStep(cache, 0, None), adapter))
        for cur in range(prefill, tokens.shape[1]):
            pos = torch.full((len(rows), 1), cur)
            out.append(model.forward_cached(tokens[:, cur : cur + 1], pos, CacheStep(cache, cur, None), adapter))
    return out


@pytest.mark.parametrize("with_adapter", [False, True])
def test_cached_decode_equals_full_forward(pipe, with_adapter: bool) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=1.0) if with_adapter else pipe.model
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        full = model(tokens)
    prefill = 5
    for offset, logits in enumerate(cached_logits(model, tokens.tolist(), prefill)):
        assert torch.allclose(logits, full[:, prefill - 1 + offset], atol=1e-5, rtol=0)


def test_adapter_kv_is_computed_once_per_request(pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=1.0)
    p = llama_adapter.Pipeline(model, pipe.tokenizer)
    calls = []
    original = model.adapter_kv
    monkeypatch.setattr(model, "adapter_kv", lambda *a, **k: calls.append(1) or original(*a, **k))
    text = "".join(p.stream("the water", max_new_tokens=12, temperature=0))
    assert text and len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_in_that_dtype_and_stays_close(hf_dir: Path, pipe, dtype: torch.dtype) -> None:
    half = llama_adapter.load(hf_dir, device="cpu", dtype=dtype)
    assert half.dtype == dtype and half.model.layers[0].attention.wq.weight.dtype == dtype
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        ref, got = pipe.model(tokens), half.model(tokens)
    assert got.dtype == torch.float32  # logits come back in fp32 for sampling
    assert (got.softmax(-1) - ref.softmax(-1)).abs().max().item() < 0.05


def test_params_json_vocab_and_unsupported_rope(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}))
    assert ModelArgs.from_params_json(path, tokenizer_vocab=384).vocab_size == 384  # LLaMA-1 writes -1
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 400}))
    assert ModelArgs.from_params_json(path, tokenizer_vocab=384).vocab_size == 400  # a padded vocabulary stays
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 400, "use_scaled_rope": True}))
    with pytest.raises(ValueError, match="use_scaled_rope"):
        ModelArgs.from_params_json(path)
