"""A tiny random LLaMA + adapter, built offline in seconds, for trying the app and testing it.

Everything goes through the real files and the real ``load()``: a sentencepiece tokenizer with
LLaMA's ids is trained on text written here, the base is written in Meta's layout (``params.json``
+ ``consolidated.00.pth``), and the adapter in our ``.safetensors`` format.  The weights are random,
so the replies are nonsense; only the machinery is real.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch

from .config import AdapterConfig, ModelConfig, VisualConfig
from .model.visual import ClipSpec
from .serve.loading import load
from .serve.pipeline import Pipeline
from .threads import in_passing_thread
from .weights.adapter import save_adapter

TINY_ARGS = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=2048)
TINY_ADAPTER = AdapterConfig(adapter_len=4, adapter_layer=2, gate_activation="tanh")
SEED = 0
# A tiny random CLIP (224 px like ViT-L/14, 32 px patches) built by open_clip from this config: no download.
TINY_CLIP = ClipSpec(
    "tiny-random-clip",
    None,
    {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    },
)
TINY_CAPTION_ADAPTER = AdapterConfig(
    adapter_len=4,
    adapter_layer=3,
    visual=VisualConfig(clip_model="tiny-random-clip", clip_pretrained=None, clip_dim=32, embed_dim=64, depth=2, num_heads=4),
)

_WORDS = (
    "the a an of to in is it that was for on are as with they at be this from have or one had by word but not what all were "
    "we when your can said there use each which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could people my than first water been call "
    "who its now find long down day did get come made may part alpaca llama adapter image photo picture caption color red "
    "green blue sky tree house cat dog sun moon river mountain city street person tell explain list name describe story poem"
).split()
_TEMPLATE_LINES = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
]


def _corpus(rng: random.Random, lines: int = 2000) -> list[str]:
    text = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) + rng.choice(".!?,:") for _ in range(lines)]
    return text + _TEMPLATE_LINES * 20


def train_tokenizer(
    out_dir: Path, vocab_size: int = TINY_ARGS.vocab_size, lines: Iterable[str] | None = None, character_coverage: float = 1.0
) -> Path:
    """A BPE sentencepiece model set up like LLaMA's: special ids unk 0, bos 1, eos 2, no pad; byte fallback,
    split digits, identity normalisation that keeps every space (decoding depends on it).

    ``lines``: the training text (default: the tiny model's word corpus).  A ``character_coverage``
    below 1 leaves rare characters to byte-fallback pieces.
    """
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines if lines is not None else _corpus(random.Random(SEED))),
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return out_dir / "tokenizer.model"


def _random_state(args: ModelConfig, muted: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Meta-named random weights.  Tokens in ``muted`` (EOS, specials, raw bytes) are made very unlikely,
    so that replies run their full length as readable word pieces instead of stopping at random."""

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    d, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim
    small = 0.5 / d**0.5  # small blocks keep the residual stream dominated by the embeddings
    emb = randn(args.vocab_size, d, std=1.0)
    emb[:, 0] = 4.0  # a constant feature that survives the layers, for the output layer to mute tokens with
    out = randn(args.vocab_size, d, std=1.0 / d**0.5)
    out[muted] = 0.0
    out[muted, 0] = -3.0
    state = {"tok_embeddings.weight": emb, "norm.weight": torch.ones(d), "output.weight": out}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": randn(args.n_heads * hd, d, std=small),
            p + "attention.wk.weight": randn(args.kv_heads * hd, d, std=small),
            p + "attention.wv.weight": randn(args.kv_heads * hd, d, std=small),
            p + "attention.wo.weight": randn(d, args.n_heads * hd, std=small),
            p + "feed_forward.w1.weight": randn(hidden, d, std=small),
            p + "feed_forward.w2.weight": randn(d, hidden, std=small),
            p + "feed_forward.w3.weight": randn(hidden, d, std=small),
            p + "attention_norm.weight": torch.ones(d),
            p + "ffn_norm.weight": torch.ones(d),
        }
    return state


def write_tiny(out_dir: Path) -> tuple[Path, Path]:
    """Write the tiny base (Meta layout, with its tokenizer) and adapter; returns (base_dir, adapter_file)."""
    base = out_dir / "base"
    base.mkdir(parents=True)
    tokenizer = spm.SentencePieceProcessor(model_file=str(train_tokenizer(base)))
    muted = [i for i in range(tokenizer.vocab_size()) if tokenizer.is_control(i) or tokenizer.is_unknown(i) or tokenizer.is_byte(i)]
    generator = torch.Generator().manual_seed(SEED)
    args = TINY_ARGS
    torch.save(_random_state(args, muted, generator), base / "consolidated.00.pth")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads}
    params |= {"vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps}
    (base / "params.json").write_text(json.dumps(params))

    cfg = TINY_ADAPTER
    n_layers = cfg.adapter_layer
    adapter = {"adapter_query.weight": torch.randn(n_layers * cfg.adapter_len, args.dim, generator=generator)}
    for i in range(args.n_layers - n_layers, args.n_layers):
        adapter[f"layers.{i}.attention.gate"] = torch.randn(1, args.n_heads, 1, 1, generator=generator)
    adapter_file = save_adapter(out_dir / "adapter.safetensors", adapter, cfg, args, {"note": "random tiny adapter"})
    return base, adapter_file


@in_passing_thread
def load_tiny(device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None) -> Pipeline:
    """Build the tiny model in a temporary directory and load it through ``load()``; nothing stays on disk."""
    with tempfile.TemporaryDirectory(prefix="llama-adapter-tiny-") as tmp:
        base, adapter = write_tiny(Path(tmp))
        pipe = load(base, adapter, device=device, dtype=dtype, max_seq_len=TINY_ARGS.max_seq_len)
    pipe.base, pipe.adapter_name = "tiny random LLaMA", "tiny random adapter"
    return pipe


@in_passing_thread
def load_tiny_captioner(chat: Pipeline) -> Pipeline:
    """A tiny random image model sharing ``chat``'s tiny base: tiny CLIP plus a multimodal adapter whose
    gates are non-zero (so the image changes the text), saved and loaded back through ``load()``."""
    torch.manual_seed(SEED)
    fresh = chat.with_adapter(TINY_CAPTION_ADAPTER, clip=TINY_CLIP)
    with torch.no_grad():
        for name, p in fresh.model.adapter_parameters().items():
            if name.endswith(".gate"):
                p.normal_(0.0, 1.5)
    with tempfile.TemporaryDirectory(prefix="llama-adapter-tiny-") as tmp:
        path = save_adapter(Path(tmp) / "caption.safetensors", fresh.adapter_tensors(), TINY_CAPTION_ADAPTER, chat.model.args)
        pipe = chat.with_adapter(path, clip=TINY_CLIP)
    pipe.adapter_name = "tiny random image adapter"
    return pipe
