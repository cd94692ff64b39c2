"""Zero-init gated prompt attention in timm ViT and transformers RoBERTa: exact zero start, the formula, the wiring."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from llama_adapter.backbones import BackboneError, adapter_parameters, add_roberta_adapters, add_vit_adapters
from llama_adapter.backbones.tiny import tiny_roberta

pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(**kw: object) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5, **kw).eval()


def padded_batch(vocab: int = 120) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # two padded rows
    mask[2, 4:] = 0
    ids[mask == 0] = 1  # RoBERTa's pad id
    return ids, mask


def open_gates(model: torch.nn.Module) -> None:
    """Non-zero gates of both signs, so every head's branch counts."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith(".gate"):
                p.copy_(torch.randn_like(p))


def reference_attention(x: Tensor, w: tuple[Tensor, ...], b: tuple[Tensor, ...], prompt: Tensor, gate: Tensor, heads: int,
                        key_mask: Tensor | None = None, qk_norm=None) -> Tensor:  # fmt: skip
    """softmax(q K^T/sqrt(d) + mask) V + tanh(gate) * softmax(q Kp^T/sqrt(d)) Vp, heads merged; Kp, Vp = P Wk, P Wv."""
    d = x.shape[-1] // heads

    def heads_of(t: Tensor) -> Tensor:  # [..., T, D] -> [..., H, T, d]
        return t.unflatten(-1, (heads, d)).transpose(-3, -2)

    (wq, wk, wv), (bq, bk, bv) = w, b
    q, k, v = heads_of(x @ wq.T + bq), heads_of(x @ wk.T + bk), heads_of(x @ wv.T + bv)
    kp, vp = heads_of(prompt @ wk.T + bk), heads_of(prompt @ wv.T + bv)
    if qk_norm is not None:
        q_norm, k_norm = qk_norm
        q, k, kp = q_norm(q), k_norm(k), k_norm(kp)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v + torch.tanh(gate) * (q @ kp.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ vp
    return out.transpose(1, 2).flatten(-2)


def capture(module: torch.nn.Module) -> dict[str, object]:
    seen: dict[str, object] = {}
    module.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    return seen


# ---------------------------------------------------------------- timm ViT


@pytest.mark.parametrize("qk_norm", [False, True])
def test_vit_with_zero_gates_equals_the_backbone_exactly(qk_norm: bool) -> None:
    model = small_vit(qk_norm=qk_norm)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before, features = model(images), model.forward_features(images)
        add_vit_adapters(model, adapter_len=6, adapter_layer=2)
        assert torch.equal(model(images), before)
        assert torch.equal(model.forward_features(images), features)
        open_gates(model)
        assert not torch.allclose(model(images), before, atol=1e-3)  # the prompts do reach the output once gated


@pytest.mark.parametrize("qk_norm", [False, True])
def test_vit_attention_equals_the_formula(qk_norm: bool) -> None:
    model = small_vit(qk_norm=qk_norm)
    add_vit_adapters(model, adapter_len=6, adapter_layer=2)
    open_gates(model)
    attn = model.blocks[2].attn
    seen = capture(attn)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        (x,) = seen["args"]
        w = attn.qkv.weight.chunk(3)
        b = attn.qkv.bias.chunk(3)
        norms = (attn.q_norm, attn.k_norm) if qk_norm else None
        merged = reference_attention(x, w, b, attn.adapter.prompt, attn.adapter.gate, 4, qk_norm=norms)
        expected = merged @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def test_vit_adapters_sit_in_the_top_blocks_with_the_backbone_names_unchanged() -> None:
    model = small_vit()
    names = set(model.state_dict())
    add_vit_adapters(model, adapter_len=6, adapter_layer=2)
    params = adapter_parameters(model)
    assert list(params) == ["blocks.1.attn.adapter.prompt", "blocks.1.attn.adapter.gate", "blocks.2.attn.adapter.prompt",
                            "blocks.2.attn.adapter.gate"]  # fmt: skip
    assert set(model.state_dict()) == names | set(params)
    assert params["blocks.1.attn.adapter.prompt"].shape == (6, 32)
    assert params["blocks.1.attn.adapter.gate"].shape == (1, 4, 1, 1) and not params["blocks.1.attn.adapter.gate"].any()
    # A copy computes with its own adapters, not the original's.
    open_gates(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.blocks[2].attn.adapter.gate.zero_()
        images = torch.randn(2, 3, 32, 32)
        assert not torch.equal(clone(images), model(images))


def test_bad_adapter_requests_are_refused() -> None:
    model = small_vit()
    with pytest.raises(BackboneError, match="the backbone has 3 layers; choose 1 to 3"):
        add_vit_adapters(model, adapter_len=4, adapter_layer=4)
    add_vit_adapters(model, adapter_len=4, adapter_layer=1)
    with pytest.raises(BackboneError, match="already has an adapter"):
        add_vit_adapters(model, adapter_len=4, adapter_layer=1)
    with pytest.raises(BackboneError, match="not a timm Vision Transformer"):
        add_vit_adapters(torch.nn.Linear(2, 2), adapter_len=4, adapter_layer=1)
    with pytest.raises(BackboneError, match="not a RoBERTa/BERT-style encoder"):
        add_roberta_adapters(small_vit(), adapter_len=4, adapter_layer=1)


# ---------------------------------------------------------------- transformers RoBERTa


def test_roberta_with_zero_gates_equals_the_backbone_exactly_with_padding() -> None:
    model = tiny_roberta(120)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask)
        hidden = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        add_roberta_adapters(model, adapter_len=5, adapter_layer=2)
        after = model(input_ids=ids, attention_mask=mask)
        assert torch.equal(after.start_logits, before.start_logits) and torch.equal(after.end_logits, before.end_logits)
        assert torch.equal(model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state, hidden)


def test_roberta_attention_equals_the_formula_with_padding() -> None:
    model = tiny_roberta(120)
    add_roberta_adapters(model, adapter_len=5, adapter_layer=2)
    open_gates(model)
    layer = model.roberta.encoder.layer[2]
    seen = capture(layer.attention)
    ids, mask = padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        x = seen["args"][0]
        sa = layer.attention.self
        w, b = (sa.query.weight, sa.key.weight, sa.value.weight), (sa.query.bias, sa.key.bias, sa.value.bias)
        merged = reference_attention(x, w, b, sa.adapter.prompt, sa.adapter.gate, 4, key_mask=mask)
        out = layer.attention.output
        expected = F.layer_norm(merged @ out.dense.weight.T + out.dense.bias + x, (32,), out.LayerNorm.weight, out.LayerNorm.bias,
                                out.LayerNorm.eps)  # fmt: skip
    got = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_prompts_gates_and_what_is_left_trainable() -> None:
    model = tiny_roberta(120)
    add_roberta_adapters(model, adapter_len=5, adapter_layer=2)
    params = adapter_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    open_gates(model)
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask)
    (out.start_logits.sum() + out.end_logits.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params)


def test_bert_layout_encoders_take_the_same_adapters() -> None:
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertForQuestionAnswering(config).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).start_logits
        add_roberta_adapters(model, adapter_len=3, adapter_layer=2)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).start_logits, before)
        open_gates(model)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).start_logits, before, atol=1e-4)
    assert "bert.encoder.layer.0.attention.self.adapter.gate" in adapter_parameters(model)
