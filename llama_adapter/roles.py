"""What each parameter is: one map from a parameter name to its role, and one table of what a role means.

Every other module asks here instead of matching names itself: which tensors an adapter file holds,
which stay fp32, which AdamW decays, how a fresh adapter is initialised, and which training phase
trains what.  Names are those of ``Transformer.state_dict()`` and, for multimodal adapters, of the
visual encoder (``clip.*`` for CLIP itself, the official V2 names for the visual adapter).

| role      | what                                   | adapter file | serving dtype | decay    | fresh value         | trained in     |
|-----------|----------------------------------------|--------------|---------------|----------|---------------------|----------------|
| base      | the frozen LLaMA weights               | no           | model         | -        | from the checkpoint | never          |
| prompt    | ``adapter_query.weight``               | yes          | fp32          | yes      | N(0, 1)             | text, pretrain |
| gate      | ``layers.N.attention.gate``            | yes          | fp32          | no       | 0                   | text, pretrain |
| new_gate  | V2 LoRA's scalar on the adapter branch | yes          | fp32          | no       | 1                   | pretrain       |
| bias      | V2 biases of wq, wo, w1, w2, w3        | yes          | model         | no       | 0                   | finetune       |
| norm      | RMSNorm weights                        | when tuned   | model         | no       | the base's          | finetune       |
| lora_down | V2 ``lora_*_l1``                       | yes          | model         | yes      | kaiming uniform     | finetune       |
| lora_up   | V2 ``lora_*_l2``                       | yes          | model         | yes      | 0                   | finetune       |
| visual    | the V2 visual adapter around CLIP      | yes          | model         | matrices | the modules' own    | pretrain       |
| clip      | CLIP's vision tower                    | no           | model         | -        | from open_clip      | never          |

Prompts and gates stay fp32 when serving because they are read once per request (``adapter_kv``);
everything else meets the activations in the model dtype.  Gates never decay: decay would pull
them back towards zero, the base model.  Training keeps every trained tensor in fp32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn


class Role(str, Enum):
    BASE = "base"
    PROMPT = "prompt"
    GATE = "gate"
    NEW_GATE = "new_gate"
    BIAS = "bias"
    NORM = "norm"
    LORA_DOWN = "lora_down"
    LORA_UP = "lora_up"
    VISUAL = "visual"
    CLIP = "clip"


# "text" trains a text adapter; "pretrain" and "finetune" are the official V2 image-text phases.
PHASES = ("text", "pretrain", "finetune")
IMAGE_PHASES = ("pretrain", "finetune")


@dataclass(frozen=True)
class RoleSpec:
    in_adapter: bool  # saved in adapter files (norms: only when the adapter tunes them)
    serving_fp32: bool
    decay: bool | None  # None: matrices decay, vectors do not
    init: str  # how a fresh adapter starts (see the table above)
    phases: frozenset[str]


ROLES: dict[Role, RoleSpec] = {
    Role.BASE: RoleSpec(False, False, False, "checkpoint", frozenset()),
    Role.PROMPT: RoleSpec(True, True, True, "normal", frozenset({"text", "pretrain"})),
    Role.GATE: RoleSpec(True, True, False, "zeros", frozenset({"text", "pretrain"})),
    # The official pretrain rule trains every name containing "gate"; finetune leaves new_gate as it is.
    Role.NEW_GATE: RoleSpec(True, True, False, "ones", frozenset({"pretrain"})),
    Role.BIAS: RoleSpec(True, False, False, "zeros", frozenset({"finetune"})),
    Role.NORM: RoleSpec(True, False, False, "checkpoint", frozenset({"finetune"})),
    Role.LORA_DOWN: RoleSpec(True, False, True, "kaiming_uniform", frozenset({"finetune"})),
    Role.LORA_UP: RoleSpec(True, False, True, "zeros", frozenset({"finetune"})),
    Role.VISUAL: RoleSpec(True, False, None, "module", frozenset({"pretrain"})),
    Role.CLIP: RoleSpec(False, False, False, "checkpoint", frozenset()),
}

# Where CLIP's own weights sit among a multimodal model's (and in the official V2 files).
CLIP_PREFIX = "clip."
# The official V2 visual adapter's modules (``VisualEncoder``), in front of and behind CLIP.
VISUAL_ADAPTER_MODULES = ("clip_proj", "clip_proj_norm", "visual_query", "visual_blocks", "visual_proj", "visual_proj_norm")
_VISUAL_PREFIXES = tuple(m + "." for m in VISUAL_ADAPTER_MODULES)
_NORM_RE = re.compile(r"^(norm|layers\.\d+\.(attention_norm|ffn_norm))\.weight$")
_LORA_RE = re.compile(r"\.lora_\w+_l([12])\.weight$")


def role_of(name: str) -> Role:
    """The role of the parameter ``name``."""
    if name.startswith(CLIP_PREFIX):
        return Role.CLIP
    if name.startswith(_VISUAL_PREFIXES):
        return Role.VISUAL
    if name == "adapter_query.weight":
        return Role.PROMPT
    if name.endswith(".attention.gate"):
        return Role.GATE
    if name.endswith(".attention.new_gate"):
        return Role.NEW_GATE
    if m := _LORA_RE.search(name):
        return Role.LORA_DOWN if m.group(1) == "1" else Role.LORA_UP
    if name.startswith("layers.") and name.endswith(".bias"):
        return Role.BIAS
    if _NORM_RE.match(name):
        return Role.NORM
    return Role.BASE


def is_adapter(name: str, tuned_norms: bool, base_biases: bool = False) -> bool:
    """Whether ``name`` belongs to the adapter (its file, its trainable tensors); norms only when tuned, and
    biases not on a base that has its own (``attention_bias`` / ``mlp_bias``)."""
    role = role_of(name)
    if role is Role.BIAS and base_biases:
        return False
    return ROLES[role].in_adapter and (role is not Role.NORM or tuned_norms)


def serving_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``name`` is kept in for serving, in a model of ``dtype``."""
    return torch.float32 if ROLES[role_of(name)].serving_fp32 else dtype


def decays(name: str, tensor: Tensor) -> bool:
    decay = ROLES[role_of(name)].decay
    return tensor.ndim > 1 if decay is None else decay


def trains_in_phase(name: str, phase: str) -> bool:
    if phase not in PHASES:
        raise ValueError(f"unknown training phase {phase!r}; use one of {', '.join(PHASES)}")
    return phase in ROLES[role_of(name)].phases


@torch.no_grad()
def init_fresh(name: str, tensor: Tensor) -> None:
    """Give ``tensor`` the value a fresh adapter starts with, in place; base values (norms) are left alone."""
    init = ROLES[role_of(name)].init
    if init == "normal":
        nn.init.normal_(tensor)
    elif init == "zeros":
        nn.init.zeros_(tensor)
    elif init == "ones":
        nn.init.ones_(tensor)
    elif init == "kaiming_uniform":  # nn.Linear's own initialisation, as the official LoRA layers get it
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def prepare_for_training(tensors: Mapping[str, Tensor], phase: str) -> dict[str, nn.Parameter]:
    """Unfreeze what ``phase`` trains, in fp32 master weights; everything else stays frozen.

    ``tensors`` are an adapter's parameters (``Pipeline.adapter_tensors``).  Returns the trained ones.
    """
    trained = {}
    for name, p in tensors.items():
        if isinstance(p, nn.Parameter) and trains_in_phase(name, phase):
            p.data = p.data.float()
            p.requires_grad_(True)
            trained[name] = p
    return trained


def prepare_for_serving(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> None:
    """Back from fp32 training to the dtypes a loaded model has, so a trained pipeline generates as a loaded one.

    ``requires_grad`` stays as training set it: it still tells which tensors were trained.
    """
    for name, p in tensors.items():
        if isinstance(p, nn.Parameter):
            p.data = p.data.to(serving_dtype(name, dtype))
