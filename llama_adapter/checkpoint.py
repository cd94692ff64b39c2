"""Reading and writing weights: Meta shards, HF safetensors, official adapter files, our adapter format.

Everything is read lazily (mmap / safetensors) and converted tensor by tensor to the target
dtype and device, so loading never holds a second full copy of the model in RAM.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import AdapterConfig, ModelArgs, VisualConfig

FORMAT_NAME = "llama-adapter"
# Version 2 adds the V2 extras (bias, norm, lora_rank, visual); files without extras stay version 1.
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")


class CheckpointError(ValueError):
    """A weight file does not match the model it is loaded into."""


def check_state(expected: Mapping[str, torch.Size], got: Mapping[str, Tensor], source: str, optional: Iterable[str] = ()) -> None:
    """Raise a CheckpointError naming every missing (unless ``optional``), unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(got) - set(optional))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys: {_names(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_names(unexpected)}")
    for k in wrong[:20]:
        lines.append(f"  {k}: checkpoint has shape {list(got[k].shape)}, model expects {list(expected[k])}")
    if len(wrong) > 20:
        lines.append(f"  ... and {len(wrong) - 20} more keys with mismatched shapes")
    raise CheckpointError("\n".join(lines))


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


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
    parts = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in shards]
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
    """Undo HF's per-head row permutation of q_proj/k_proj (rotate-half RoPE -> Meta's interleaved)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_tensor(meta_name: str, t: Tensor, args: ModelArgs) -> Tensor:
    """An HF tensor in Meta's layout: q/k rows go back to interleaved RoPE order, the rest is as is."""
    if meta_name.endswith("attention.wq.weight"):
        return unpermute_qk(t, args.n_heads)
    if meta_name.endswith("attention.wk.weight"):
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


def read_hf_checkpoint(directory: Path, args: ModelArgs, dtype: torch.dtype | None, device: torch.device) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    # safetensors can place tensors straight on the GPU; it reads CPU tensors through mmap.
    target = str(device)
    for path in hf_safetensors_files(directory):
        with safe_open(str(path), framework="pt", device=target) as f:
            for name in f.keys():
                meta = hf_to_meta_name(name)
                if meta is not None:
                    state[meta] = _convert(hf_to_meta_tensor(meta, f.get_tensor(name), args), dtype, device)
    if "output.weight" not in state and args.tie_word_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


# ---------------------------------------------------------------- adapters

_GATE_RE = re.compile(r"^layers\.(\d+)\.attention\.gate$")


@dataclass
class AdapterFile:
    """An adapter read from disk, tensors named as in our Transformer."""

    config: AdapterConfig
    tensors: dict[str, Tensor]
    kind: str  # "llama-adapter" (ours), "official-v1" or "official-v2"
    metadata: dict[str, str] = field(default_factory=dict)

    def base_dims(self) -> dict[str, int] | None:
        raw = self.metadata.get("base_model")
        return json.loads(raw) if raw else None


def read_adapter(path: str | Path) -> AdapterFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_own_adapter(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    if "model" in state and "config" in state:
        return _read_official_v2(path, state["model"], state["config"])
    return _read_official_v1(path, state)


def _top_gates(path: Path, tensors: Mapping[str, Tensor], adapter_layer: int) -> list[int]:
    """The layers of the top ``adapter_layer`` gates; they must be consecutive."""
    gates = sorted(int(m.group(1)) for k in tensors if (m := _GATE_RE.match(k)))
    used = gates[-adapter_layer:]
    if len(used) < adapter_layer or used != list(range(used[0], used[0] + adapter_layer)):
        raise CheckpointError(f"{path}: needs gates on {adapter_layer} consecutive top layers, found layers {gates}")
    return used


_V1_NAME_RE = re.compile(r"len(\d+)_layer(\d+)")


def _read_official_v1(path: Path, state: dict[str, Tensor]) -> AdapterFile:
    """The official V1 release: ``adapter_query.weight`` [layer*len, D] and per-layer gates (raw, no tanh).

    Its training model has a gate in every layer, so a file may carry gates below the adapted
    layers; the official inference code never uses those, and neither do we.
    """
    gates = {int(m.group(1)): k for k in state if (m := _GATE_RE.match(k))}
    unexpected = sorted(k for k in state if k != "adapter_query.weight" and not _GATE_RE.match(k))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for a LLaMA-Adapter V1 file: {_names(unexpected)}")
    if "adapter_query.weight" not in state or not gates:
        raise CheckpointError(f"{path}: a LLaMA-Adapter V1 file needs adapter_query.weight and layers.N.attention.gate keys")
    rows = state["adapter_query.weight"].shape[0]
    hint = _V1_NAME_RE.search(path.name)
    if hint and int(hint.group(1)) * int(hint.group(2)) == rows:
        adapter_len, adapter_layer = int(hint.group(1)), int(hint.group(2))
    elif rows % len(gates) == 0:
        adapter_len, adapter_layer = rows // len(gates), len(gates)
    else:
        raise CheckpointError(
            f"{path}: cannot tell adapter_len and adapter_layer from {rows} prompt rows and {len(gates)} gates; "
            "name the file with its shape, e.g. ..._len10_layer30.pth"
        )
    used = _top_gates(path, state, adapter_layer)
    tensors = {"adapter_query.weight": state["adapter_query.weight"]} | {gates[i]: state[gates[i]] for i in used}
    config = AdapterConfig(adapter_len=adapter_len, adapter_layer=adapter_layer, gate_activation="identity")
    # fit_adapter checks that these are the top layers of the base model.
    return AdapterFile(config, tensors, "official-v1", {"first_layer": str(used[0])})


# Official V2 key prefixes: the LLaMA side under "llama.", CLIP under "clip." (its vision tower under "clip.visual.").
_V2_LLAMA, _V2_CLIP_VISUAL, _V2_CLIP = "llama.", "clip.visual.", "clip."
_V2_NUM_HEADS = 16  # the official loader's v_num_heads: a head count cannot be read from weight shapes
_LLAMA_NORM_RE = re.compile(r"^(norm|layers\.\d+\.(attention_norm|ffn_norm))\.weight$")
_LAYER_BIAS_RE = re.compile(r"^layers\.\d+\.(attention\.w[qo]|feed_forward\.w[123])\.bias$")
_BELOW_ADAPTER_RE = re.compile(r"^layers\.(\d+)\.attention\.(gate|new_gate)$")
_VISUAL_BLOCK_RE = re.compile(r"^visual_blocks\.(\d+)\.")


def _read_official_v2(path: Path, model: object, config: object) -> AdapterFile:
    """An official V2 multimodal file: ``{'model': state, 'config': {'w_bias', 'w_lora', 'lora_rank'}}``.

    Keys map to ours by dropping ``llama.`` (LLaMA side) and ``visual.`` after ``clip.`` (CLIP's
    vision tower); the visual adapter's names are already ours.  Two kinds of keys are read and
    deliberately not used, as in the official code: CLIP's text tower (``clip.*`` outside
    ``clip.visual``) and the gates (and new_gates) of layers below the adapted ones.
    """
    if not isinstance(model, dict) or not isinstance(config, dict):
        raise CheckpointError(f"{path}: an official V2 file holds dicts under 'model' and 'config'")
    tensors: dict[str, Tensor] = {}
    for key, t in model.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{path}: {key} is a {type(t).__name__}, not a tensor")
        if key.startswith(_V2_LLAMA):
            tensors[key.removeprefix(_V2_LLAMA)] = t
        elif key.startswith(_V2_CLIP_VISUAL):
            tensors["clip." + key.removeprefix(_V2_CLIP_VISUAL)] = t
        elif not key.startswith(_V2_CLIP):
            tensors[key] = t
    for key in ("adapter_query.weight", "visual_query.weight", "clip_proj.weight", "visual_blocks.0.mlp.fc1.weight"):
        if key not in tensors:
            raise CheckpointError(f"{path}: not a complete LLaMA-Adapter V2 multimodal file (no {key})")
    query_len, embed_dim = tensors["visual_query.weight"].shape
    rows = tensors["adapter_query.weight"].shape[0]
    if rows % query_len:
        raise CheckpointError(f"{path}: {rows} adapter_query rows are not a multiple of the {query_len} visual queries")
    adapter_layer = rows // query_len
    first = _top_gates(path, tensors, adapter_layer)[0]
    tensors = {k: t for k, t in tensors.items() if not ((m := _BELOW_ADAPTER_RE.match(k)) and int(m.group(1)) < first)}
    w_lora = bool(config.get("w_lora", False))
    lora_rank = config.get("lora_rank", 16) if w_lora else 0
    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise CheckpointError(f"{path}: config lora_rank {lora_rank!r} is not a rank")
    visual = VisualConfig(
        clip_dim=tensors["clip_proj.weight"].shape[1],
        embed_dim=embed_dim,
        depth=1 + max(int(m.group(1)) for k in tensors if (m := _VISUAL_BLOCK_RE.match(k))),
        num_heads=_V2_NUM_HEADS,
        mlp_ratio=tensors["visual_blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )
    config_out = AdapterConfig(
        adapter_len=query_len,
        adapter_layer=adapter_layer,
        gate_activation="tanh",
        # The official model always has (zero-init) biases; a file without them equals one with zeros.
        bias=any(_LAYER_BIAS_RE.match(k) for k in tensors),
        norm=any(_LLAMA_NORM_RE.match(k) for k in tensors),
        lora_rank=lora_rank,
        visual=visual,
    )
    return AdapterFile(config_out, tensors, "official-v2", {"first_layer": str(first)})


def _read_own_adapter(path: Path) -> AdapterFile:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} adapter file (metadata format={meta.get('format')!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: adapter format version {meta.get('format_version')!r}; this version reads {', '.join(READABLE_VERSIONS)}"
        )
    try:
        visual = json.loads(meta["visual"]) if meta.get("visual") else None
        config = AdapterConfig(
            adapter_len=int(meta["adapter_len"]),
            adapter_layer=int(meta["adapter_layer"]),
            gate_activation=meta["gate_activation"],  # type: ignore[arg-type]
            prompt_template=meta.get("prompt_template", "alpaca"),
            bias=meta.get("bias", "false") == "true",
            norm=meta.get("norm", "false") == "true",
            lora_rank=int(meta.get("lora_rank", "0")),
            visual=VisualConfig(**visual) if visual is not None else None,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: adapter metadata lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: adapter metadata is invalid: {e}") from None
    return AdapterFile(config, tensors, FORMAT_NAME, dict(meta))


def fit_adapter(adapter: AdapterFile, args: ModelArgs, source: str) -> dict[str, Tensor]:
    """Check an adapter against the base dims and bring its gates to the per-head shape [1, H, 1, 1]."""
    base = adapter.base_dims()
    if base is not None and base != args.summary():
        raise CheckpointError(f"{source} was trained for a base model with {base}, but the loaded base has {args.summary()}")
    n = adapter.config.adapter_layer
    top = args.n_layers - n
    first = int(adapter.metadata.get("first_layer", top))
    if first != top:
        raise CheckpointError(
            f"{source} adapts layers {first}..{first + n - 1}, but the top {n} layers of this {args.n_layers}-layer base start at {top}"
        )
    out = {}
    for name, t in adapter.tensors.items():
        if _GATE_RE.match(name) and t.numel() == 1:
            t = t.reshape(1, 1, 1, 1).expand(1, args.n_heads, 1, 1).clone()  # scalar gate: same for every head
        out[name] = t
    return out


def adapter_metadata(config: AdapterConfig, args: ModelArgs, training_args: Mapping[str, object] | None = None) -> dict[str, str]:
    meta = {
        "format": FORMAT_NAME,
        # Files without extras stay readable by version-1 readers.
        "format_version": FORMAT_VERSION if config.has_extras else "1",
        "adapter_len": str(config.adapter_len),
        "adapter_layer": str(config.adapter_layer),
        "gate_activation": config.gate_activation,
        "prompt_template": config.prompt_template,
        "base_model": json.dumps(args.summary(), sort_keys=True),
        "training_args": json.dumps(dict(training_args or {}), sort_keys=True, default=str),
    }
    if config.has_extras:
        meta |= {"bias": str(config.bias).lower(), "norm": str(config.norm).lower(), "lora_rank": str(config.lora_rank)}
    if config.visual is not None:
        meta["visual"] = json.dumps(asdict(config.visual), sort_keys=True)
    return meta


def save_adapter(
    path: str | Path,
    tensors: Mapping[str, Tensor],
    config: AdapterConfig,
    args: ModelArgs,
    training_args: Mapping[str, object] | None = None,
) -> Path:
    """Write an adapter as .safetensors (fp32) with our metadata; atomic (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(data, str(tmp), metadata=adapter_metadata(config, args, training_args))
    os.replace(tmp, path)
    return path


def shapes(state: Iterable[tuple[str, Tensor]]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state}
