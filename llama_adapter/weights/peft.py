"""peft ``AdaptionPromptConfig`` checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

peft's AdaptionPrompt (``peft.tuners.adaption_prompt``) is the same zero-init attention with two
differences of form: each adapted layer holds its own prompt, ``...layers.N.self_attn.adaption_prompt``
[1, len, dim], and one raw scalar gate, ``...adaption_gate`` [1], applied without tanh.  It adapts the
top ``adapter_layers`` layers, as we do.  So a peft adapter is our adapter with identity gates equal
across heads, and ours can be written for peft when its gates are equal across heads in every layer
(a tanh gate then becomes its tanh) and it has no V2 extras.

peft also computes the branch differently from the formula on two kinds of base, so neither direction
is allowed there: with ``attention_bias`` (peft adds ``o_proj``'s bias a second time) and with a
``head_dim`` other than dim / heads (peft's head count for the keys assumes it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..config import AdapterConfig, ModelConfig
from ..errors import CheckpointError
from .adapter import AdapterFile

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPE = "ADAPTION_PROMPT"
# How PeftModel.save_pretrained names the tensors of a LlamaForCausalLM.
KEY_PREFIX = "base_model.model.model.layers"
_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def check_peft_base(args: ModelConfig, source: str) -> None:
    """Refuse the bases on which peft's AdaptionPrompt computes something else than the formula (see the module doc)."""
    if args.attention_bias:
        raise CheckpointError(f"{source}: peft's AdaptionPrompt adds o_proj's bias twice on bases with attention_bias; not convertible")
    if args.head_dim * args.n_heads != args.dim:
        raise CheckpointError(f"{source}: peft's AdaptionPrompt assumes head_dim = dim / heads, and this base has head_dim {args.head_dim}")


def read_peft_adapter(directory: Path) -> AdapterFile:
    """A peft AdaptionPrompt directory as an adapter of ours: prompts stacked by layer, raw scalar gates."""
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    kind = config.get("peft_type")
    if kind != PEFT_TYPE:
        raise CheckpointError(f"{config_path}: a peft {kind} adapter; only {PEFT_TYPE} adapters (LLaMA-Adapter) load here")
    if config.get("target_modules", "self_attn") != "self_attn":
        raise CheckpointError(f"{config_path}: target_modules {config['target_modules']!r}; LLaMA's attention is self_attn")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (only adapter_model.bin: re-save it with safe_serialization=True)" if (directory / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}{hint}")
    try:
        adapter_len, adapter_layers = int(config["adapter_len"]), int(config["adapter_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: needs integer adapter_len and adapter_layers ({e})") from None
    prompts: dict[int, Tensor] = {}
    gates: dict[int, Tensor] = {}
    for key, t in load_file(str(weights)).items():
        m = _KEY_RE.search(key)
        if m is None:
            raise CheckpointError(f"{weights}: unexpected key {key} for a peft AdaptionPrompt adapter")
        (prompts if m.group(2) == "prompt" else gates)[int(m.group(1))] = t
    layers = sorted(prompts)
    if set(gates) != set(prompts) or len(layers) != adapter_layers or layers != list(range(layers[0], layers[0] + adapter_layers)):
        raise CheckpointError(
            f"{weights}: needs a prompt and a gate on each of {adapter_layers} consecutive layers; "
            f"found prompts on {layers} and gates on {sorted(gates)}"
        )
    for i in layers:
        if prompts[i].shape[:2] != (1, adapter_len) or prompts[i].ndim != 3 or gates[i].numel() != 1:
            raise CheckpointError(
                f"{weights}: layer {i} has prompt {list(prompts[i].shape)} and gate {list(gates[i].shape)}; "
                f"expected [1, {adapter_len}, dim] and [1]"
            )
    tensors = {"adapter_query.weight": torch.cat([prompts[i][0] for i in layers]).float()}
    tensors |= {f"layers.{i}.attention.gate": gates[i].float().reshape(1) for i in layers}
    cfg = AdapterConfig(adapter_len=adapter_len, adapter_layer=adapter_layers, gate_activation="identity")
    meta = {"format": "peft", "base_model_name_or_path": str(config.get("base_model_name_or_path") or "")}
    return AdapterFile(weights, cfg, tensors, first_layer=layers[0], metadata=meta)


def peft_tensors(tensors: Mapping[str, Tensor], config: AdapterConfig, n_layers: int, source: str) -> dict[str, Tensor]:
    """Our adapter's tensors under peft's names and shapes; refuses what peft cannot express."""
    if config.has_extras:
        raise CheckpointError(
            f"{source} has V2 extras (biases, norms, LoRA or a visual adapter), which peft's AdaptionPrompt cannot hold; "
            "only prompt-and-gate adapters convert"
        )
    first = n_layers - config.adapter_layer
    prompts = tensors["adapter_query.weight"].detach().float().view(config.adapter_layer, 1, config.adapter_len, -1)
    out: dict[str, Tensor] = {}
    for j in range(config.adapter_layer):
        i = first + j
        gate = tensors[f"layers.{i}.attention.gate"].detach().float().flatten()
        if not torch.equal(gate, gate[:1].expand_as(gate)):
            raise CheckpointError(
                f"{source}: layer {i} has a different gate for each head ({gate.tolist()}), and peft's AdaptionPrompt has one "
                "scalar gate per layer; it cannot be converted exactly"
            )
        scalar = gate[:1].tanh() if config.gate_activation == "tanh" else gate[:1]
        out[f"{KEY_PREFIX}.{i}.self_attn.adaption_prompt"] = prompts[j].contiguous()
        out[f"{KEY_PREFIX}.{i}.self_attn.adaption_gate"] = scalar.clone()
    return out


def save_peft_adapter(
    out_dir: str | Path,
    tensors: Mapping[str, Tensor],
    config: AdapterConfig,
    args: ModelConfig,
    base_name: str = "",
    source: str = "adapter",
) -> Path:
    """Write ``out_dir/adapter_config.json`` and ``adapter_model.safetensors`` as peft's ``save_pretrained`` does."""
    check_peft_base(args, source)
    data = peft_tensors(tensors, config, args.n_layers, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "adapter_layers": config.adapter_layer,
        "adapter_len": config.adapter_len,
        "auto_mapping": None,
        "base_model_name_or_path": base_name or None,
        "inference_mode": True,
        "peft_type": PEFT_TYPE,
        "revision": None,
        "target_modules": "self_attn",
        "task_type": "CAUSAL_LM",
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(data, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out
