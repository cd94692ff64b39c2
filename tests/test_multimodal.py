"""Multimodal (official V2 layout): CLIP tokens, the visual adapter, V2 extras, weights and captioning."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import llama_adapter
from llama_adapter import (
    AdapterConfig,
    CheckpointError,
    ClipSpec,
    ImageError,
    Transformer,
    VisualConfig,
    caption_prompt,
    read_adapter,
    save_adapter,
)

from .test_model import SAMPLE, tokens_for

# A tiny CLIP: 224 px input like ViT-L/14, 32 px patches (7x7 + 1 tokens), width 32, output width 16.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
CLIP_SPEC = ClipSpec("tiny-test-clip", None, TINY_CLIP)
# embed_dim divisible by the official loader's 16 heads.
VISUAL = VisualConfig(clip_model="tiny-test-clip", clip_pretrained=None, clip_dim=16, embed_dim=32, depth=2, num_heads=16, mlp_ratio=4.0)
QUERY_LEN, ADAPTED = 4, 3  # like the official 10 queries x 31 of 32 layers, scaled down to a 4-layer model
LORA_RANK = 4


def write_clip_dir(out: Path, seed: int = 5) -> Path:
    """The tiny CLIP as an open_clip model folder: its config and (random, seeded) weights."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in tiny_clip_state(seed).items()}, str(out / "open_clip_model.safetensors"))
    return out


def tiny_clip_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CLIP).state_dict()


def official_v2_file(path: Path, args: llama_adapter.ModelArgs, lora: bool, with_clip: bool = False, seed: int = 0) -> dict:
    """Write an official-V2-layout checkpoint for ``args``, keys and shapes as the official code names them.

    Values are random (not zero) so that every tensor matters.  With ``with_clip`` it also carries
    CLIP under ``clip.`` as a whole-model state dict would (text tower included).
    """
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    e, d, c, hidden = VISUAL.embed_dim, args.dim, VISUAL.clip_dim, args.ffn_hidden_dim
    kv = args.kv_heads * args.head_dim  # = dim for LLaMA-7B; the tiny base uses grouped-query attention
    m: dict[str, torch.Tensor] = {
        "clip_proj.weight": r(e, c), "clip_proj.bias": r(e),
        "clip_proj_norm.weight": 1 + r(e), "clip_proj_norm.bias": r(e),
        "visual_query.weight": r(QUERY_LEN, e, scale=1.0),
        "visual_proj.weight": r(d, e), "visual_proj.bias": r(d),
        "visual_proj_norm.weight": 1 + r(d), "visual_proj_norm.bias": r(d),
        "adapter_query.weight": r(ADAPTED * QUERY_LEN, d, scale=1.0),
        "llama.norm.weight": 1 + r(d),
    }  # fmt: skip
    for b in range(VISUAL.depth):
        p = f"visual_blocks.{b}."
        m |= {
            p + "norm1.weight": 1 + r(e), p + "norm1.bias": r(e),
            p + "attn.qkv.weight": r(3 * e, e), p + "attn.qkv.bias": r(3 * e),
            p + "attn.proj.weight": r(e, e), p + "attn.proj.bias": r(e),
            p + "norm2.weight": 1 + r(e), p + "norm2.bias": r(e),
            p + "mlp.fc1.weight": r(4 * e, e), p + "mlp.fc1.bias": r(4 * e),
            p + "mlp.fc2.weight": r(e, 4 * e), p + "mlp.fc2.bias": r(e),
        }  # fmt: skip
    for i in range(args.n_layers):  # the official model has gates, biases and LoRA in every layer
        p = f"llama.layers.{i}."
        m |= {
            p + "attention.gate": r(1, args.n_heads, 1, 1, scale=1.0),
            p + "attention.wq.bias": r(d), p + "attention.wo.bias": r(d),
            p + "feed_forward.w1.bias": r(hidden), p + "feed_forward.w2.bias": r(d), p + "feed_forward.w3.bias": r(hidden),
            p + "attention_norm.weight": 1 + r(d), p + "ffn_norm.weight": 1 + r(d),
        }  # fmt: skip
        if lora:
            outs = {"wq": d, "wk": kv, "wv": kv, "wo": d}
            for name, out in outs.items():
                m[p + f"attention.lora_{name}_l1.weight"] = r(LORA_RANK, d)
                m[p + f"attention.lora_{name}_l2.weight"] = r(out, LORA_RANK)
            for name, (n_in, n_out) in {"w1": (d, hidden), "w2": (hidden, d), "w3": (d, hidden)}.items():
                m[p + f"feed_forward.lora_{name}_l1.weight"] = r(LORA_RANK, n_in)
                m[p + f"feed_forward.lora_{name}_l2.weight"] = r(n_out, LORA_RANK)
            m[p + "attention.new_gate"] = 1 + r(1, 1, 1, 1)
    if with_clip:
        m |= {f"clip.{k}": v for k, v in tiny_clip_state(seed + 1).items()}
    ckpt = {"model": m, "config": {"w_bias": True, "w_lora": lora, "lora_rank": LORA_RANK}}
    torch.save(ckpt, path)
    return ckpt


def picture(seed: int, size: tuple[int, int] = (300, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def v2_lora(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path, pipe):
    path = tmp_path_factory.mktemp("v2") / "abc_LORA-BIAS-tiny.pth"
    ckpt = official_v2_file(path, pipe.model.args, lora=True, with_clip=True)
    return ckpt, llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", clip=CLIP_SPEC)


# ---------------------------------------------------------------- CLIP and the visual adapter


def test_clip_tokens_match_open_clips_own_forward() -> None:
    """Our token path (all tokens after ln_post and proj) agrees with open_clip's forward on the class token and the rest."""
    pipe_visual = llama_adapter.model.visual.VisualEncoder(*llama_adapter.model.visual.build_clip(CLIP_SPEC), VISUAL, QUERY_LEN, 64)
    tower = pipe_visual.clip
    pixels = pipe_visual.pixels([picture(0), picture(1)])
    with torch.no_grad():
        ours = pipe_visual.clip_tokens(pixels)
        tower.output_tokens = True
        pooled, patches = tower(pixels)  # open_clip: projected class token, unprojected patch tokens
    assert ours.shape == (2, 1 + 7 * 7, 16)
    assert torch.allclose(ours[:, 0], pooled, atol=1e-5)
    assert torch.allclose(ours[:, 1:], patches @ tower.proj, atol=1e-5)


def test_extras_off_add_nothing(pipe) -> None:
    """Without V2 extras the model has no bias, LoRA or new_gate parameters and no hooks."""
    model = Transformer(pipe.model.args, AdapterConfig(adapter_len=2, adapter_layer=2))
    names = set(model.state_dict())
    assert not any(n.endswith(".bias") or "lora_" in n or "new_gate" in n for n in names)
    assert not any(m._forward_hooks for m in model.modules())
    on = Transformer(pipe.model.args, AdapterConfig(adapter_len=2, adapter_layer=2, bias=True, lora_rank=2))
    assert sum(n.endswith(".bias") for n in on.state_dict()) == 5 * 4
    assert all(on.state_dict()[n].abs().sum() == 0 for n in on.state_dict() if n.endswith((".bias", "_l2.weight")))


# ---------------------------------------------------------------- official V2 weights


def mapped(key: str) -> str | None:
    """Where an official V2 key lives in our model (None: deliberately unused)."""
    if key.startswith("llama."):
        return key.removeprefix("llama.")
    if key.startswith("clip.visual."):
        return "clip." + key.removeprefix("clip.visual.")
    return None if key.startswith("clip.") else key


@pytest.mark.parametrize("lora", [False, True], ids=["BIAS", "LORA-BIAS"])
def test_official_v2_file_loads_every_key(tmp_path: Path, hf_dir: Path, pipe, lora: bool) -> None:
    ckpt = official_v2_file(tmp_path / "v2.pth", pipe.model.args, lora=lora, with_clip=True)
    loaded = llama_adapter.load(hf_dir, tmp_path / "v2.pth", device="cpu", dtype="fp32", clip=CLIP_SPEC)
    cfg = loaded.model.adapter_config
    assert (cfg.adapter_len, cfg.adapter_layer, cfg.gate_activation) == (QUERY_LEN, ADAPTED, "tanh")
    assert (cfg.bias, cfg.norm, cfg.lora_rank) == (True, True, LORA_RANK if lora else 0)
    assert cfg.visual == VisualConfig(clip_dim=16, embed_dim=32, depth=2, num_heads=16, mlp_ratio=4.0, channel_order="bgr")
    ours = loaded.model.state_dict() | loaded.visual.state_dict()
    unused = []
    for key, value in ckpt["model"].items():
        name = mapped(key)
        if name is None or name not in ours:
            unused.append(key)
            continue
        assert torch.equal(ours[name], value), key
    # Only CLIP's text tower and the gate (and new_gate) of layer 0, below the adapted layers, go unused.
    layer0 = {"llama.layers.0.attention.gate"} | ({"llama.layers.0.attention.new_gate"} if lora else set())
    assert set(unused) == {k for k in ckpt["model"] if k.startswith("clip.") and not k.startswith("clip.visual.")} | layer0
    # And nothing of ours was left to chance: every adapter parameter came from the file.
    from_file = {mapped(k) for k in ckpt["model"]}
    assert set(loaded.adapter_tensors()) <= from_file


def test_official_v2_without_clip_and_norms_takes_them_from_open_clip_and_base(tmp_path: Path, hf_dir: Path, pipe) -> None:
    ckpt = official_v2_file(tmp_path / "v2.pth", pipe.model.args, lora=False)
    for key in [k for k in ckpt["model"] if "norm.weight" in k and k.startswith("llama.")]:
        del ckpt["model"][key]
    torch.save(ckpt, tmp_path / "v2.pth")
    loaded = llama_adapter.load(hf_dir, tmp_path / "v2.pth", device="cpu", dtype="fp32", clip=CLIP_SPEC)
    assert loaded.model.adapter_config.norm is False
    assert torch.equal(loaded.model.state_dict()["norm.weight"], pipe.model.state_dict()["norm.weight"])


def test_official_v2_unexpected_and_missing_keys_are_named(tmp_path: Path, hf_dir: Path, pipe) -> None:
    ckpt = official_v2_file(tmp_path / "v2.pth", pipe.model.args, lora=True)
    ckpt["model"]["llama.layers.1.attention.extra_scale"] = torch.zeros(1)
    del ckpt["model"]["visual_blocks.1.mlp.fc2.bias"]
    del ckpt["model"]["llama.layers.2.feed_forward.lora_w3_l1.weight"]
    torch.save(ckpt, tmp_path / "v2.pth")
    with pytest.raises(CheckpointError) as err:
        llama_adapter.load(hf_dir, tmp_path / "v2.pth", device="cpu", clip=CLIP_SPEC)
    message = str(err.value)
    assert "unexpected keys: layers.1.attention.extra_scale" in message
    assert "layers.2.feed_forward.lora_w3_l1.weight" in message and "visual_blocks.1.mlp.fc2.bias" in message


def test_official_v2_lora_keys_without_w_lora_are_unexpected(tmp_path: Path, hf_dir: Path, pipe) -> None:
    ckpt = official_v2_file(tmp_path / "v2.pth", pipe.model.args, lora=True)
    ckpt["config"]["w_lora"] = False
    torch.save(ckpt, tmp_path / "v2.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*lora_w"):
        llama_adapter.load(hf_dir, tmp_path / "v2.pth", device="cpu", clip=CLIP_SPEC)


# ---------------------------------------------------------------- the formula, restated


def reference_visual_prompt(ckpt: dict, pixels: torch.Tensor) -> torch.Tensor:
    """forward_visual of the official code, written out: open_clip's own tower, then plain tensor maths."""
    sd = ckpt["model"]
    clip = open_clip.CLIP(**TINY_CLIP)
    clip.visual.load_state_dict({k.removeprefix("clip.visual."): v for k, v in sd.items() if k.startswith("clip.visual.")})
    clip.visual.output_tokens = True
    pooled, patches = clip.visual(pixels)
    x = torch.cat([pooled[:, None], patches @ clip.visual.proj], dim=1)

    def ln(x, p, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    x = ln(lin(x, "clip_proj"), "clip_proj_norm")
    x = torch.cat([sd["visual_query.weight"].expand(x.shape[0], -1, -1), x], dim=1)
    b, t, e = x.shape
    heads = VISUAL.num_heads
    for i in range(VISUAL.depth):
        p = f"visual_blocks.{i}."
        q, k, v = lin(ln(x, p + "norm1"), p + "attn.qkv").view(b, t, 3, heads, e // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // heads), -1) @ v
        x = x + lin(att.transpose(1, 2).reshape(b, t, e), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return ln(lin(x[:, :QUERY_LEN], "visual_proj"), "visual_proj_norm")


def reference_v2_logits(base_sd: dict, ckpt: dict, args, tokens: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The official V2 LLaMA written out: biases, LoRA (no scaling, not on the prompt), tanh(gate) * new_gate,
    adaption prompt + visual prompt in the top layers, two separate softmaxes."""
    sd = dict(base_sd) | {k.removeprefix("llama."): v for k, v in ckpt["model"].items() if k.startswith("llama.")}
    b, t = tokens.shape
    hd, h_q, h_kv, n = args.head_dim, args.n_heads, args.kv_heads, args.n_layers
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    rot = torch.polar(torch.ones(t, hd // 2), torch.outer(torch.arange(t).float(), freqs))

    def rope(x):
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2)) * rot[None, :, None]).flatten(-2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    def proj(x, p, name):  # W x + b + l2(l1(x)) as in the official Attention / FeedForward
        out = x @ sd[p + name + ".weight"].T + sd.get(p + name + ".bias", 0)
        if p + f"lora_{name}_l1.weight" in sd:
            out = out + (x @ sd[p + f"lora_{name}_l1.weight"].T) @ sd[p + f"lora_{name}_l2.weight"].T
        return out

    mask = torch.full((t, t), float("-inf")).triu(1)
    prompts = ckpt["model"]["adapter_query.weight"].view(ADAPTED, QUERY_LEN, -1)
    x = sd["tok_embeddings.weight"][tokens]
    for i in range(n):
        p = f"layers.{i}."
        xn = rms(x, sd[p + "attention_norm.weight"])
        q = rope(proj(xn, p + "attention.", "wq").view(b, t, h_q, hd)).transpose(1, 2)
        k = rope(proj(xn, p + "attention.", "wk").view(b, t, h_kv, hd)).transpose(1, 2)
        v = proj(xn, p + "attention.", "wv").view(b, t, h_kv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(h_q // h_kv, 1), v.repeat_interleave(h_q // h_kv, 1)
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        if i >= n - ADAPTED:
            prompt = prompts[i - (n - ADAPTED)][None] + visual  # [B, L, D]
            kp = (prompt @ sd[p + "attention.wk.weight"].T).view(b, QUERY_LEN, h_kv, hd).transpose(1, 2).repeat_interleave(h_q // h_kv, 1)
            vp = (prompt @ sd[p + "attention.wv.weight"].T).view(b, QUERY_LEN, h_kv, hd).transpose(1, 2).repeat_interleave(h_q // h_kv, 1)
            g = sd[p + "attention.gate"].tanh() * sd.get(p + "attention.new_gate", 1)
            out = out + g * (torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(hd), -1) @ vp)
        x = x + proj(out.transpose(1, 2).reshape(b, t, -1), p + "attention.", "wo")
        xn = rms(x, sd[p + "ffn_norm.weight"])
        ff = F.silu(proj(xn, p + "feed_forward.", "w1")) * proj(xn, p + "feed_forward.", "w3")
        x = x + proj(ff, p + "feed_forward.", "w2")
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_multimodal_forward_matches_the_official_formula(v2_lora, pipe) -> None:
    ckpt, loaded = v2_lora
    images = [picture(2), picture(3)]
    pixels = loaded.visual.pixels(images)
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        visual_ref = reference_visual_prompt(ckpt, pixels)
        visual = loaded.visual.encode(images)
        assert (visual - visual_ref).abs().max().item() <= 5e-6  # tight enough to tell LayerNorm eps 1e-5 from 1e-6
        ours = loaded.model(tokens, visual)
        ref = reference_v2_logits(pipe.model.state_dict(), ckpt, pipe.model.args, tokens, visual_ref)
        other_image = loaded.model(tokens, visual.flip(0))
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ours - other_image).abs().max().item() > 1e-2  # the image does matter


def test_zero_gates_make_the_image_irrelevant(hf_dir: Path, pipe) -> None:
    """A fresh multimodal adapter (zero gates, zero biases, zero LoRA up-projections) is exactly the base model."""
    cfg = AdapterConfig(adapter_len=QUERY_LEN, adapter_layer=ADAPTED, bias=True, norm=True, lora_rank=LORA_RANK, visual=VISUAL)
    fresh = llama_adapter.load(hf_dir, cfg, device="cpu", dtype="fp32", clip=CLIP_SPEC)
    tokens = tokens_for(pipe, SAMPLE[:1])
    with torch.no_grad():
        a = fresh.model(tokens, fresh.visual.encode([picture(4)]))
        b = fresh.model(tokens, fresh.visual.encode([picture(5)]))
        base = pipe.model(tokens)
    assert torch.equal(a, b) and torch.equal(a, base)
    for name, p in fresh.model.named_parameters():
        if name.endswith(".attention.gate"):
            p.data.fill_(0.5)  # open the gates: now the image must change the logits
    with torch.no_grad():
        a, b = (fresh.model(tokens, fresh.visual.encode([picture(seed)])) for seed in (4, 5))
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------- generation with images


def test_caption_streams_end_to_end(v2_lora, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, loaded = v2_lora
    path = tmp_path / "photo.png"
    picture(6).save(path)
    calls = {"encode": 0, "adapter_kv": 0}
    encode, adapter_kv = loaded.visual.encode, loaded.model.adapter_kv
    monkeypatch.setattr(loaded.visual, "encode", lambda *a: calls.__setitem__("encode", calls["encode"] + 1) or encode(*a))
    monkeypatch.setattr(loaded.model, "adapter_kv", lambda *a: calls.__setitem__("adapter_kv", calls["adapter_kv"] + 1) or adapter_kv(*a))
    stream = loaded.stream(caption_prompt(), image=path, max_new_tokens=10, temperature=0)
    parts = list(stream)
    assert parts and "".join(parts) == loaded.tokenizer.decode(stream.generated_ids)
    assert calls == {"encode": 1, "adapter_kv": 1}  # once per request, not per token
    text = "".join(parts)
    assert "".join(loaded.stream(caption_prompt(), image=Image.open(path), max_new_tokens=10, temperature=0)) == text
    assert "".join(loaded.stream(caption_prompt(), image=np.asarray(picture(6)), max_new_tokens=10, temperature=0)) == text


def test_bad_image_fails_when_the_request_starts(v2_lora, tmp_path: Path) -> None:
    """stream() reads the image before returning, so the app can show the error before any text."""
    _, loaded = v2_lora
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="bad.png is not an image PIL can read"):
        loaded.stream(caption_prompt(), image=tmp_path / "bad.png")


def test_batch_with_images_equals_streams(v2_lora) -> None:
    _, loaded = v2_lora
    prompts = [caption_prompt(), llama_adapter.format_prompt("What is in the water?")]
    images = [picture(7), picture(8)]
    one_by_one = ["".join(loaded.stream(p, image=im, max_new_tokens=8, temperature=0)) for p, im in zip(prompts, images, strict=True)]
    assert loaded.generate(prompts, image=images, max_new_tokens=8, temperature=0) == one_by_one
    shared = loaded.generate(prompts, image=images[0], max_new_tokens=8, temperature=0)
    assert shared[0] == one_by_one[0]
    with pytest.raises(ValueError, match="got 3 images for 2 prompts"):
        loaded.generate(prompts, image=[*images, images[0]], max_new_tokens=2)


def test_text_only_models_refuse_images_and_clip(pipe, hf_dir: Path) -> None:
    with pytest.raises(ValueError, match="this model takes no images"):
        pipe.stream("the water", image=picture(0))
    with pytest.raises(ValueError, match="clip= is only for multimodal adapters"):
        llama_adapter.load(hf_dir, AdapterConfig(adapter_len=2, adapter_layer=2), device="cpu", clip=CLIP_SPEC)


def test_caption_prompt_is_the_official_one() -> None:
    assert caption_prompt() == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGenerate caption of this image\n\n### Response:"
    )


# ---------------------------------------------------------------- our format


def test_own_format_multimodal_round_trip(v2_lora, tmp_path: Path, hf_dir: Path) -> None:
    _, loaded = v2_lora
    tensors = loaded.adapter_tensors()
    assert not any(k.startswith("clip.") for k in tensors)  # CLIP comes from open_clip, not from our file
    path = save_adapter(tmp_path / "mm.safetensors", tensors, loaded.model.adapter_config, loaded.model.args)
    meta = read_adapter(path).metadata
    assert meta["format_version"] == "2"
    assert (meta["bias"], meta["norm"], meta["lora_rank"]) == ("true", "true", str(LORA_RANK))
    assert json.loads(meta["visual"])["clip_model"] == "ViT-L-14"  # what the official V2 models use
    # The V2 file's CLIP copy differs from a fresh tiny CLIP; pass the same weights to compare exactly.
    again = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", clip=CLIP_SPEC)
    again.visual.clip.load_state_dict(loaded.visual.clip.state_dict())
    assert again.model.adapter_config == loaded.model.adapter_config
    image = picture(9)
    assert "".join(again.stream(caption_prompt(), image=image, max_new_tokens=8, temperature=0)) == "".join(
        loaded.stream(caption_prompt(), image=image, max_new_tokens=8, temperature=0)
    )
    assert again.adapter_parameter_count() == loaded.adapter_parameter_count()


def test_own_format_without_extras_stays_version_1(tmp_path: Path, pipe) -> None:
    model = Transformer(pipe.model.args, AdapterConfig(adapter_len=2, adapter_layer=2))
    path = save_adapter(tmp_path / "a.safetensors", model.adapter_parameters(), model.adapter_config, model.args)
    meta = read_adapter(path).metadata
    assert meta["format_version"] == "1" and "visual" not in meta and "bias" not in meta


def test_cli_captions_with_the_clip_the_adapter_names(v2_lora, tmp_path: Path, hf_dir: Path) -> None:
    """An adapter whose metadata names its CLIP (here an open_clip config folder) needs no clip= argument."""
    from .test_generation import run_cli

    _, loaded = v2_lora
    clip_dir = write_clip_dir(tmp_path / "clip")
    cfg = dataclasses.replace(
        loaded.model.adapter_config, visual=dataclasses.replace(VISUAL, clip_model=f"local-dir:{clip_dir}", clip_pretrained=None)
    )
    path = save_adapter(tmp_path / "mm.safetensors", loaded.adapter_tensors(), cfg, loaded.model.args)
    image = tmp_path / "photo.png"
    picture(15).save(image)
    api = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32")
    expected = "".join(api.stream(caption_prompt(), image=image, max_new_tokens=6, temperature=0))
    done = run_cli("--base", str(hf_dir), "--adapter", str(path), "--caption", "--image", str(image),
                   "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
