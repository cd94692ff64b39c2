"""Adapter files: the official V1 and V2 releases (``.pth``) and our format (``.safetensors``).

Each reader turns its file into an ``AdapterFile`` with tensors in our Transformer's names;
``fit_adapter`` checks one against a loaded model in one step.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..config import AdapterConfig, ModelConfig, VisualConfig
from ..errors import CheckpointError
from ..roles import CLIP_PREFIX, Role, role_of
from .files import durable_replace, open_safetensors, torch_load
from .state import check_state, names

log = logging.getLogger(__name__)

FORMAT_NAME = "llama-adapter"
# Version 2 adds the V2 extras (bias, norm, lora_rank, visual); files without extras stay version 1.
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")


_GATE_RE = re.compile(r"^layers\.(\d+)\.attention\.gate$")


@dataclass
class AdapterFile:
    """An adapter read from disk, tensors named as in our Transformer."""

    path: Path
    config: AdapterConfig
    tensors: dict[str, Tensor]
    # The lowest adapted layer, where the file says (official files, by their gates); None: the top
    # ``adapter_layer`` layers of whatever base it is loaded on.
    first_layer: int | None = None
    # The base dims the adapter was trained for (our format), checked against the loaded base.
    base_dims: dict[str, int] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


# (adapter_len, adapter_layer), where a caller knows the shape that a file cannot tell.
AdapterShape = tuple[int, int]


def read_adapter(path: str | Path, *, shape: AdapterShape | None = None, n_layers: int | None = None) -> AdapterFile:
    """Read an adapter file of any supported kind; its geometry is logged in one line.

    ``shape`` is the caller's (adapter_len, adapter_layer): an official V1 file does not record
    its own, and a file that does must agree.  ``n_layers`` (the base's) lets a V1 file fall back
    to the official default length of 10 only where that fits the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.suffix == ".safetensors":
        adapter, kind = _read_own_adapter(path), "llama-adapter format"
    else:
        state = torch_load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        if isinstance(state.get("model"), dict):  # the official V2 loader defaults a missing 'config' to {}
            adapter, kind = _read_official_v2(path, state["model"], state.get("config", {})), "official V2"
        else:
            return _read_official_v1(path, state, shape, n_layers)
    found = (adapter.config.adapter_len, adapter.config.adapter_layer)
    if shape is not None and tuple(shape) != found:
        raise CheckpointError(f"{path} holds a {found[0]}x{found[1]} adapter, not the {shape[0]}x{shape[1]} that was asked for")
    _log_geometry(adapter, kind, "from the file")
    return adapter


def _log_geometry(adapter: AdapterFile, kind: str, how: str) -> None:
    cfg = adapter.config
    gate = "raw" if cfg.gate_activation == "identity" else cfg.gate_activation
    extras = [
        name
        for name, on in (("bias", cfg.bias), ("norm", cfg.norm), (f"LoRA {cfg.lora_rank}", cfg.lora_rank), ("visual", cfg.visual))
        if on
    ]
    log.info(
        "adapter %s: %s, %d prompts x %d layers (%s), %s gates%s",
        adapter.path, kind, cfg.adapter_len, cfg.adapter_layer, how, gate, f", {', '.join(extras)}" if extras else "",
    )  # fmt: skip


def _top_gates(path: Path, tensors: Mapping[str, Tensor], adapter_layer: int) -> list[int]:
    """The layers of the top ``adapter_layer`` gates; they must be consecutive."""
    gates = sorted(int(m.group(1)) for k in tensors if (m := _GATE_RE.match(k)))
    used = gates[-adapter_layer:]
    if len(used) < adapter_layer or used != list(range(used[0], used[0] + adapter_layer)):
        raise CheckpointError(f"{path}: needs gates on {adapter_layer} consecutive top layers, found layers {gates}")
    return used


_V1_NAME_RE = re.compile(r"len(\d+)_layer(\d+)")
V1_DEFAULT_LEN = 10  # the official V1 loader's adapter_len, whatever the file


def _read_official_v1(path: Path, state: dict[str, Tensor], shape: AdapterShape | None, n_layers: int | None) -> AdapterFile:
    """The official V1 release: ``adapter_query.weight`` [layer*len, D] and per-layer gates (raw, no tanh).

    Its training model has a gate in every layer, so a file may carry gates below the adapted
    layers (the official extract script writes them, exactly zero); the official inference code
    never uses those, and neither do we.  The file does not record its shape; see ``_v1_shape``.
    """
    gates = {int(m.group(1)): k for k in state if (m := _GATE_RE.match(k))}
    unexpected = sorted(k for k in state if k != "adapter_query.weight" and not _GATE_RE.match(k))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for a LLaMA-Adapter V1 file: {names(unexpected)}")
    if "adapter_query.weight" not in state or not gates:
        raise CheckpointError(f"{path}: a LLaMA-Adapter V1 file needs adapter_query.weight and layers.N.attention.gate keys")
    rows = state["adapter_query.weight"].shape[0]
    nonzero = sum(bool(state[k].count_nonzero()) for k in gates.values())
    (adapter_len, adapter_layer), how = _v1_shape(path, rows, len(gates), nonzero, shape, n_layers)
    used = _top_gates(path, state, adapter_layer)
    tensors = {"adapter_query.weight": state["adapter_query.weight"]} | {gates[i]: state[gates[i]] for i in used}
    config = AdapterConfig(adapter_len=adapter_len, adapter_layer=adapter_layer, gate_activation="identity")
    # fit_adapter checks that these are the top layers of the base model.
    adapter = AdapterFile(path, config, tensors, first_layer=used[0])
    _log_geometry(adapter, "official V1", how)
    return adapter


def _v1_shape(
    path: Path, rows: int, n_gates: int, nonzero: int, shape: AdapterShape | None, n_layers: int | None
) -> tuple[AdapterShape, str]:
    """A V1 file's (adapter_len, adapter_layer) and how it was found, in this order: the caller's shape; a
    ``lenX_layerY`` file name that multiplies out; the count of non-zero gates (the trained layers) when it
    divides the rows; the official length 10 when it divides the rows and fits the model.  Never a guess."""

    def fits(length: int, layers: int) -> bool:
        return length >= 1 and 1 <= layers <= min(n_gates, n_layers or n_gates) and length * layers == rows

    if shape is not None:
        if not fits(*shape):
            raise CheckpointError(
                f"{path}: an adapter of shape {shape[0]}x{shape[1]} does not fit this file's {rows} prompt rows and "
                f"{n_gates} gates" + (f" on a {n_layers}-layer base" if n_layers else "")
            )
        return tuple(shape), "as given"
    if (hint := _V1_NAME_RE.search(path.name)) and fits(int(hint.group(1)), int(hint.group(2))):
        return (int(hint.group(1)), int(hint.group(2))), "from the file name"
    if nonzero and rows % nonzero == 0 and fits(rows // nonzero, nonzero):
        return (rows // nonzero, nonzero), f"from its {nonzero} non-zero gates"
    if rows % V1_DEFAULT_LEN == 0 and fits(V1_DEFAULT_LEN, rows // V1_DEFAULT_LEN):
        return (V1_DEFAULT_LEN, rows // V1_DEFAULT_LEN), f"the official length {V1_DEFAULT_LEN}"
    raise CheckpointError(
        f"{path}: cannot tell this LLaMA-Adapter V1 file's shape from its {rows} prompt rows and {n_gates} gates "
        f"({nonzero} non-zero). Pass it as adapter_len x adapter_layer: load(..., adapter_shape=(LEN, LAYERS)) or "
        "--adapter-shape LENxLAYERS (the official release is 10x30)"
    )


# Official V2 key prefixes: the LLaMA side under "llama.", CLIP under "clip." (its vision tower under "clip.visual.").
_V2_LLAMA, _V2_CLIP, _V2_CLIP_VISUAL = "llama.", CLIP_PREFIX, CLIP_PREFIX + "visual."
# The official loader's v_num_heads (VisualConfig's default): a head count cannot be read from weight shapes.
_V2_NUM_HEADS = VisualConfig().num_heads
_BELOW_ADAPTER_RE = re.compile(r"^layers\.(\d+)\.attention\.(gate|new_gate)$")
_VISUAL_BLOCK_RE = re.compile(r"^visual_blocks\.(\d+)\.")


def _read_official_v2(path: Path, model: object, config: object) -> AdapterFile:
    """An official V2 multimodal file: ``{'model': state, 'config': {'w_bias', 'w_lora', 'lora_rank'}}``.

    As the official loader, a missing ``config`` means no LoRA, and a LoRA file without ``new_gate``
    keeps the official model's initial new_gate of 1.

    Keys map to ours by dropping ``llama.`` (LLaMA side) and ``visual.`` after ``clip.`` (CLIP's
    vision tower); the visual adapter's names are already ours.  Two kinds of keys are read and
    deliberately not used, as in the official code: CLIP's text tower (``clip.*`` outside
    ``clip.visual``) and the gates (and new_gates) of layers below the adapted ones.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: an official V2 file's 'config' must be a dict, not {type(config).__name__}")
    tensors: dict[str, Tensor] = {}
    for key, t in model.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{path}: {key} is a {type(t).__name__}, not a tensor")
        if key.startswith(_V2_LLAMA):
            tensors[key.removeprefix(_V2_LLAMA)] = t
        elif key.startswith(_V2_CLIP_VISUAL):
            tensors[CLIP_PREFIX + key.removeprefix(_V2_CLIP_VISUAL)] = t
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
    if lora_rank:
        for layer in range(first, first + adapter_layer):
            tensors.setdefault(f"layers.{layer}.attention.new_gate", torch.ones(1, 1, 1, 1))
    visual = VisualConfig(
        clip_dim=tensors["clip_proj.weight"].shape[1],
        embed_dim=embed_dim,
        depth=1 + max(int(m.group(1)) for k in tensors if (m := _VISUAL_BLOCK_RE.match(k))),
        num_heads=_V2_NUM_HEADS,
        mlp_ratio=tensors["visual_blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        channel_order="bgr",  # trained and demonstrated on cv2.imread's pixels
    )
    config_out = AdapterConfig(
        adapter_len=query_len,
        adapter_layer=adapter_layer,
        gate_activation="tanh",
        # The official model always has (zero-init) biases; a file without them equals one with zeros.
        bias=any(role_of(k) is Role.BIAS for k in tensors),
        norm=any(role_of(k) is Role.NORM for k in tensors),
        lora_rank=lora_rank,
        visual=visual,
    )
    return AdapterFile(path, config_out, tensors, first_layer=first)


def _read_own_adapter(path: Path) -> AdapterFile:
    with open_safetensors(path) as f:
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
            bias=meta.get("bias", "false") == "true",
            norm=meta.get("norm", "false") == "true",
            lora_rank=int(meta.get("lora_rank", "0")),
            visual=VisualConfig(**visual) if visual is not None else None,
        )
        base_dims = json.loads(meta["base_model"]) if meta.get("base_model") else None
    except KeyError as e:
        raise CheckpointError(f"{path}: adapter metadata lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: adapter metadata is invalid: {e}") from None
    return AdapterFile(path, config, tensors, base_dims=base_dims, metadata=dict(meta))


def fit_adapter(
    adapter: AdapterFile, args: ModelConfig, expected: Mapping[str, torch.Size], required: Iterable[str], source: str = ""
) -> dict[str, Tensor]:
    """Check an adapter against a loaded model in one step; returns its tensors ready to assign.

    The adapter must be for a base of ``args``' dims and adapt its top layers; every key must be
    one of ``expected`` (the model's names and shapes) and every ``required`` key must be there.
    Scalar gates are brought to the per-head shape [1, H, 1, 1].
    """
    source = source or f"adapter {adapter.path}"
    if adapter.base_dims is not None and adapter.base_dims != args.summary():
        raise CheckpointError(f"{source} was trained for a base model with {adapter.base_dims}, but the loaded base has {args.summary()}")
    n = adapter.config.adapter_layer
    top = args.n_layers - n
    first = top if adapter.first_layer is None else adapter.first_layer
    if first != top:
        raise CheckpointError(
            f"{source} adapts layers {first}..{first + n - 1}, but the top {n} layers of this {args.n_layers}-layer base start at {top}"
        )
    out = {}
    for name, t in adapter.tensors.items():
        check_values(name, t, source)
        if _GATE_RE.match(name) and t.numel() == 1:
            t = t.reshape(1, 1, 1, 1).expand(1, args.n_heads, 1, 1).clone()  # scalar gate: same for every head
        out[name] = t
    check_state(expected, out, source, optional=set(expected) - set(required))
    return out


def check_values(name: str, t: Tensor, source: str) -> None:
    """Adapter weights are real numbers: an integer or bool tensor, NaN or infinity is a broken file."""
    if not t.is_floating_point():
        raise CheckpointError(f"{source}: {name} is {str(t.dtype).removeprefix('torch.')}; adapter weights must be floating point")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{source}: {name} holds {bad:,} NaN or infinite values; the file is broken: train or download it again")


def adapter_metadata(config: AdapterConfig, args: ModelConfig, training_args: Mapping[str, object] | None = None) -> dict[str, str]:
    meta = {
        "format": FORMAT_NAME,
        # Files without extras stay readable by version-1 readers.
        "format_version": FORMAT_VERSION if config.has_extras else "1",
        "adapter_len": str(config.adapter_len),
        "adapter_layer": str(config.adapter_layer),
        "gate_activation": config.gate_activation,
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
    args: ModelConfig,
    training_args: Mapping[str, object] | None = None,
) -> Path:
    """Write an adapter as .safetensors (fp32) with our metadata; atomic (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(data, str(tmp), metadata=adapter_metadata(config, args, training_args))
    durable_replace(tmp, path)
    return path
