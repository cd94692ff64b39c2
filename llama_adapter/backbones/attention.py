"""Zero-init gated prompt attention for backbones from other libraries (timm ViT, transformers RoBERTa).

The same formula as the LLaMA adapter, without RoPE and with the backbone's own (bidirectional) mask:

    out = softmax(q K^T / sqrt(d) + mask) V  +  g(gate) * softmax(q Kp^T / sqrt(d)) Vp      Kp, Vp = P Wk, P Wv

The adaption prompt ``P`` ([L, D]) of each adapted layer goes through that layer's own key and value
projections (biases, and timm's key norm, included); the prompt keys are never masked.  The per-head
``gate`` starts at zero, so a fresh adapter leaves the backbone's outputs exactly as they were.

How it is attached: the library's attention forward runs unchanged (whatever kernel it picks: eager,
SDPA, flash) and two hooks do the rest.  A forward hook on the layer's query projection keeps ``q``; a
forward pre-hook on the module that receives the merged heads (timm: ``attn.norm`` before ``attn.proj``;
transformers: ``attention.output.dense``) adds the gated prompt branch to its input.  The adapter is a
child module named ``adapter`` of the attention module, so the backbone's own parameter names do not
change and its pretrained weights load and save as the library writes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import BackboneError

GATE_ACTIVATION = "tanh"
ADAPTER_NAME = "adapter"  # the child module's name, hence the parameter names "....adapter.prompt" / ".gate"


class ZeroInitPrompt(nn.Module):
    """One layer's adaption prompt and per-head zero-init gate, and the hooks that add its branch.

    Subclasses say where the layer keeps its projections: ``query`` (the query projection's output
    [B, T, *] -> q [B, H, T, d]) and ``prompt_kv`` (P [L, D] -> Kp, Vp, each [H, L, d]).
    """

    def __init__(self, owner: nn.Module, length: int, dim: int, heads: int, scale: float) -> None:
        super().__init__()
        # N(0, 1), as the LLaMA adapter's nn.Embedding prompts; the zero gate keeps the start exact anyway.
        self.prompt = nn.Parameter(torch.randn(length, dim))
        self.gate = nn.Parameter(torch.zeros(1, heads, 1, 1))
        self.scale = scale
        # In a tuple, not a submodule: the layer's projections must not appear twice in the state dict.
        self._owner = (owner,)
        self._q: Tensor | None = None

    @property
    def owner(self) -> nn.Module:
        return self._owner[0]

    def query(self, projected: Tensor) -> Tensor:
        raise NotImplementedError

    def prompt_kv(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def branch(self, q: Tensor) -> Tensor:
        """g(gate) * softmax(q Kp^T * scale) Vp for q [B, H, T, d]; returns [B, H, T, d]."""
        kp, vp = self.prompt_kv(self.prompt.to(q.dtype))
        vp = vp * torch.tanh(self.gate[0]).to(vp.dtype)  # [H, 1, 1]: folded into Vp (L rows, not T)
        b = q.shape[0]
        kp, vp = kp.unsqueeze(0).expand(b, -1, -1, -1), vp.unsqueeze(0).expand(b, -1, -1, -1)
        return F.scaled_dot_product_attention(q, kp, vp, scale=self.scale)

    def keep_query(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._q = self.query(output)

    def add_branch(self, module: nn.Module, args: tuple) -> tuple:
        q, self._q = self._q, None
        if q is None:
            raise RuntimeError("zero-init adapter: the attention output arrived without its query; was the layer's forward changed?")
        x = args[0]
        out = self.branch(q)  # [B, H, T, d]
        merged = out.transpose(1, 2).reshape(*x.shape[:-1], -1)
        return (x + merged.to(x.dtype), *args[1:])

    def extra_repr(self) -> str:
        return f"length={self.prompt.shape[0]}, dim={self.prompt.shape[1]}, heads={self.gate.shape[1]}, gate=tanh, init=0"


def attach(adapter: ZeroInitPrompt, query_source: nn.Module, merged_heads_sink: nn.Module) -> None:
    """Make ``adapter`` the child ``adapter`` of its attention module and hook it onto the layer's query projection
    and merged heads."""
    owner = adapter.owner
    if hasattr(owner, ADAPTER_NAME):
        raise BackboneError(f"{type(owner).__name__} already has an adapter; add adapters to a model only once")
    owner.add_module(ADAPTER_NAME, adapter)
    query_source.register_forward_hook(adapter.keep_query)
    merged_heads_sink.register_forward_pre_hook(adapter.add_branch)


def adapters(model: nn.Module) -> dict[str, ZeroInitPrompt]:
    """The model's zero-init adapters by module name, bottom layer first."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ZeroInitPrompt)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Prompts and gates by state-dict name."""
    return {f"{name}.{p}": param for name, m in adapters(model).items() for p, param in m.named_parameters()}


def top_layers(n_layers: int, adapter_layer: int) -> range:
    """Indices of the top ``adapter_layer`` of ``n_layers`` layers."""
    if not 1 <= adapter_layer <= n_layers:
        raise BackboneError(f"--adapter-layer {adapter_layer}: the backbone has {n_layers} layers; choose 1 to {n_layers}")
    return range(n_layers - adapter_layer, n_layers)


def freeze_all_but(model: nn.Module, trainable: dict[str, nn.Parameter]) -> None:
    """requires_grad on ``trainable`` only: the backbone stays frozen."""
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
