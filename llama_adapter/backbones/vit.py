"""Zero-init attention in timm Vision Transformers, and the timm model around it (preprocessing, head).

timm's ``Attention`` (``blocks[i].attn``) computes ``qkv = attn.qkv(x)`` laid out as (3, heads, head_dim),
applies ``q_norm``/``k_norm`` per head, attends, merges the heads and passes them through ``attn.norm``
(identity unless ``scale_norm``) and ``attn.proj``.  The adapter reads q off ``qkv``'s output and adds its
branch to the input of ``attn.norm``, i.e. to the merged attention output, before the output projection.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .attention import ZeroInitPrompt, attach, top_layers
from .errors import BackboneError


class ViTPrompt(ZeroInitPrompt):
    def _split(self, qkv: Tensor) -> Tensor:
        attn = self.owner
        return qkv.reshape(*qkv.shape[:-1], 3, attn.num_heads, -1)  # [..., 3, H, d]

    def query(self, projected: Tensor) -> Tensor:
        q = self._split(projected)[..., 0, :, :].transpose(1, 2)  # [B, H, T, d]
        return self.owner.q_norm(q)

    def prompt_kv(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        # .forward, not a call: the hook on qkv that keeps the sequence's q must not fire for the prompt.
        qkv = self._split(self.owner.qkv.forward(prompt))  # [L, 3, H, d]
        k, v = qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)  # [H, L, d]
        return self.owner.k_norm(k), v


def vit_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The model's blocks, each with timm's standard attention (other attention classes lay out q/k/v differently)."""
    from timm.layers import Attention

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        raise BackboneError(f"{type(model).__name__} is not a timm Vision Transformer (it has no .blocks); use a timm ViT model")
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention):
            raise BackboneError(
                f"blocks.{i}.attn is {type(attn).__name__}: only timm's standard ViT attention (timm.layers.Attention, "
                "as in the vit_* and deit_* models) can take zero-init adapters"
            )
    return blocks


def add_vit_adapters(model: nn.Module, adapter_len: int, adapter_layer: int) -> None:
    """Give the top ``adapter_layer`` blocks' attention an adaption prompt of ``adapter_len`` tokens and a zero gate."""
    blocks = vit_blocks(model)
    for i in top_layers(len(blocks), adapter_layer):
        attn = blocks[i].attn
        dim = attn.qkv.in_features
        head_dim = attn.qkv.out_features // 3 // attn.num_heads
        adapter = ViTPrompt(attn, adapter_len, dim, attn.num_heads, getattr(attn, "scale", head_dim**-0.5))
        adapter.to(attn.qkv.weight.device)
        attach(adapter, attn.qkv, attn.norm)


def vit_shape(model: nn.Module) -> dict[str, int]:
    """The backbone's dimensions as recorded in adapter files: depth, width, heads."""
    blocks = vit_blocks(model)
    attn = blocks[0].attn
    return {"depth": len(blocks), "dim": attn.qkv.in_features, "heads": attn.num_heads}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The classifier head's parameters by state-dict name (timm's ``get_classifier()``)."""
    head = model.get_classifier()
    ids = {id(p) for p in head.parameters()}
    params = {n: p for n, p in model.named_parameters() if id(p) in ids}
    if not params:
        raise BackboneError(f"{type(model).__name__} has no classifier head; create it with num_classes > 0")
    return params


def create_vit(name: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """A timm model by name (``vit_base_patch16_224.augreg_in21k``, ``hf-hub:ORG/REPO``, ``local-dir:/PATH``)
    with a fresh ``num_classes`` head."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"{name!r} is not a timm model name; see timm.list_models('vit_*'), or use local-dir:/PATH") from e
        raise
    except OSError as e:  # not downloadable and not cached, or a local folder without its files
        raise BackboneError(f"cannot load timm model {name!r} ({e}); offline, point --model at a saved copy: local-dir:/PATH") from e


def eval_transform(model: nn.Module) -> Callable:
    """The model's own preprocessing (input size, interpolation, crop, mean/std) from its pretrained config."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(**config, is_training=False)
