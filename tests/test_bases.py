"""LLaMA-family bases beyond Llama 1/2, against transformers: a tiny Llama-3-style checkpoint (byte-level BPE
tokenizer.json, llama3 RoPE scaling, tied embeddings, GQA), explicit head_dim and biases, and bad bases."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import llama_adapter
from llama_adapter import CheckpointError
from llama_adapter.inputs.tokenizer import StreamDecoder
from llama_adapter.model.llama import rope_frequencies
from llama_adapter.model.quantize import Int8Linear
from llama_adapter.weights.base import open_tokenizer

from .conftest import make_hf_model
from .llama3 import EOS, EOT

TEXT = "the water is long and the people come to find oil, 日本語のテキスト 🙂 👍🏽 said she"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: fastest on one thread, and the cores are shared


def test_llama3_tokens_and_logits_match_transformers(llama3_pipe, llama3_hf) -> None:
    hf_model, hf_tok = llama3_hf
    ids = llama3_pipe.tokenizer.encode(TEXT)
    assert ids == hf_tok(TEXT).input_ids  # BOS from the post-processor, byte-level BPE pieces
    assert llama3_pipe.tokenizer.decode(ids) == TEXT == hf_tok.decode(ids, skip_special_tokens=True)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(tokens).logits
        ours = llama3_pipe.model(tokens)
    assert (ours - ref).abs().max().item() <= 1e-4
    # Far past the llama3 scaling's original context (32), where the scaled frequencies matter.
    long = torch.tensor([(ids * 10)[:200]])
    with torch.no_grad():
        assert (llama3_pipe.model(long) - hf_model(long).logits).abs().max().item() <= 1e-4


def test_tied_embeddings_are_one_tensor(llama3_pipe) -> None:
    model = llama3_pipe.model
    assert model.output.weight is model.tok_embeddings.weight
    adapted = llama3_pipe.with_adapter(llama_adapter.AdapterConfig(adapter_len=3, adapter_layer=2))
    assert adapted.model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_llama3_greedy_stream_equals_transformers_generate(llama3_pipe, llama3_hf) -> None:
    hf_model, hf_tok = llama3_hf
    prompt = "which way do they go now that it is day"
    stop_ids = sorted(llama3_pipe.tokenizer.stop_ids)
    stream = llama3_pipe.stream(prompt, max_new_tokens=40, temperature=0)
    text = "".join(stream)
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    ref = out[0, ids.shape[1] :].tolist()
    if ref and ref[-1] in stop_ids:
        ref = ref[:-1]
    assert stream.generated_ids == ref
    assert len(ref) > 10
    assert text == hf_tok.decode(ref, skip_special_tokens=True)


def test_rope_frequencies_equal_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cases = {"llama3": {"rope_type": "llama3", **llama3}, "linear": {"rope_type": "linear", "factor": 4.0}}
    for kind, scaling in cases.items():
        config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0, rope_scaling=scaling)
        ref, _ = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
        ours = rope_frequencies(64, 500000.0, scaling)
        assert torch.equal(ours, ref), kind


def test_config_spellings_old_and_new_agree(llama3_dir: Path, tmp_path: Path) -> None:
    hub = llama_adapter.ModelConfig.from_hf_config(llama3_dir / "config.json")
    cfg = json.loads((llama3_dir / "config.json").read_text())
    cfg["rope_parameters"] = {**cfg.pop("rope_scaling"), "rope_theta": cfg.pop("rope_theta")}  # as transformers 5 writes it
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert llama_adapter.ModelConfig.from_hf_config(tmp_path / "config.json") == hub
    assert hub.rope_theta == 500000.0 and hub.rope_scaling["rope_type"] == "llama3" and hub.tie_word_embeddings


def test_explicit_head_dim_biases_and_linear_rope_match_transformers(tmp_path: Path, tokenizer_path: Path) -> None:
    """head_dim other than hidden/heads, attention_bias, mlp_bias, linear RoPE scaling (old 'type' spelling)."""
    extra = dict(head_dim=24, attention_bias=True, mlp_bias=True, rope_scaling={"type": "linear", "factor": 2.0})
    hf_model = make_hf_model(seed=3, **extra)
    with torch.no_grad():  # biases start at zero: make them matter
        for name, p in hf_model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    pipe = llama_adapter.load(tmp_path, device="cpu", dtype="fp32")
    assert pipe.model.args.head_dim == 24 and pipe.model.args.attention_bias and pipe.model.args.mlp_bias
    tokens = torch.tensor([pipe.tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert (pipe.model(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-4
    # The base's biases are base weights: a fresh adapter adds only prompts and gates.
    adapted = pipe.with_adapter(llama_adapter.AdapterConfig(adapter_len=2, adapter_layer=2))
    assert set(adapted.model.adapter_parameters()) == {"adapter_query.weight", "layers.2.attention.gate", "layers.3.attention.gate"}


def test_byte_level_streaming_is_exact_on_emoji_and_cjk(llama3_pipe) -> None:
    tok = llama3_pipe.tokenizer
    ids = tok.encode("emoji 🙂 🚀 👍🏽 日本語のテキストと中文文本 ∑ √ naïve café", bos=False)
    assert len(ids) > len("🙂🚀👍🏽日本語のテキストと中文文本")  # rare characters are split into byte tokens
    decoder, deltas = StreamDecoder(tok), []
    for i in ids:
        deltas.append(decoder.push(i))
    deltas.append(decoder.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # no half characters on the way
    rng = random.Random(0)  # random ids: invalid byte sequences, leading spaces, specials
    for _ in range(200):
        ids = [rng.randrange(tok.n_words) for _ in range(rng.randint(1, 30))]
        decoder = StreamDecoder(tok)
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == tok.decode(ids), ids


def test_end_of_turn_tokens_stop_generation(llama3_pipe, llama3_dir: Path, tmp_path: Path) -> None:
    tok = llama3_pipe.tokenizer
    vocab = tok.backend.get_vocab()
    assert tok.stop_ids == {vocab[EOT], vocab[EOS]}  # tokenizer_config's eos_token and generation_config's list
    assert tok.eos_id == vocab[EOT]
    # A base whose generation_config names, as end of turn, the token the model greedily says third.
    stream = llama3_pipe.stream("the people", max_new_tokens=6, temperature=0)
    list(stream)
    third = stream.generated_ids[2]
    assert third not in stream.generated_ids[:2]
    other = tmp_path / "base"
    shutil.copytree(llama3_dir, other)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [third]}))
    stopped = llama_adapter.load(other, device="cpu", dtype="fp32").stream("the people", max_new_tokens=6, temperature=0)
    assert "".join(stopped) == tok.decode(stream.generated_ids[:2])
    assert stopped.finish_reason == "eos" and stopped.generated_ids == stream.generated_ids[:2]


def test_int8_quantizes_the_tied_head_from_the_embedding(llama3_dir: Path, llama3_pipe) -> None:
    q = llama_adapter.load(llama3_dir, device="cpu", dtype="fp32", quantize="int8")
    assert isinstance(q.model.output, Int8Linear) and q.model.output.weight.dtype == torch.int8
    emb = llama3_pipe.model.tok_embeddings.weight
    assert torch.equal(q.model.tok_embeddings.weight, emb)
    scale = emb.abs().amax(dim=1) / 127  # per-row absmax, as int8 serving quantizes every matrix
    assert torch.equal(q.model.output.weight, (emb / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
    assert torch.allclose(q.model.output.scale, scale)
    adapted = q.with_adapter(llama_adapter.AdapterConfig(adapter_len=3, adapter_layer=2))  # shares the int8 head
    assert adapted.model.output.weight.data_ptr() == q.model.output.weight.data_ptr()
    tokens = torch.tensor([llama3_pipe.tokenizer.encode(TEXT)])
    with torch.no_grad():
        ref, ours = llama3_pipe.model(tokens), q.model(tokens)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85


def test_other_architectures_are_refused_by_name(tmp_path: Path, hf_dir: Path) -> None:
    shutil.copytree(hf_dir, tmp_path / "gpt2")
    cfg = json.loads((tmp_path / "gpt2" / "config.json").read_text()) | {"model_type": "gpt2"}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported.*'llama'.*Llama 1/2/3"):
        llama_adapter.load(tmp_path / "gpt2", device="cpu")


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path, llama3_dir: Path) -> None:
    shutil.copytree(llama3_dir, tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["vocab_size"] -= 10
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tokenizer.json has 425 tokens but the model .* has only 415 embeddings"):
        llama_adapter.load(tmp_path / "base", device="cpu")


def test_dynamic_rope_keeps_to_the_original_context(tmp_path: Path, llama3_dir: Path) -> None:
    cfg = json.loads((llama3_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args = llama_adapter.ModelConfig.from_hf_config(tmp_path / "config.json")
    # transformers scales only past max_position_embeddings (256): up to there the frequencies are plain.
    assert args.max_seq_len == 256 and args.rope_scaling is None
    with pytest.raises(ValueError, match="plain RoPE only up to the original 256 positions"):
        llama_adapter.ModelConfig.from_hf_config(tmp_path / "config.json", max_seq_len=512)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported; supported: default, linear, llama3, dynamic"):
        llama_adapter.ModelConfig.from_hf_config(tmp_path / "config.json")


def test_sentencepiece_style_tokenizer_json_streams_exactly(tmp_path: Path) -> None:
    """The other kind of tokenizer.json (TinyLlama, Llama-2 HF repos): Metaspace pieces with byte fallback, whose
    decoder strips the first space; BOS comes from the file's post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    from .conftest import SPECIAL_LINES, corpus_lines

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    hf = open_tokenizer(tmp_path)
    assert (hf.bos_id, hf.eos_id, hf.stop_ids) == (1, 2, {2})
    for line in SPECIAL_LINES:
        ids = hf.encode(line)
        assert ids[0] == 1 and ids[1:] == tok.encode(line, add_special_tokens=False).ids
        decoder = StreamDecoder(hf)
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == hf.decode(ids) == line
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(hf.n_words) for _ in range(rng.randint(1, 30))]
        decoder = StreamDecoder(hf)
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == hf.decode(ids), ids
