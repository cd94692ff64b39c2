"""Zero-init attention in Hugging Face transformers' RoBERTa (and BERT-layout encoders), and the QA model around it.

Each encoder layer's ``attention.self`` projects ``query``, ``key`` and ``value`` (with biases), attends with the
padding mask, and returns the merged heads, which ``attention.output.dense`` projects.  The adapter reads q off
``attention.self.query``'s output and adds its branch to the input of ``attention.output.dense``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .attention import ZeroInitPrompt, attach, top_layers
from .errors import BackboneError


class RobertaPrompt(ZeroInitPrompt):
    def _heads(self, x: Tensor) -> Tensor:
        attn = self.owner
        return x.reshape(*x.shape[:-1], attn.num_attention_heads, attn.attention_head_size)

    def query(self, projected: Tensor) -> Tensor:
        return self._heads(projected).transpose(1, 2)  # [B, H, T, d]

    def prompt_kv(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        attn = self.owner
        k, v = attn.key.forward(prompt), attn.value.forward(prompt)  # .forward: no other hooks (e.g. LoRA) on the prompt
        return self._heads(k).transpose(0, 1), self._heads(v).transpose(0, 1)  # [H, L, d]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise BackboneError(
            f"{type(model).__name__} is not a RoBERTa/BERT-style encoder (no .encoder.layer); use RobertaModel or a task model built on it"
        )
    for i, layer in enumerate(layers):
        attention = getattr(layer, "attention", None)
        self_attn, output = getattr(attention, "self", None), getattr(attention, "output", None)
        needed = {"query": self_attn, "key": self_attn, "value": self_attn, "num_attention_heads": self_attn,
                  "attention_head_size": self_attn, "dense": output}  # fmt: skip
        missing = [name for name, owner in needed.items() if not hasattr(owner, name)]
        if missing:
            raise BackboneError(
                f"encoder.layer.{i}.attention lacks {', '.join(missing)}: only the RoBERTa/BERT self-attention layout "
                "(attention.self.query/key/value, attention.output.dense) can take zero-init adapters"
            )
    return layers


def add_roberta_adapters(model: nn.Module, adapter_len: int, adapter_layer: int) -> None:
    """Give the top ``adapter_layer`` encoder layers an adaption prompt of ``adapter_len`` tokens and a zero gate."""
    layers = encoder_layers(model)
    for i in top_layers(len(layers), adapter_layer):
        attn, output = layers[i].attention.self, layers[i].attention.output
        dim = attn.query.in_features
        scale = getattr(attn, "scaling", attn.attention_head_size**-0.5)
        adapter = RobertaPrompt(attn, adapter_len, dim, attn.num_attention_heads, scale)
        adapter.to(attn.query.weight.device)
        attach(adapter, attn.query, output.dense)


def roberta_shape(model: nn.Module) -> dict[str, int]:
    """The backbone's dimensions as recorded in adapter files: depth, width, heads."""
    layers = encoder_layers(model)
    attn = layers[0].attention.self
    return {"depth": len(layers), "dim": attn.query.in_features, "heads": attn.num_attention_heads}


def load_qa_model(name: str):
    """``AutoModelForQuestionAnswering`` and its fast tokenizer from a Hub id (``roberta-large``) or a local directory."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForQuestionAnswering.from_pretrained(name)
    except OSError as e:
        where = "directory" if Path(name).exists() else "Hugging Face model id"
        raise BackboneError(f"cannot load {where} {name!r}: {e}") from e
    if not tokenizer.is_fast:
        raise BackboneError(f"{name!r} has no fast tokenizer (tokenizer.json); answer spans need its character offsets")
    return model, tokenizer
