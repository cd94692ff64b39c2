"""The --tiny model: built offline through the real files and load(), with replies that run their length."""

from __future__ import annotations

from pathlib import Path

import pytest
from sentencepiece import SentencePieceProcessor

from llama_adapter import Pipeline, format_prompt, read_adapter
from llama_adapter.tiny import TINY_ADAPTER, TINY_ARGS, load_tiny, write_tiny


@pytest.fixture(scope="module")
def tiny() -> Pipeline:
    return load_tiny("cpu")


def test_files_are_in_the_real_formats(tmp_path: Path) -> None:
    base, adapter = write_tiny(tmp_path)
    assert sorted(p.name for p in base.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model", "tokenizer.vocab"]
    sp = SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.is_byte(sp.piece_to_id("<0xF0>"))  # byte fallback
    assert read_adapter(adapter).config == TINY_ADAPTER


def test_tiny_pipeline(tiny: Pipeline) -> None:
    assert tiny.model.args.dim == TINY_ARGS.dim and tiny.max_seq_len == TINY_ARGS.max_seq_len
    assert tiny.adapter_parameter_count() == TINY_ADAPTER.adapter_len * TINY_ADAPTER.adapter_layer * TINY_ARGS.dim + 2 * TINY_ARGS.n_heads
    gates = [p for name, p in tiny.model.adapter_parameters().items() if name.endswith("gate")]
    assert all(g.abs().sum() > 0 for g in gates)  # the adapter changes the output: its path is exercised


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_replies_run_their_length_in_word_pieces(tiny: Pipeline, temperature: float) -> None:
    stream = tiny.stream(format_prompt("Tell me about alpacas."), max_new_tokens=64, temperature=temperature, top_p=0.95, seed=1)
    text = "".join(stream)
    assert stream.finish_reason == "length" and len(stream.generated_ids) == 64
    sp = tiny.tokenizer.sp
    assert not any(sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) for i in stream.generated_ids)
    assert text.strip()
