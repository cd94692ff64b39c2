"""Adapter files for the timm / transformers backbones: one small safetensors file per trained adapter.

It holds the prompts, the gates and the task head under the backbone's own state-dict names
(``blocks.11.attn.adapter.prompt``, ``head.weight``, ...), and string metadata: the format, the library and
the name of the backbone it was trained on (what ``timm.create_model`` / ``from_pretrained`` take), the
backbone's depth, width and heads, the adapter's shape, the gate activation, the task's settings (class
names, or the QA window) and the training arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llama_adapter.weights.files import durable_replace

from .attention import GATE_ACTIVATION
from .errors import BackboneError

FORMAT = "llama-adapter-backbone-1"


@dataclass(frozen=True)
class AdapterInfo:
    library: str  # "timm" or "transformers"
    backbone: str  # the name the library loads it by
    task: str  # "classify" or "squad"
    adapter_len: int
    adapter_layer: int
    shape: dict[str, int]  # the backbone's depth, dim, heads
    task_config: dict = field(default_factory=dict)
    gate_activation: str = GATE_ACTIVATION
    trainable_parameters: int = 0
    training_args: dict = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "library": self.library,
            "backbone": self.backbone,
            "task": self.task,
            "adapter_len": str(self.adapter_len),
            "adapter_layer": str(self.adapter_layer),
            "shape": json.dumps(self.shape),
            "task_config": json.dumps(self.task_config),
            "gate_activation": self.gate_activation,
            "trainable_parameters": str(self.trainable_parameters),
            "training_args": json.dumps(self.training_args, default=str),
        }


def save_backbone_adapter(path: str | Path, tensors: dict[str, Tensor], info: AdapterInfo) -> Path:
    """Write fp32 tensors and ``info`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(data, str(tmp), metadata=info.metadata())
    durable_replace(tmp, path)  # fsync before the rename: never a renamed but empty file
    return path


def read_backbone_adapter(path: str | Path, task: str | None = None) -> tuple[dict[str, Tensor], AdapterInfo]:
    """The tensors and metadata of an adapter file; a clear error if it is not one (of ``task``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter.safetensors"
    if not path.is_file():
        raise BackboneError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BackboneError(f"{path} is not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise BackboneError(f"{path} is not a backbone adapter file (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        info = AdapterInfo(
            library=meta["library"],
            backbone=meta["backbone"],
            task=meta["task"],
            adapter_len=int(meta["adapter_len"]),
            adapter_layer=int(meta["adapter_layer"]),
            shape=json.loads(meta["shape"]),
            task_config=json.loads(meta["task_config"]),
            gate_activation=meta["gate_activation"],
            trainable_parameters=int(meta["trainable_parameters"]),
            training_args=json.loads(meta["training_args"]),
        )
    except (KeyError, ValueError) as e:
        raise BackboneError(f"{path}: incomplete or corrupt metadata ({e!r})") from e
    if task is not None and info.task != task:
        raise BackboneError(f"{path} is a {info.task!r} adapter, not a {task!r} one")
    if info.gate_activation != GATE_ACTIVATION:
        raise BackboneError(f"{path}: gate activation {info.gate_activation!r} is not supported (only {GATE_ACTIVATION!r})")
    return tensors, info


def load_into(
    model: nn.Module, tensors: dict[str, Tensor], info: AdapterInfo, shape: dict[str, int], expected: set[str], where: str
) -> None:
    """Copy an adapter's tensors into ``model`` (whose adapters and head are already in place).

    ``shape`` is the backbone's (depth, dim, heads) and ``expected`` the names the file must hold exactly.
    """
    if shape != info.shape:
        raise BackboneError(f"{where} was trained on {info.backbone!r} ({_dims(info.shape)}); this backbone has {_dims(shape)}")
    missing, unknown = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(unknown)}"] if unknown else [])
        raise BackboneError(f"{where} does not fit this model: {'; '.join(parts)}")
    state = model.state_dict()
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (model {tuple(state[k].shape)})" for k in sorted(expected) if tensors[k].shape != state[k].shape
    ]
    if wrong:
        raise BackboneError(f"{where}: tensor shapes differ from the model's: {', '.join(wrong)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def _dims(shape: dict[str, int]) -> str:
    return f"{shape.get('depth')} layers, width {shape.get('dim')}, {shape.get('heads')} heads"
