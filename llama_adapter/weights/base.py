"""Base LLaMA weights: Meta ``consolidated.NN.pth`` shards and Hugging Face safetensors, in Meta names.

Everything is read lazily (mmap / safetensors) and converted tensor by tensor to the target
dtype and device, so loading never holds a second full copy of the model in RAM.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import CheckpointError
from ..inputs.hf_tokenizer import HFTokenizer, SpecialTokens
from ..inputs.tokenizer import TextTokenizer, Tokenizer
from .files import open_safetensors, torch_load


def _convert(t: Tensor, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    # Floating tensors take the target dtype (None: keep the file's); .to() is a no-op when nothing changes.
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


# ---------------------------------------------------------------- Meta checkpoints

# Model-parallel split dimension of each Meta weight (None: replicated in every shard).
_META_SPLIT = [
    (re.compile(r"(^tok_embeddings|\.attention\.wo|\.feed_forward\.w2)\.weight$"), 1),
    (re.compile(r"(\.attention\.w[qkv]|\.feed_forward\.w[13]|^output)\.weight$"), 0),
]


def _meta_split_dim(name: str) -> int | None:
    for pattern, dim in _META_SPLIT:
        if pattern.search(name):
            return dim
    return None


def read_meta_checkpoint(directory: Path, dtype: torch.dtype | None, device: torch.device) -> dict[str, Tensor]:
    """Merge ``consolidated.NN.pth`` model-parallel shards into one state dict."""
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth files in {directory}")
    parts = [torch_load(p, mmap=True) for p in shards]
    keys = list(parts[0])
    for p, part in zip(shards[1:], parts[1:], strict=True):
        if set(part) != set(keys):
            raise CheckpointError(f"{p.name} holds different keys from {shards[0].name}: the shards are not one checkpoint")
    state: dict[str, Tensor] = {}
    for key in keys:
        if key == "rope.freqs":  # recomputed from params.json
            continue
        pieces = [part.pop(key) for part in parts]
        dim = _meta_split_dim(key) if len(pieces) > 1 else None
        if dim is None:
            state[key] = _convert(pieces[0], dtype, device)
        else:
            state[key] = torch.cat([_convert(x, dtype, device) for x in pieces], dim=dim)
    return state


# ---------------------------------------------------------------- Hugging Face checkpoints

_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_meta_name(name: str) -> str | None:
    """The Meta name of an HF Llama tensor, or None for keys that carry no weights (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"
    raise CheckpointError(f"unexpected key in a Hugging Face Llama checkpoint: {name}")


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo HF's per-head row permutation of q_proj/k_proj (rotate-half RoPE -> Meta's interleaved); a bias [rows] too."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved q/k rows -> HF's rotate-half order (the inverse of ``unpermute_qk``)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def hf_to_meta_tensor(meta_name: str, t: Tensor, args: ModelConfig) -> Tensor:
    """An HF tensor in Meta's layout: q/k rows (and biases) go back to interleaved RoPE order, the rest is as is."""
    if meta_name.startswith("layers.") and ".attention.wq." in meta_name:
        return unpermute_qk(t, args.n_heads)
    if meta_name.startswith("layers.") and ".attention.wk." in meta_name:
        return unpermute_qk(t, args.kv_heads)
    return t


def hf_safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists files that are not there: {', '.join(absent)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    hint = " (only PyTorch .bin weights found: convert them to safetensors)" if any(directory.glob("*.bin")) else ""
    raise FileNotFoundError(f"no model.safetensors or *.safetensors in {directory}{hint}")


def read_hf_checkpoint(directory: Path, args: ModelConfig, dtype: torch.dtype | None, device: torch.device) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    # safetensors can place tensors straight on the GPU; it reads CPU tensors through mmap.
    target = str(device)
    for path in hf_safetensors_files(directory):
        with open_safetensors(path, target) as f:
            for name in f.keys():
                meta = hf_to_meta_name(name)
                if meta is not None:
                    state[meta] = _convert(hf_to_meta_tensor(meta, f.get_tensor(name), args), dtype, device)
    if args.tie_word_embeddings:  # the head is the embedding (model/build.py ties them); a stored copy is not used
        state.pop("output.weight", None)
    return state


# ---------------------------------------------------------------- a base directory


def find_tokenizer(base_dir: Path) -> Path:
    """LLaMA-1/2's sentencepiece ``tokenizer.model``, else a Hugging Face ``tokenizer.json`` (Llama 3 and others)."""
    # Meta's original release keeps tokenizer.model beside the 7B/ directory.
    for candidate in (base_dir / "tokenizer.model", base_dir.parent / "tokenizer.model", base_dir / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {base_dir} (nor tokenizer.model in its parent directory)")


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: object) -> list[int]:
    """``eos_token_id`` as configs write it: an int, a list of ints, or null."""
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def read_special_tokens(base_dir: Path) -> SpecialTokens:
    """BOS/EOS/pad from ``tokenizer_config.json`` (or ``special_tokens_map.json``); every EOS id that
    ``generation_config.json`` and ``config.json`` name (Llama-3-Instruct ends turns with ``<|eot_id|>``)."""
    tok = _json(base_dir / "special_tokens_map.json") | _json(base_dir / "tokenizer_config.json")
    gen, cfg = _json(base_dir / "generation_config.json"), _json(base_dir / "config.json")
    eos_ids = list(dict.fromkeys(_ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))))
    bos_ids = _ids(gen.get("bos_token_id")) or _ids(cfg.get("bos_token_id"))
    add_bos = tok.get("add_bos_token")
    return SpecialTokens(
        bos=_token_text(tok.get("bos_token")),
        eos=_token_text(tok.get("eos_token")),
        pad=_token_text(tok.get("pad_token")),
        add_bos=add_bos if isinstance(add_bos, bool) else None,
        bos_id=bos_ids[0] if bos_ids else None,
        eos_ids=tuple(eos_ids),
    )


def open_tokenizer(base_dir: Path) -> TextTokenizer:
    """The base's tokenizer, with every end-of-turn id its configs name among its stop ids, and its chat template."""
    path = find_tokenizer(base_dir)
    special = read_special_tokens(base_dir)
    tokenizer: TextTokenizer
    if path.suffix == ".json":
        tokenizer = HFTokenizer(path, special)
    else:
        try:
            tokenizer = Tokenizer(path)
            tokenizer.stop_ids |= {i for i in special.eos_ids if 0 <= i < tokenizer.n_words}
        except ValueError:
            if not (base_dir / "tokenizer.json").is_file():
                raise
            tokenizer = HFTokenizer(base_dir / "tokenizer.json", special)  # e.g. a tiktoken tokenizer.model beside it
    tokenizer.chat_template = read_chat_template(base_dir)
    if isinstance(tokenizer, Tokenizer):  # its template writes <s> / </s> as text that must become those tokens
        tokenizer.read_control_pieces = tokenizer.chat_template is not None
    return tokenizer


def read_chat_template(base_dir: Path) -> str | None:
    """The base's own chat template (jinja): ``chat_template.jinja``, or ``chat_template`` in tokenizer_config.json."""
    jinja = base_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = _json(base_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def read_model_config(base_dir: Path, vocab_size: int, max_seq_len: int | None) -> ModelConfig:
    overrides = {"max_seq_len": max_seq_len} if max_seq_len else {}
    if (base_dir / "params.json").is_file():
        return ModelConfig.from_params_json(base_dir / "params.json", tokenizer_vocab=vocab_size, **overrides)
    if (base_dir / "config.json").is_file():
        return ModelConfig.from_hf_config(base_dir / "config.json", **overrides)
    raise FileNotFoundError(f"{base_dir} has neither params.json (Meta layout) nor config.json (Hugging Face layout)")


def read_base_state(base_dir: Path, args: ModelConfig, dtype: torch.dtype | None, device: torch.device) -> dict[str, Tensor]:
    if (base_dir / "params.json").is_file():
        return read_meta_checkpoint(base_dir, dtype, device)
    return read_hf_checkpoint(base_dir, args, dtype, device)
