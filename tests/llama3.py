"""A tiny Llama-3-style base, made as its makers make one: a byte-level BPE ``tokenizer.json`` trained with
``tokenizers``, saved with its chat template through transformers, and a ``LlamaForCausalLM`` with llama3
RoPE scaling, tied embeddings and grouped-query attention."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADERS = ("<|start_header_id|>", "<|end_header_id|>")
SPECIALS = [BOS, EOS, *HEADERS, EOT]
# Llama 3's own template (Meta's tokenizer_config.json), written out here.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def train_byte_level_tokenizer(out: Path, lines: list[str], vocab_size: int = 420) -> Path:
    """tokenizer.json + tokenizer_config.json (with the chat template) as transformers saves them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens(SPECIALS)  # after the merges, as Llama 3's 128000+
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def write_llama3_base(out: Path, lines: list[str], seed: int = 0, **overrides: object) -> Path:
    """The whole base directory: tokenizer files, config.json, generation_config.json, model.safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    train_byte_level_tokenizer(out, lines)
    vocab = json.loads((out / "tokenizer.json").read_text())
    n_words = 1 + max([*vocab["model"]["vocab"].values(), *(t["id"] for t in vocab["added_tokens"])])
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    cfg = dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=n_words, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=ROPE_SCALING, max_position_embeddings=256,
        initializer_range=0.15, tie_word_embeddings=True, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
    )  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    # Hub checkpoints spell RoPE as rope_theta + rope_scaling (transformers 5 writes rope_parameters): keep the Hub's.
    saved = json.loads((out / "config.json").read_text())
    rope = saved.pop("rope_parameters")
    saved["rope_theta"] = rope.pop("rope_theta")
    saved["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    # Llama-3-Instruct: a reply ends at <|eot_id|> (or <|end_of_text|>).
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]}))
    return out
