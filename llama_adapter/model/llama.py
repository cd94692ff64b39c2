"""LLaMA with zero-init attention adapters (Meta parameter names).

In each of the top ``adapter_layer`` layers the attention output is

    softmax(q K^T / sqrt(d) + mask) V  +  g(gate) * softmax(q Kp^T / sqrt(d)) Vp

where ``Kp, Vp = P Wk, P Wv`` come from that layer's adaption prompt ``P`` (no RoPE, no
mask) and ``gate`` is a per-head parameter initialised to zero.  ``g`` is tanh or identity.
The gate is folded into ``Vp`` once per request (``Transformer.adapter_kv``), so a decode
step costs one extra small SDPA call per adapted layer and no matmul over the prompt.

The official V2 extras (``AdapterConfig.bias``, ``lora_rank``) change the projections of every
layer; they exist only when switched on.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from ..config import AdapterConfig, GateActivation, ModelConfig
from ..roles import init_fresh, is_adapter
from . import kernels
from .attention import OURS_DTYPES, attention
from .linear import Linear

AdapterKV = tuple[Tensor, Tensor]


def uses_our_ops(x: Tensor) -> bool:
    """Whether RMSNorm and RoPE take our one-op CPU kernels: serving (no autograd), on CPU, where the probe enabled them."""
    return kernels.PLAN.ours_norm_rope and x.device.type == "cpu" and x.dtype in OURS_DTYPES and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if uses_our_ops(x):
            return torch.ops.llama_adapter.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 as the reference implementations do, then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None, device: torch.device | str | None = None
) -> Tensor:
    """The inverse frequencies [head_dim/2], computed as transformers computes them (float32), scaled as ``scaling`` says.

    ``linear`` divides every frequency by ``factor``.  ``llama3`` (Llama 3.1/3.2) divides the low
    frequencies (wavelengths above ``original / low_freq_factor``) by ``factor``, keeps the high
    ones (below ``original / high_freq_factor``), and blends the band between linearly in
    ``original / wavelength``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled)
    if kind != "default":
        raise ValueError(f"unsupported RoPE scaling {kind!r}")
    return inv_freq


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None, scaling: dict[str, Any] | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [max_seq_len, head_dim/2] for Meta's interleaved (complex pair) RoPE."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, H, hd] by cos/sin [B|1, T, hd/2]."""
    if uses_our_ops(x) and cos.dtype == torch.float32:
        return torch.ops.llama_adapter.rope(x, cos.contiguous(), sin.contiguous())
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class KVCache:
    """A preallocated cache: per layer, k and v of shape [batch, kv_heads, max_len, head_dim].

    One tensor per layer, not one stacked tensor: a compiled step writes into a layer's cache in
    place, while a write into a slice of a stacked graph input makes the compiler copy all of it.

    Eager steps read only the positions written, so the cache is left uninitialised: on CPU its
    pages become resident as the context reaches them, not at allocation (at 7B's 2048 positions
    the whole cache is 1 GiB in bf16).  A compiled step attends over every position through a
    mask, and a masked position must still hold a finite value (0 x NaN is NaN): ``zeroed``.
    """

    def __init__(self, args: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device, zeroed: bool = False) -> None:
        shape = (batch, args.kv_heads, max_len, args.head_dim)
        new = torch.zeros if zeroed else torch.empty
        self.zeroed = zeroed
        self.k = [new(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [new(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device, static: bool = False) -> bool:
        """Whether this cache serves such a batch; ``static``: a compiled step's (the exact batch, zeroed)."""
        batch_ok = batch == self.batch and self.zeroed if static else batch <= self.batch
        return batch_ok and length <= self.max_len and self.k[0].dtype == dtype and self.k[0].device == device

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, kv_heads, T, hd] at positions start..start+T; return all keys/values so far."""
        b, end = k.shape[0], start + k.shape[2]
        self.k[layer][:b, :, start:end] = k
        self.v[layer][:b, :, start:end] = v
        return self.k[layer][:b, :, :end], self.v[layer][:b, :, :end]

    def update_at(self, layer: int, index: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Static-shape variant for compiled decoding: write at the positions in ``index``, return the whole cache."""
        b = k.shape[0]
        self.k[layer][:b].index_copy_(2, index, k)
        self.v[layer][:b].index_copy_(2, index, v)
        return self.k[layer][:b], self.v[layer][:b]


class AttentionStep(Protocol):
    """Where a cached forward keeps its keys and values: writes this step's, attends over what is cached."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Cache k, v [B, kv_heads, T, hd] of ``layer``; return attention of q [B, n_heads, T, hd] over the cache."""
        ...


@dataclass
class CacheStep:
    """Where a cached forward writes and how it masks (built by the caller once per step)."""

    cache: KVCache
    start: int
    # Boolean [B, 1, T, S] (True = attend); None means plain causal from position 0 (or T == 1).
    mask: Tensor | None
    # Compiled decoding: write at this position tensor and attend over the whole cache through ``mask``.
    index: Tensor | None = None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.index is None:
            k, v = self.cache.update(layer, self.start, k, v)
        else:
            k, v = self.cache.update_at(layer, self.index, k, v)
        return attention(q, k, v, self.mask, is_causal=self.mask is None and q.shape[2] > 1)


@dataclass
class RowAdapters:
    """One layer's adapter K/V for a batch whose rows carry different adapters (or none in this layer).

    Each group is (row indices [n], or None for every row in order; Kp; gated Vp), Kp and Vp stacked
    [n, n_heads, L, hd].  A row in no group gets no adapter term in this layer.
    """

    groups: list[tuple[Tensor | None, Tensor, Tensor]]

    def add_to(self, out: Tensor, q: Tensor) -> Tensor:
        for rows, kp, vp in self.groups:
            if rows is None:
                out = out + attention(q, kp, vp)
            else:
                out[rows] = out[rows] + attention(q[rows], kp, vp)
        return out


@dataclass
class RaggedAdapters:
    """One layer's adapter K/V for a ragged step (``q`` [1, H, N, hd]): ``rows`` decoding rows of one token each
    first (their K/V as for a batch of them, ``decode``), then prompt chunks, each (its tokens, its row's K/V)."""

    rows: int
    decode: RowAdapters | AdapterKV | None
    chunks: list[tuple[int, AdapterKV | None]]

    def add_to(self, out: Tensor, q: Tensor) -> Tensor:
        def rows_first(t: Tensor) -> Tensor:  # the decoding rows' tokens as a batch [rows, H, 1, hd], and back
            return t.transpose(0, 2)

        parts = [rows_first(add_adapter(rows_first(out[:, :, : self.rows]), rows_first(q[:, :, : self.rows]), self.decode))]
        start = self.rows
        for length, kv in self.chunks:
            span = slice(start, start + length)
            parts.append(add_adapter(out[:, :, span], q[:, :, span], kv))
            start += length
        return torch.cat(parts, dim=2)


BatchAdapters = AdapterKV | RowAdapters | RaggedAdapters


def add_adapter(out: Tensor, q: Tensor, adapter_kv: BatchAdapters | None) -> Tensor:
    """``out`` plus the attention of ``q`` [B, H, T, hd] over the adaption prompt's K and gated V."""
    if adapter_kv is None:
        return out
    if isinstance(adapter_kv, tuple):
        kp, vp = adapter_kv
        b = q.shape[0]
        return out + attention(q, kp.expand(b, -1, -1, -1), vp.expand(b, -1, -1, -1))
    return adapter_kv.add_to(out, q)


def _add_low_rank(down: nn.Linear, up: nn.Linear, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return output + up(down(inputs[0]))


def add_lora(parent: nn.Module, names: Sequence[str], rank: int) -> None:
    """Official V2 LoRA on ``parent.<name>``: ``name(x) + lora_<name>_l2(lora_<name>_l1(x))``, no scaling.

    The low-rank path rides on a forward hook of the base projection: the plain model's code
    has no LoRA branch at all, and the keys keep the official sibling names (``lora_wq_l1``).
    """
    for name in names:
        base: nn.Linear = getattr(parent, name)
        down = nn.Linear(base.in_features, rank, bias=False)
        up = nn.Linear(rank, base.out_features, bias=False)
        parent.add_module(f"lora_{name}_l1", down)
        parent.add_module(f"lora_{name}_l2", up)
        base.register_forward_hook(partial(_add_low_rank, down, up))


class Attention(nn.Module):
    def __init__(self, args: ModelConfig, layer_id: int, adapted: bool, extras: AdapterConfig | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        # A base with attention_bias has its own biases; the V2 extra adds zero-init ones (never both: Transformer checks).
        bias = (extras is not None and extras.bias) or args.attention_bias
        lora_rank = extras.lora_rank if extras is not None else 0
        self.wq = Linear(args.dim, args.n_heads * self.head_dim, bias=bias)
        self.wk = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wv = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim, bias=bias)
        # Adapter parameters get their values from Transformer.reset_adapter_parameters (or a file).
        self.gate: nn.Parameter | None = nn.Parameter(torch.empty(1, args.n_heads, 1, 1)) if adapted else None
        # Official V2 ties new_gate (a scalar on the adapter branch) to LoRA.
        self.new_gate: nn.Parameter | None = nn.Parameter(torch.empty(1, 1, 1, 1)) if adapted and lora_rank else None
        if lora_rank:
            add_lora(self, ("wq", "wk", "wv", "wo"), lora_rank)

    def adapter_kv(self, prompt: Tensor, activation: GateActivation) -> AdapterKV:
        """Kp and g(gate)*Vp, each [B|1, n_heads, L, hd], from the adaption prompt [B|1, L, D]."""
        assert self.gate is not None
        b, length, _ = prompt.shape
        # .forward, not a call: it skips the LoRA hooks, as the official code applies no LoRA to the prompt.
        k = self.wk.forward(prompt).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv.forward(prompt).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gate = self.gate.tanh() if activation == "tanh" else self.gate
        if self.new_gate is not None:
            gate = gate * self.new_gate
        return k, v * gate.to(v.dtype)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        adapter_kv: BatchAdapters | None = None,
        step: AttentionStep | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if step is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            out = step.attend(self.layer_id, q, k, v)
        out = add_adapter(out, q, adapter_kv)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, lora_rank: int = 0) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=bias)
        self.w2 = Linear(hidden_dim, dim, bias=bias)
        self.w3 = Linear(dim, hidden_dim, bias=bias)
        if lora_rank:
            add_lora(self, ("w1", "w2", "w3"), lora_rank)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelConfig, layer_id: int, adapted: bool, extras: AdapterConfig | None = None) -> None:
        super().__init__()
        self.attention = Attention(args, layer_id, adapted, extras)
        bias, lora_rank = (extras.bias, extras.lora_rank) if extras is not None else (False, 0)
        bias = bias or args.mlp_bias
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, bias, lora_rank)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, adapter_kv: BatchAdapters | None, step: AttentionStep | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, adapter_kv, step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelConfig, adapter_config: AdapterConfig | None = None) -> None:
        super().__init__()
        cfg = adapter_config
        self.args, self.adapter_config = args, cfg
        first = args.n_layers - (cfg.adapter_layer if cfg else 0)
        if first < 0:
            raise ValueError(
                f"adapter_layer {cfg.adapter_layer if cfg else 0} exceeds the model's {args.n_layers} layers "
                f"(training: pass --adapter-layer {args.n_layers - 2} or fewer)"
            )
        if cfg is not None and cfg.bias and args.has_base_biases:
            raise ValueError("this base model has biases of its own (attention_bias / mlp_bias); adapters with V2 biases cannot go on it")
        self.first_adapted_layer = first
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i, cfg is not None and i >= first, cfg) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:  # one Parameter in two places; model/build.py keeps the tie when loading
            self.output.weight = self.tok_embeddings.weight
        if cfg is not None:
            self.adapter_query = nn.Embedding(cfg.adapter_layer * cfg.adapter_len, args.dim)
        device = self.tok_embeddings.weight.device
        self.init_rope(None if device.type == "meta" else device)
        if device.type != "meta":
            self.reset_adapter_parameters()

    @property
    def adapter(self) -> AdapterConfig | None:
        """Deprecated alias of ``adapter_config`` (kept for one release)."""
        return self.adapter_config

    def reset_adapter_parameters(self, only: Collection[str] | None = None) -> None:
        """Give the adapter parameters (those in ``only``, or all) the values a fresh adapter starts with
        (``roles``): N(0, 1) prompts, zero gates and biases, new_gate 1, LoRA as the official code starts
        it; tuned norms keep the base's."""
        for name, p in self.adapter_parameters().items():
            if only is None or name in only:
                init_fresh(name, p)

    def init_rope(self, device: torch.device | str | None) -> None:
        """(Re)build the RoPE tables on ``device``; called again after meta-device loading."""
        args = self.args
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, device, args.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters by state-dict name: prompts and gates, plus the V2 extras that are on
        (biases, LoRA and new_gate, and the norm weights when norms are tuned)."""
        cfg = self.adapter_config
        if cfg is None:
            return {}
        return {n: p for n, p in self.named_parameters() if is_adapter(n, cfg.norm, self.args.has_base_biases)}

    def adapter_kv(self, visual_prompt: Tensor | None = None) -> list[AdapterKV | None]:
        """Per layer (None below the adapted layers): Kp and gated Vp for the whole request.

        ``visual_prompt`` [B, adapter_len, D] is added to every layer's adaption prompt.
        """
        cfg = self.adapter_config
        if cfg is None:
            return [None] * self.args.n_layers
        dtype = self.tok_embeddings.weight.dtype
        prompts = self.adapter_query.weight.view(cfg.adapter_layer, 1, cfg.adapter_len, -1)
        out: list[AdapterKV | None] = [None] * self.first_adapted_layer
        for j, layer in enumerate(self.layers[self.first_adapted_layer :]):
            prompt = prompts[j] if visual_prompt is None else prompts[j] + visual_prompt
            out.append(layer.attention.adapter_kv(prompt.to(dtype), cfg.gate_activation))
        return out

    def base_parameter_names(self) -> set[str]:
        """The names a base LLaMA checkpoint provides: all but prompts, gates, biases and LoRA (norms included)."""
        return {n for n in self.state_dict() if not is_adapter(n, tuned_norms=False, base_biases=self.args.has_base_biases)}

    def forward(self, tokens: Tensor, visual_prompt: Tensor | None = None) -> Tensor:
        """Full causal forward with no cache: float32 logits [B, T, V]."""
        t = tokens.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[None, :t], self.rope_sin[None, :t]
        h = self.tok_embeddings(tokens)
        for layer, layer_kv in zip(self.layers, self.adapter_kv(visual_prompt), strict=True):
            h = layer(h, cos, sin, layer_kv, None)
        return self.output(self.norm(h)).float()

    def forward_cached(
        self,
        tokens: Tensor,
        positions: Tensor,
        step: AttentionStep,
        adapter_kv: Sequence[BatchAdapters | None],
        last: Tensor | None = None,
    ) -> Tensor:
        """Forward ``tokens`` [B, T] at ``positions`` [B, T] through the cache; float32 logits of the last position [B, V],
        or with ``last`` (a ragged step, B == 1), of the positions it lists [len(last), V]."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens)
        for layer, layer_kv in zip(self.layers, adapter_kv, strict=True):
            h = layer(h, cos, sin, layer_kv, step)
        return self.output(self.norm(h[:, -1] if last is None else h[0, last])).float()

    def training_hidden(self, tokens: Tensor, visual_prompt: Tensor | None = None, checkpoint: bool = False) -> Tensor:
        """Final-norm hidden states [B, T, D] for training the adapter; ``self.output`` of them gives the logits.

        Leading layers with nothing to train (all of them below the adapter, unless V2 bias or
        norm tuning is on) run under no_grad, so none of their activations are kept for
        backward.  With ``checkpoint`` the other layers recompute theirs in backward instead of
        storing them (for long sequences).
        """
        t = tokens.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[None, :t], self.rope_sin[None, :t]
        frozen = self._frozen_prefix()
        adapter_kv = self.adapter_kv(visual_prompt)
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen < 0):
            h = self.tok_embeddings(tokens)
        for i, (layer, layer_kv) in enumerate(zip(self.layers, adapter_kv, strict=True)):
            if i < frozen:
                with torch.no_grad():
                    h = layer(h, cos, sin, layer_kv, None)
            elif checkpoint:
                h = recompute_in_backward(layer, h, cos, sin, layer_kv, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, layer_kv, None)
        return self.norm(h)

    def _frozen_prefix(self) -> int:
        """How many leading layers have no trainable parameter (-1: the embeddings train)."""
        if self.tok_embeddings.weight.requires_grad:
            return -1
        for i, layer in enumerate(self.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.layers)
