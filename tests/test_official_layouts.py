"""The official releases exactly as their authors ran them: every file layout the official loaders accept,
written here with plain ``torch.save`` of a dict, and the pixels the official V2 models saw.

Each file is loaded through ``llama_adapter.load`` and checked for its geometry and its logits against the
formula written out in the tests (``reference_forward`` for V1, ``reference_v2_logits`` for V2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms

import llama_adapter
from llama_adapter import AdapterConfig, CheckpointError, ModelConfig, Transformer
from llama_adapter.model.visual import ImageTransform
from llama_adapter.train.cli import multimodal_config, parse_args

from .conftest import ROOT, write_meta_dir
from .test_model import SAMPLE, reference_forward, tokens_for
from .test_multimodal import CLIP_SPEC, LORA_RANK, official_v2_file, picture, reference_v2_logits, reference_visual_prompt

# ---------------------------------------------------------------- V1: a 32-layer base, as LLaMA-7B has

LAYERS, DIM, HEADS, KV_HEADS = 32, 32, 4, 2


@pytest.fixture(scope="module")
def base32(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny 32-layer base in Meta's layout whose params.json, like LLaMA-1's, has no norm_eps."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    args = ModelConfig(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=vocab, multiple_of=16)
    torch.manual_seed(3)
    with torch.no_grad():
        model = Transformer(args)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "multiple_of": 16, "vocab_size": -1}
    return write_meta_dir(tmp_path_factory.mktemp("base32"), state, params, tokenizer_path, shards=1), state


def v1_file(path: Path, rows: int, n_gates: int, trained_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official extract script's output: prompts for the trained layers, a raw gate in every one of
    ``n_gates`` layers, exactly zero below the ``trained_layers`` top ones."""
    g = torch.Generator().manual_seed(seed)
    state = {"adapter_query.weight": torch.randn(rows, DIM, generator=g)}
    for i in range(n_gates):
        trained = i >= n_gates - trained_layers
        state[f"layers.{i}.attention.gate"] = torch.rand(1, HEADS, 1, 1, generator=g) + 0.5 if trained else torch.zeros(1, HEADS, 1, 1)
    torch.save(state, path)
    return state


def v1_reference(base_state: dict, file: dict, length: int, layers: int, tokens: torch.Tensor) -> torch.Tensor:
    """The formula with the file's prompts and raw gates in the top ``layers`` layers; Meta's norm_eps 1e-5."""
    args = ModelConfig(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=base_state["output.weight"].shape[0],
                       multiple_of=16, norm_eps=1e-5)  # fmt: skip
    with torch.device("meta"):
        model = Transformer(args, AdapterConfig(length, layers, gate_activation="identity"))
    top = {f"layers.{i}.attention.gate": file[f"layers.{i}.attention.gate"] for i in range(LAYERS - layers, LAYERS)}
    model.load_state_dict(base_state | {"adapter_query.weight": file["adapter_query.weight"]} | top, assign=True)
    return reference_forward(model, tokens)


@pytest.mark.parametrize(
    ("name", "trained", "how"),
    [
        ("adapter_adapter_len10_layer30_epoch5.pth", 30, "from the file name"),  # the official extract script's name
        ("llama_adapter_release.pth", 30, "from its 30 non-zero gates"),
        ("llama_adapter_release.pth", 32, "the official length 10"),  # every gate non-zero: the official loader's 10
    ],
)
def test_v1_release_with_32_gates(tmp_path: Path, base32, name: str, trained: int, how: str, caplog) -> None:
    base_dir, base_state = base32
    file = v1_file(tmp_path / name, rows=10 * 30, n_gates=LAYERS, trained_layers=trained)
    with caplog.at_level(logging.INFO, logger="llama_adapter"):
        pipe = llama_adapter.load(base_dir, tmp_path / name, device="cpu", dtype="fp32")
    cfg = pipe.model.adapter_config
    assert (cfg.adapter_len, cfg.adapter_layer, cfg.gate_activation, pipe.model.first_adapted_layer) == (10, 30, "identity", 2)
    assert pipe.model.args.norm_eps == 1e-5  # params.json without norm_eps: the official ModelArgs default
    lines = [r.getMessage() for r in caplog.records if "prompts x" in r.getMessage()]
    assert len(lines) == 1 and "official V1, 10 prompts x 30 layers" in lines[0] and how in lines[0]
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        # 32 fp32 layers of accumulated rounding between two ways of computing the same thing
        assert torch.allclose(pipe.model(tokens), v1_reference(base_state, file, 10, 30, tokens), atol=5e-4, rtol=1e-4)


def test_v1_small_adapter_on_a_small_base_is_read_by_its_trained_gates(tmp_path: Path, hf_dir: Path, pipe) -> None:
    """10 x 2 prompts with gates on all 4 layers: read as 5 x 4 before, with logits off by 2.5."""
    g = torch.Generator().manual_seed(1)
    state = {"adapter_query.weight": torch.randn(20, pipe.model.args.dim, generator=g)}
    for i in range(4):
        state[f"layers.{i}.attention.gate"] = torch.rand(1, 4, 1, 1, generator=g) + 0.5 if i >= 2 else torch.zeros(1, 4, 1, 1)
    torch.save(state, tmp_path / "adapter.pth")
    loaded = llama_adapter.load(hf_dir, tmp_path / "adapter.pth", device="cpu", dtype="fp32")
    assert (loaded.model.adapter_config.adapter_len, loaded.model.adapter_config.adapter_layer) == (10, 2)
    assert torch.equal(loaded.model.layers[3].attention.gate, state["layers.3.attention.gate"])


def test_v1_shape_that_cannot_be_told_is_refused_until_given(tmp_path: Path, hf_dir: Path, pipe) -> None:
    g = torch.Generator().manual_seed(2)
    state = {"adapter_query.weight": torch.randn(15, pipe.model.args.dim, generator=g)}
    state |= {f"layers.{i}.attention.gate": torch.rand(1, 4, 1, 1, generator=g) + 0.5 for i in range(4)}
    path = tmp_path / "adapter.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"adapter_shape=\(LEN, LAYERS\).*--adapter-shape LENxLAYERS"):
        llama_adapter.load(hf_dir, path, device="cpu")
    loaded = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", adapter_shape=(5, 3))
    assert (loaded.model.adapter_config.adapter_len, loaded.model.adapter_config.adapter_layer) == (5, 3)
    assert torch.equal(loaded.model.adapter_query.weight, state["adapter_query.weight"])
    with pytest.raises(CheckpointError, match="3x5 does not fit this file's 15 prompt rows and 4 gates on a 4-layer base"):
        llama_adapter.load(hf_dir, path, device="cpu", adapter_shape=(3, 5))


def test_the_generate_command_takes_the_shape(tmp_path: Path, hf_dir: Path, pipe, capsys) -> None:
    from llama_adapter.generate import main

    g = torch.Generator().manual_seed(2)
    state = {"adapter_query.weight": torch.randn(15, pipe.model.args.dim, generator=g)}
    state |= {f"layers.{i}.attention.gate": torch.rand(1, 4, 1, 1, generator=g) for i in range(4)}
    torch.save(state, tmp_path / "adapter.pth")
    common = ["--base", str(hf_dir), "--adapter", str(tmp_path / "adapter.pth"), "--prompt", "the", "--max-new-tokens", "2"]
    assert main([*common, "--device", "cpu"]) == 2
    assert "--adapter-shape LENxLAYERS" in capsys.readouterr().err
    assert main([*common, "--device", "cpu", "--adapter-shape", "5x3", "--temperature", "0"]) == 0
    assert "official V1, 5 prompts x 3 layers (as given)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*common, "--adapter-shape", "5 by 3"])
    assert e.value.code == 2 and "is not LENxLAYERS" in capsys.readouterr().err


# ---------------------------------------------------------------- V2: every variant the official loader accepts


@pytest.mark.parametrize(
    ("config", "lora", "new_gate"),
    [(True, False, False), (False, False, False), (True, True, True), (True, True, False)],
    ids=["BIAS", "BIAS-no-config", "LORA-BIAS", "LORA-BIAS-no-new_gate"],
)
def test_v2_variants(tmp_path: Path, hf_dir: Path, pipe, config: bool, lora: bool, new_gate: bool) -> None:
    path = tmp_path / "v2.pth"
    ckpt = official_v2_file(path, pipe.model.args, lora=lora, with_clip=True)
    if not config:
        del ckpt["config"]  # the official load() then takes w_lora False
    if lora and not new_gate:
        ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.endswith(".new_gate")}
    torch.save(ckpt, path)
    loaded = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", clip=CLIP_SPEC)
    cfg = loaded.model.adapter_config
    assert (cfg.adapter_layer, cfg.bias, cfg.lora_rank, cfg.visual.channel_order) == (3, True, LORA_RANK if lora else 0, "bgr")
    if lora and not new_gate:
        assert all(layer.attention.new_gate.item() == 1.0 for layer in loaded.model.layers[1:])  # the official initial value
    images = [picture(4), picture(5)]
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        visual = loaded.visual.encode(images)
        assert (visual - reference_visual_prompt(ckpt, loaded.visual.pixels(images))).abs().max().item() <= 5e-6
        ref = reference_v2_logits(pipe.model.state_dict(), ckpt, pipe.model.args, tokens, visual)
        assert (loaded.model(tokens, visual) - ref).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- the pixels the official V2 models saw


CLIP_TRANSFORM = transforms.Compose(
    [  # CLIP's own preprocessing (the official code's clip.load transform)
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ]
)


def upright_rgb(path: Path) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def official_pixels(path: Path) -> torch.Tensor:
    """``clip_transform(Image.fromarray(cv2.imread(path)))``: cv2 reads upright (EXIF applied) BGR, here by numpy."""
    return CLIP_TRANSFORM(Image.fromarray(np.ascontiguousarray(upright_rgb(path)[..., ::-1])))


@pytest.fixture(scope="module")
def exif_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view), as phones write."""
    path = tmp_path_factory.mktemp("exif") / "phone.jpg"
    img = picture(7, size=(320, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)
    return path


def test_official_v2_adapters_see_bgr_pixels_exactly_as_the_official_demo(v2_file_loaded, exif_jpeg: Path) -> None:
    loaded = v2_file_loaded
    assert loaded.visual.cfg.channel_order == "bgr"
    for path in [*sorted((ROOT / "assets").glob("example-*.*")), exif_jpeg]:
        assert torch.equal(loaded.visual.pixels([path])[0], official_pixels(path)), path.name


def test_our_adapters_see_rgb_pixels(exif_jpeg: Path) -> None:
    preprocess = {"size": (224, 224), "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
                  "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip
    rgb, bgr = ImageTransform(preprocess)(exif_jpeg), ImageTransform(preprocess, channel_order="bgr")(exif_jpeg)
    assert torch.equal(rgb, CLIP_TRANSFORM(Image.fromarray(upright_rgb(exif_jpeg))))
    assert torch.equal(bgr, official_pixels(exif_jpeg))
    assert not torch.equal(rgb, bgr)


@pytest.fixture(scope="module")
def v2_file_loaded(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path, pipe):
    path = tmp_path_factory.mktemp("v2bgr") / "BIAS-tiny.pth"
    official_v2_file(path, pipe.model.args, lora=False)
    return llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", clip=CLIP_SPEC)


def test_bgr_travels_with_the_adapter(v2_file_loaded, tmp_path: Path, hf_dir: Path) -> None:
    """Saved in our format an official V2 adapter stays BGR, and a fine-tune started from it keeps BGR;
    a fresh image adapter is RGB, CLIP's own convention."""
    loaded = v2_file_loaded
    path = llama_adapter.save_adapter(
        tmp_path / "ours.safetensors", loaded.adapter_tensors(), loaded.model.adapter_config, loaded.model.args
    )
    assert llama_adapter.read_adapter(path).config.visual.channel_order == "bgr"
    again = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32", clip=CLIP_SPEC)
    assert torch.equal(again.visual.pixels([picture(1)]), loaded.visual.pixels([picture(1)]))
    args = parse_args(["--base", "b", "--data", "d", "--out", "o", "--image-root", "r", "--phase", "finetune", "--init-adapter", str(path)])
    init = llama_adapter.read_adapter(path)
    assert multimodal_config(args, init, CLIP_SPEC).visual.channel_order == "bgr"
    fresh = parse_args(["--base", "b", "--data", "d", "--out", "o", "--image-root", "r", "--phase", "pretrain"])
    assert multimodal_config(fresh, None, CLIP_SPEC).visual.channel_order == "rgb"
