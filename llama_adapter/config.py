"""Model and adapter hyper-parameters, read from Meta ``params.json`` or HF ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

GateActivation = Literal["tanh", "identity"]
# The pixel order an image adapter was trained on: CLIP's RGB, or BGR for the official V2 releases, whose
# training data, demo and app all read images with cv2.imread.
ChannelOrder = Literal["rgb", "bgr"]


# Meta's (and the official LLaMA-Adapter code's) ModelArgs default, for a params.json without norm_eps.
META_NORM_EPS = 1e-5

# What from_hf_config reads: transformers' Llama (other model types may share its layout but not its maths).
SUPPORTED_MODEL_TYPES = ("llama",)
# RoPE frequency scalings that are a fixed table (transformers' names); "dynamic" is exact up to the original context.
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")

# Sane ranges for a model's shape, checked before anything is allocated (a config saying n_layers: 1e9
# would otherwise hang building the model).  Far above any LLaMA: 405B has 126 layers, dim 16384.
_MODEL_LIMITS: dict[str, tuple[type, float, float]] = {
    "dim": (int, 2, 65536),
    "n_layers": (int, 1, 1024),
    "n_heads": (int, 1, 4096),
    "n_kv_heads": (int, 1, 4096),
    "vocab_size": (int, 1, 2**22),
    "multiple_of": (int, 1, 2**16),
    "ffn_dim_multiplier": (float, 1e-3, 64),
    "hidden_dim": (int, 1, 2**20),
    "norm_eps": (float, 1e-12, 1.0),
    "rope_theta": (float, 1.0, 1e12),
    "max_seq_len": (int, 1, 2**20),
}


def _check_numbers(config: object, limits: dict[str, tuple[type, float, float]]) -> None:
    """Each field is a number of the right kind within its range (None where the field is optional)."""
    for name, (kind, low, high) in limits.items():
        value = getattr(config, name)
        if value is None and name in ("n_kv_heads", "ffn_dim_multiplier", "hidden_dim"):
            continue
        if isinstance(value, float) and kind is int and value.is_integer():
            value = int(value)  # 4096.0 from a JSON writer is 4096
            setattr(config, name, value)
        ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type:
            raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, not {value!r}")
        if not low <= value <= high:  # NaN fails too
            raise ValueError(f"{name} {value} is out of range: expected {low:g} to {high:g}")


@dataclass
class ModelConfig:
    """Shape of a LLaMA base model (Meta naming)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    # Explicit FFN width (HF ``intermediate_size``); overrides the Meta rounding rule.
    hidden_dim: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # The output head is the embedding matrix (Llama-3.2-1B/3B): one tensor, never two copies.
    tie_word_embeddings: bool = False
    # An explicit head width (HF ``head_dim``) when it is not dim / n_heads.
    head_size: int | None = None
    # Biases on q/k/v/o (HF ``attention_bias``) and on the MLP (``mlp_bias``): part of the base model.
    attention_bias: bool = False
    mlp_bias: bool = False
    # transformers' rope parameters without rope_theta: {"rope_type": "llama3", "factor": 32.0, ...}; None is plain RoPE.
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_numbers(self, _MODEL_LIMITS)
        if self.n_kv_heads is not None and self.n_kv_heads > self.n_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads} is more than n_heads {self.n_heads}")
        if self.head_size is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def has_base_biases(self) -> bool:
        """Whether the base model itself has biases (then no adapter may add its own on the same projections)."""
        return self.attention_bias or self.mlp_bias

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params_json(cls, path: str | Path, tokenizer_vocab: int | None = None, **overrides: Any) -> ModelConfig:
        """Meta ``params.json``; its ``vocab_size`` of -1 (LLaMA-1) means the tokenizer's size."""
        params = _read_json_object(path)
        known = {f for f in cls.__dataclass_fields__}
        if params.get("use_scaled_rope"):
            raise ValueError(f"{path}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
        unknown = set(params) - known - {"use_scaled_rope", "max_batch_size"}  # the latter changes nothing here
        if unknown:
            raise ValueError(f"{path}: unsupported params {sorted(unknown)}")
        params.setdefault("norm_eps", META_NORM_EPS)
        params.update(overrides)
        vocab = params.get("vocab_size", -1)
        if isinstance(vocab, (int, float)) and not isinstance(vocab, bool) and vocab <= 0:
            if tokenizer_vocab is None:
                raise ValueError(f"{path}: vocab_size is {params.get('vocab_size')}; pass the tokenizer's size")
            params["vocab_size"] = tokenizer_vocab
        try:
            return cls(**{k: v for k, v in params.items() if k in known})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_hf_config(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        """A transformers ``LlamaConfig`` (Llama 1/2/3, TinyLlama, SmolLM, ...), old or new (``rope_parameters``) style."""
        cfg = _read_json_object(path)
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(map(repr, SUPPORTED_MODEL_TYPES))
            raise ValueError(
                f"{path}: model_type {model_type!r} is not supported; this package runs the LLaMA architecture "
                f"(model_type {supported}: Llama 1/2/3, TinyLlama, SmolLM and other LlamaForCausalLM checkpoints)"
            )
        missing = [
            k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size") if k not in cfg
        ]
        if missing:
            raise ValueError(f"{path}: lacks {', '.join(missing)}; is it a Llama config.json?")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (LLaMA uses silu)")
        if cfg.get("pretraining_tp", 1) != 1:
            raise ValueError(
                f"{path}: pretraining_tp {cfg['pretraining_tp']} is not supported; re-save the checkpoint with pretraining_tp 1"
            )
        n_heads = cfg["num_attention_heads"]
        rope = rope_parameters(path, cfg)
        theta = rope.pop("rope_theta")
        # Dynamic NTK (as transformers computes it) changes nothing within max_position_embeddings: stay there.
        max_seq_len = cfg.get("max_position_embeddings", 2048)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        args: dict[str, Any] = dict(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_seq_len=max_seq_len,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            head_size=head_dim if head_dim * n_heads != cfg["hidden_size"] else None,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=rope if rope.get("rope_type", "default") not in ("default", "dynamic") else None,
        )
        if "max_seq_len" in overrides and rope.get("rope_type") == "dynamic" and overrides["max_seq_len"] > max_seq_len:
            raise ValueError(
                f"{path}: dynamic RoPE scaling is plain RoPE only up to the original {max_seq_len} positions; "
                f"pass max_seq_len <= {max_seq_len}"
            )
        args.update(overrides)
        try:
            config = cls(**args)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if cfg.get("head_dim", config.head_dim) != config.head_dim:
            raise ValueError(f"{path}: head_dim other than hidden_size / num_attention_heads is not supported")
        return config

    def summary(self) -> dict[str, int]:
        """The dims an adapter depends on (stored in adapter metadata and checked on load)."""
        return {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.kv_heads}


def rope_parameters(path: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` plus the scaling of a config.json, from either spelling: ``rope_theta`` + ``rope_scaling``
    (checkpoints on the Hub) or ``rope_parameters`` (what transformers 5 writes); ``type`` is ``rope_type``'s old name."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    kind = params.setdefault("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"{path}: RoPE scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{path}: partial_rotary_factor {params['partial_rotary_factor']} is not supported")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [k for k in needed.get(kind, ()) if k not in params]
    if missing:
        raise ValueError(f"{path}: {kind} RoPE scaling lacks {', '.join(missing)}")
    return params


def _read_json_object(path: str | Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or copy it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


# The name this class had before 0.2 (kept for one release).
ModelArgs = ModelConfig


@dataclass
class VisualConfig:
    """The image side of a multimodal adapter (official V2 layout).

    CLIP's tokens go through ``clip_proj`` + ``clip_proj_norm`` to ``embed_dim``; ``adapter_len``
    learned queries are put in front, ``depth`` ViT blocks run over both, and the queries come
    out through ``visual_proj`` + ``visual_proj_norm`` as one visual prompt added to every
    adapted layer's adaption prompt.
    """

    clip_model: str = "ViT-L-14"  # the open_clip model the adapter was trained with
    clip_pretrained: str | None = "openai"  # its open_clip pretrained tag
    clip_dim: int = 768  # width of CLIP's output tokens (after its ``proj``)
    embed_dim: int = 768
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    channel_order: ChannelOrder = "rgb"

    def __post_init__(self) -> None:
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', not {self.channel_order!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"visual embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if min(self.clip_dim, self.embed_dim, self.depth, self.num_heads) < 1:
            raise ValueError(f"visual dims must be >= 1: {self}")


@dataclass
class AdapterConfig:
    """Adaption prompts of ``adapter_len`` tokens in each of the top ``adapter_layer`` layers.

    The official V2 extras are off by default; when off they add no module, parameter or branch:
    ``bias`` (zero-init biases on wq, wo, w1, w2, w3 of every layer), ``norm`` (the RMSNorm
    weights are tuned and travel with the adapter), ``lora_rank`` > 0 (LoRA on every projection
    of every layer, plus the official ``new_gate`` on the adapter branch) and ``visual``.
    """

    adapter_len: int = 10
    adapter_layer: int = 30
    # tanh for adapters we train and the official V2 ones; identity for the official V1 release.
    gate_activation: GateActivation = "tanh"
    bias: bool = False
    norm: bool = False
    lora_rank: int = 0
    visual: VisualConfig | None = None

    def __post_init__(self) -> None:
        if self.gate_activation not in ("tanh", "identity"):
            raise ValueError(f"gate_activation must be 'tanh' or 'identity', not {self.gate_activation!r}")
        if self.adapter_len < 1 or self.adapter_layer < 1:
            raise ValueError(f"adapter_len and adapter_layer must be >= 1, got {self.adapter_len}, {self.adapter_layer}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 is no LoRA), got {self.lora_rank}")

    @property
    def has_extras(self) -> bool:
        """Whether anything beyond prompts and gates is on (files then need format version 2)."""
        return self.bias or self.norm or self.lora_rank > 0 or self.visual is not None
