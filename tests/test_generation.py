"""Streaming generation: detokenization, stop strings, batching, cancellation, context limits, the CLI."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import llama_adapter
from llama_adapter import PromptTruncatedWarning, format_prompt, sample
from llama_adapter.inputs.tokenizer import StreamDecoder, Tokenizer
from llama_adapter.serve.pipeline import StopMatcher

from .conftest import VOCAB, corpus_lines
from .test_model import adapted_copy

TRICKY = ["hello world 🙂 日本語", "  two leading spaces", "𝔘 unseen ☃ naïve", "emoji 🚀👍🏽 end", "\n### Response:\n tabs\tand 中文文本"]


def deltas(tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tokenizer)
    out = [dec.push(i) for i in ids]
    out.append(dec.flush())
    return out


@pytest.mark.parametrize("text", TRICKY)
def test_stream_decoder_matches_full_decode(pipe, text: str) -> None:
    ids = pipe.tokenizer.encode(text, bos=False)
    assert any(pipe.tokenizer.sp.id_to_piece(i).startswith("<0x") for i in ids) or text.startswith(" ")
    parts = deltas(pipe.tokenizer, ids)
    assert "".join(parts) == pipe.tokenizer.decode(ids) == text
    assert not any(p.endswith("\ufffd") for p in parts)  # never a half character on screen


@pytest.fixture(scope="module")
def squeezing_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A tokenizer that, unlike LLaMA's, collapses whitespace (remove_extra_whitespaces): decoding a window
    that starts at a whitespace piece differs from decoding it in context."""
    out = tmp_path_factory.mktemp("squeeze")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_prefix=str(out / "t"), model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, character_coverage=0.99, remove_extra_whitespaces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return Tokenizer(out / "t.model")


@pytest.mark.parametrize("which", ["llama-like", "squeezing"])
def test_stream_decoder_on_random_ids_including_invalid_bytes(pipe, squeezing_tokenizer: Tokenizer, which: str) -> None:
    tokenizer = pipe.tokenizer if which == "llama-like" else squeezing_tokenizer
    space = tokenizer.sp.piece_to_id("\u2581")
    rng = random.Random(0)
    for _ in range(500):  # whitespace-heavy: a third of the pieces are a bare space
        ids = [space if rng.random() < 0.3 else rng.randrange(3, tokenizer.n_words) for _ in range(rng.randint(1, 40))]
        assert "".join(deltas(tokenizer, ids)) == tokenizer.decode(ids)
    word = tokenizer.encode("the", bos=False)
    ids = word + [space] * 5 + word
    assert "".join(deltas(tokenizer, ids)) == tokenizer.decode(ids)


def test_streamed_text_equals_decode_of_generated_ids(pipe) -> None:
    for seed in range(5):
        stream = pipe.stream("the water", max_new_tokens=40, temperature=1.5, top_p=1.0, seed=seed)
        text = "".join(stream)
        assert text == pipe.tokenizer.decode(stream.generated_ids)
        assert stream.finish_reason in {"eos", "length"}


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(pipe) -> None:
    greedy = ["".join(pipe.stream("the people", max_new_tokens=15, temperature=0)) for _ in range(2)]
    assert greedy[0] == greedy[1] != ""
    a = "".join(pipe.stream("the people", max_new_tokens=15, temperature=1.0, seed=7))
    b = "".join(pipe.stream("the people", max_new_tokens=15, temperature=1.0, seed=7))
    assert a == b


def test_stop_string_ends_generation_and_is_not_emitted(pipe) -> None:
    full = "".join(pipe.stream("the water", max_new_tokens=30, temperature=0))
    assert len(full) > 8
    stop = full[5:8]
    first = full.index(stop)
    stream = pipe.stream("the water", max_new_tokens=30, temperature=0, stop=["never appears", stop])
    assert "".join(stream) == full[:first]
    assert stream.finish_reason == "stop"


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["###", "\nUser:"])
    out = [m.feed(x) for x in ["Hi", " #", "#", " there", "\nUs", "e", "r: x"]]
    assert out == [("Hi", False), (" ", False), ("", False), ("## there", False), ("", False), ("", False), ("", True)]


def test_batch_greedy_equals_one_by_one(pipe) -> None:
    prompts = ["the water", "a long time ago the people made oil", "write", "which way did they go? said she"]
    single = ["".join(pipe.stream(p, max_new_tokens=20, temperature=0)) for p in prompts]
    assert pipe.generate(prompts, max_new_tokens=20, temperature=0) == single


def test_batch_with_adapter_equals_one_by_one(pipe) -> None:
    adapted = llama_adapter.Pipeline(adapted_copy(pipe, "tanh", gate_scale=1.0), pipe.tokenizer)
    prompts = ["the water", "a long time ago the people made oil"]
    single = ["".join(adapted.stream(p, max_new_tokens=16, temperature=0, stop="e a")) for p in prompts]
    assert adapted.generate(prompts, max_new_tokens=16, temperature=0, stop="e a") == single


def test_closing_the_stream_stops_the_computation(pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = pipe.model.forward_cached
    monkeypatch.setattr(pipe.model, "forward_cached", lambda *a, **k: calls.append(1) or original(*a, **k))
    stream = pipe.stream("the water", max_new_tokens=200, temperature=1.0, top_p=1.0, seed=0)
    got = 0
    for delta in stream:
        got += bool(delta)
        if got == 3:
            break
    stream.close()
    n = len(calls)
    assert n < 50
    assert list(stream) == [] and len(calls) == n  # nothing more is computed
    monkeypatch.undo()
    assert "".join(pipe.stream("the water", max_new_tokens=5, temperature=0))  # the cache is free again


def test_two_interleaved_streams_do_not_share_a_cache(pipe) -> None:
    solo = "".join(pipe.stream("the water", max_new_tokens=12, temperature=0))
    a = pipe.stream("the water", max_new_tokens=12, temperature=0)
    b = pipe.stream("which way", max_new_tokens=12, temperature=0)
    parts = [next(a), next(b), next(a), next(b)]
    rest_a, rest_b = list(a), list(b)
    assert "".join([parts[0], parts[2], *rest_a]) == solo
    assert "".join([parts[1], parts[3], *rest_b]) == "".join(pipe.stream("which way", max_new_tokens=12, temperature=0))


def test_max_new_tokens_and_context_limit(hf_dir: Path) -> None:
    small = llama_adapter.load(hf_dir, device="cpu", dtype="fp32", max_seq_len=24)
    stream = small.stream("the water", max_new_tokens=5, temperature=1.0, top_p=1.0, seed=1)
    list(stream)
    assert len(stream.generated_ids) <= 5
    ids = small.tokenizer.encode("the water")
    stream = small.stream("the water", max_new_tokens=100, temperature=0.0)
    list(stream)
    if stream.finish_reason != "eos":
        assert stream.finish_reason == "context"
        assert len(ids) + len(stream.generated_ids) == 24


def test_over_long_prompt_is_truncated_from_the_left_with_a_warning(hf_dir: Path) -> None:
    small = llama_adapter.load(hf_dir, device="cpu", dtype="fp32", max_seq_len=32)
    prompt = " ".join(["water"] * 60) + " the end"
    with pytest.warns(PromptTruncatedWarning, match="dropped its first"):
        stream = small.stream(prompt, max_new_tokens=16, temperature=0)
    assert stream.prompt_ids[0] == small.tokenizer.bos_id
    assert len(stream.prompt_ids) == 32 - 8  # room is kept for a reply of max_seq_len // 4 tokens
    assert stream.truncated_tokens == len(small.tokenizer.encode(prompt)) - len(stream.prompt_ids)
    assert stream.prompt_ids[-3:] == small.tokenizer.encode(prompt)[-3:]
    assert len(list(stream)) >= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"image": "cat.png"}, "takes no images"),
    ],
)
def test_bad_generation_arguments(pipe, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipe.stream("hi", **kwargs)


def test_sample_is_greedy_at_zero_and_respects_top_p() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    assert sample(logits, 0.0, 0.5).item() == 1
    g = torch.Generator().manual_seed(0)
    # top token holds ~50% of the mass: top_p 0.4 keeps only it
    assert {sample(logits, 1.0, 0.4, g).item() for _ in range(50)} == {1}
    seen = {sample(logits, 1.0, 0.9, g).item() for _ in range(200)}
    assert seen == {1, 2}


def test_format_prompt_is_the_official_alpaca_template() -> None:
    assert format_prompt("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a color.\n\n### Response:"
    )
    assert format_prompt("Translate.", "bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:"
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llama_adapter.generate", *args], capture_output=True, text=True, timeout=120)


def test_cli_streams_the_same_text_as_the_api(hf_dir: Path, pipe) -> None:
    expected = "".join(pipe.stream(format_prompt("Name a color."), max_new_tokens=12, temperature=0))
    done = run_cli(
        "--base", str(hf_dir), "--instruction", "Name a color.", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, hf_dir: Path) -> None:
    done = run_cli("--base", str(hf_dir), "--adapter", str(tmp_path / "missing.pth"), "--prompt", "hi")
    assert done.returncode == 2
    assert "missing.pth" in done.stderr and "Traceback" not in done.stderr
