"""Continuous batching: concurrent requests, from threads and from pipelines with different adapters on one
base, decode together, and each gets exactly the tokens it gets alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import llama_adapter
from llama_adapter import AdapterConfig, save_adapter
from llama_adapter.model.llama import KVCache, RaggedAdapters
from llama_adapter.serve.scheduler import LOOKAHEAD, CapacityError, Row, RowsStep, Scheduler, row_adapters

from .test_model import adapted_copy

PROMPTS = ["the water", "a long time ago the people made oil", "write", "which way did they go? said she", "people"]


@pytest.fixture(scope="module")
def base(hf_dir: Path, one_thread) -> llama_adapter.Pipeline:
    """A base of this module's own, so that changing its limits touches no other test."""
    return llama_adapter.load(hf_dir, device="cpu", dtype="fp32")


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[list[object]]:
    """The rows of every decode forward the scheduler runs (each as the list of the rows' pipelines' models)."""
    seen: list[list[object]] = []
    real = Scheduler._decode

    def record(self, batch, chunks=()):
        seen.append([row.model for row in batch])
        return real(self, batch, chunks)

    monkeypatch.setattr(Scheduler, "_decode", record)
    return seen


@pytest.fixture
def chunk_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """What the scheduler's forwards do, in order: ("decode", 0, 0) per decode forward, ("ride", start, size) per
    prompt chunk riding in it, ("prefill", start, size) per chunk forwarded between steps."""
    events: list[tuple[str, int, int]] = []
    real_decode, real_prefill = Scheduler._decode, Scheduler._prefill_chunk

    def decode(self, batch, chunks=()):
        events.append(("decode", 0, 0))
        events.extend(("ride", row.pos, size) for row, size in chunks)
        return real_decode(self, batch, chunks)

    def prefill(self, row, size):
        events.append(("prefill", row.pos, min(size, len(row.ids) - row.pos)))
        return real_prefill(self, row, size)

    monkeypatch.setattr(Scheduler, "_decode", decode)
    monkeypatch.setattr(Scheduler, "_prefill_chunk", prefill)
    return events


def running_stream(pipe: llama_adapter.Pipeline, scheduler: Scheduler, events: list) -> Iterator[str]:
    """A 40-token stream of PROMPTS[0] that has begun (prefill chunks of 16 from now on; ``events`` cleared)."""
    scheduler.configure(prefill_chunk=16)
    stream = pipe.stream(PROMPTS[0], max_new_tokens=40, temperature=0)
    next(stream)
    events.clear()
    return stream


@pytest.fixture(scope="module")
def adapters(base: llama_adapter.Pipeline, tmp_path_factory: pytest.TempPathFactory) -> list[llama_adapter.Pipeline]:
    """Pipelines on ``base``: none, two prompt-only adapters of different shapes, and one with V2 biases."""
    out = tmp_path_factory.mktemp("adapters")
    a = adapted_copy(base, "tanh", gate_scale=1.0, layers=2, length=3, seed=1)
    b = adapted_copy(base, "identity", gate_scale=0.5, layers=3, length=5, seed=2)
    files = [save_adapter(out / f"{n}.safetensors", m.adapter_parameters(), m.adapter_config, m.args) for n, m in (("a", a), ("b", b))]
    biased = base.with_adapter(AdapterConfig(adapter_len=4, adapter_layer=2, bias=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in biased.model.adapter_parameters().items():
            p.normal_(0.0, 0.3 if name.endswith("bias") else 1.0)
    return [base, base.with_adapter(files[0]), base.with_adapter(files[1]), biased]


@pytest.fixture
def limited(base) -> Iterator[Scheduler]:
    saved = base.scheduler.limits
    yield base.scheduler
    base.scheduler.limits = saved


def alone(pipe: llama_adapter.Pipeline, prompt: str, n: int = 16, **kw) -> list[int]:
    stream = pipe.stream(prompt, max_new_tokens=n, temperature=0, **kw)
    list(stream)
    return stream.generated_ids


def drain_in_threads(streams: list) -> list[list[int]]:
    """Read every stream to its end, each in its own thread, all at once."""
    out: list[list[int]] = [[] for _ in streams]
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            list(streams[i])
            out[i] = streams[i].generated_ids
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out


def test_threads_get_their_alone_tokens_with_different_adapters_on_one_base(adapters, batches) -> None:
    jobs = [(pipe, PROMPTS[i % len(PROMPTS)]) for i, pipe in enumerate(adapters * 2)]
    expected = [alone(pipe, prompt) for pipe, prompt in jobs]
    assert len({tuple(e) for e in expected}) > 3  # the adapters make a difference
    batches.clear()
    streams = [pipe.stream(prompt, max_new_tokens=16, temperature=0) for pipe, prompt in jobs]  # all queued at once
    assert drain_in_threads(streams) == expected
    # The prompt-only rows (no adapter and two different ones) decoded in one forward; the V2 rows only with their own kind.
    biased = adapters[3].model
    assert max(len(b) for b in batches) >= 6
    assert any({m for m in b} >= {adapters[0].model, adapters[1].model, adapters[2].model} for b in batches)
    assert all(all(m is biased for m in b) or biased not in b for b in batches)


def test_each_row_samples_with_its_own_seeded_generator(base) -> None:
    """Rows sampled side by side: the same seed gives the same tokens, other seeds others.  (Alone against
    batched, sampled tokens may part: one row's projections run as a matrix-vector product, several rows'
    as a matrix product, and their last bits differ.)"""
    seeds = [5, 5, 5, 6, 7]
    streams = [base.stream("the people", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s) for s in seeds]
    out = drain_in_threads(streams)
    assert out[0] == out[1] == out[2]
    assert len({tuple(o) for o in out}) == 3


def test_generate_equals_stream_and_mixes_with_streams(base) -> None:
    texts = ["".join(base.stream(p, max_new_tokens=10, temperature=0)) for p in PROMPTS]
    running = base.stream(PROMPTS[0], max_new_tokens=10, temperature=0)
    assert next(running) is not None
    assert base.generate(PROMPTS, max_new_tokens=10, temperature=0) == texts
    assert running.text + "".join(running) == texts[0]


def test_join_while_others_run(base) -> None:
    expected = [alone(base, p, 24) for p in PROMPTS[:3]]
    first = base.stream(PROMPTS[0], max_new_tokens=24, temperature=0)
    head = [next(first) for _ in range(4)]
    assert base.scheduler.stats()["rows"] == 1 and first.finish_reason is None
    late = [base.stream(p, max_new_tokens=24, temperature=0) for p in PROMPTS[1:3]]
    assert drain_in_threads([first, *late]) == expected
    assert first.text.startswith("".join(head))


def test_cancel_frees_the_row_within_one_step_and_leaves_the_others_alone(base) -> None:
    expected = [alone(base, p, 40) for p in PROMPTS[:3]]
    streams = [base.stream(p, max_new_tokens=40, temperature=0) for p in PROMPTS[:3]]
    for _ in range(3):
        next(streams[1])
    scheduler = base.scheduler
    assert scheduler.stats()["rows"] == 3
    before = scheduler.steps
    streams[1].close()  # returns once the row is freed
    assert scheduler.steps - before <= 1
    assert scheduler.stats()["rows"] == 2
    assert scheduler.stats()["cached_tokens"] == sum(len(s.prompt_ids) + 40 for s in (streams[0], streams[2]))
    kept = drain_in_threads([streams[0], streams[2]])
    assert kept == [expected[0], expected[2]]
    assert streams[1].finish_reason is None and list(streams[1]) == []
    assert scheduler.stats()["rows"] == 0


def test_closing_an_unread_stream_frees_its_row(base) -> None:
    stream = base.stream("the water", max_new_tokens=200, temperature=0)
    stream.close()  # never iterated
    assert base.scheduler.stats()["rows"] == base.scheduler.stats()["queued"] == 0


@pytest.mark.parametrize("same_kind", [True, False], ids=["rides-along", "between-steps"])
def test_long_prompt_joins_in_chunks_while_a_stream_keeps_getting_tokens(
    adapters, limited: Scheduler, chunk_events: list, same_kind: bool
) -> None:
    """A long prompt of the running stream's kind rides along in its decode steps, a chunk at a time; one of
    another kind (V2 biases) is prefilled a chunk at a time between them.  Either way each gets its tokens alone."""
    base, joining = adapters[0], adapters[0] if same_kind else adapters[3]
    long_prompt = " ".join(PROMPTS * 4)  # about 180 tokens
    expected_long = alone(joining, long_prompt, 8)
    expected_short = alone(base, PROMPTS[0], 40)
    short = running_stream(base, limited, chunk_events)
    joiner = joining.stream(long_prompt, max_new_tokens=8, temperature=0)
    assert drain_in_threads([short, joiner]) == [expected_short, expected_long]
    events = chunk_events
    chunks = [(start, size) for kind, start, size in events if kind != "decode"]
    assert len(chunks) >= len(joiner.prompt_ids) / 16  # at most prefill_chunk tokens at a time
    assert [start for start, _ in chunks] == [sum(size for _, size in chunks[:i]) for i in range(len(chunks))]
    assert sum(size for _, size in chunks) == len(joiner.prompt_ids)
    assert all(size <= 16 for _, size in chunks)
    if same_kind:  # the short stream decodes all along, and every chunk rides in its step
        assert all(kind == "ride" for kind, _, _ in events if kind != "decode")
    else:  # the running stream decodes between chunks
        between = [i for i, e in enumerate(events) if e[0] == "prefill"]
        assert all(events[i + 1][0] == "decode" for i in between[:-1])


def test_a_newcomer_that_cannot_ride_is_not_held_back_by_one_that_rides(adapters, limited: Scheduler, chunk_events: list) -> None:
    """While prompt-only rows decode, a V2 newcomer (another kind: it cannot ride) comes first and a prompt-only
    one second: the first gets its chunks between the steps while the second rides, not after it has joined."""
    base, biased = adapters[0], adapters[3]
    long_prompt = " ".join(PROMPTS * 4)
    expected = [alone(base, PROMPTS[0], 40), alone(biased, long_prompt, 4), alone(base, long_prompt, 4)]
    short = running_stream(base, limited, chunk_events)
    first = biased.stream(long_prompt, max_new_tokens=4, temperature=0)
    second = base.stream(long_prompt, max_new_tokens=4, temperature=0)
    assert drain_in_threads([short, first, second]) == expected
    kinds = [kind for kind, _, _ in chunk_events]
    assert "ride" in kinds and "prefill" in kinds
    assert kinds.index("prefill") < len(kinds) - 1 - kinds[::-1].index("ride")


def test_a_ragged_step_equals_its_rows_forwarded_apart(adapters) -> None:
    """Two decoding rows with different adapters and two other rows' prompt chunks in one ragged forward: the logits
    of each row are those of the decode batch and of each chunk forwarded on their own."""
    a, b = adapters[1].model, adapters[2].model  # prompt-only adapters of different lengths and layers
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, a.args.vocab_size, (n,), generator=g).tolist() for n in (6, 4, 8, 2)]
    cached = (5, 3, 3, 0)  # rows 0 and 1 decode their next token; rows 2 and 3 have chunks of 5 and 2 tokens
    with torch.inference_mode():
        rows = [Row(i, m, m.adapter_kv(), 4, 0.0, 1.0, None) for i, m in zip(ids, (a, b, a, b), strict=True)]
        caches = [KVCache(a.args, 1, 16, torch.float32, torch.device("cpu")) for _ in rows]
        for row, cache, n in zip(rows[:3], caches, cached, strict=False):
            row.model.forward_cached(torch.tensor([row.ids[:n]]), torch.arange(n)[None], RowsStep([cache], [0]), row.adapter_kv)
        plan = row_adapters(rows[:2], a.args.n_layers)
        decode = a.forward_cached(torch.tensor([[ids[0][5]], [ids[1][3]]]), torch.tensor([[5], [3]]), RowsStep(caches[:2], [5, 3]), plan)
        chunks = [
            a.forward_cached(torch.tensor([ids[i][n:]]), torch.arange(n, len(ids[i]))[None], RowsStep([caches[i]], [n]), rows[i].adapter_kv)
            for i, n in ((2, 3), (3, 0))
        ]
        ragged = a.forward_cached(
            torch.tensor([[ids[0][5], ids[1][3], *ids[2][3:], *ids[3]]]),
            torch.tensor([[5, 3, *range(3, 8), 0, 1]]),
            RowsStep(caches, list(cached), [1, 1, 5, 2]),
            [RaggedAdapters(2, kv, [(5, rows[2].adapter_kv[i]), (2, rows[3].adapter_kv[i])]) for i, kv in enumerate(plan)],
            torch.tensor([0, 1, 6, 8]),
        )
    torch.testing.assert_close(ragged, torch.cat([decode, *chunks]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(decode[0], decode[1], atol=1e-3)  # the rows differ: a mix-up would show


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_prefill_gives_the_same_tokens(base, limited: Scheduler, chunk: int) -> None:
    prompt = " ".join(PROMPTS * 3)
    limited.configure(prefill_chunk=1000)
    expected = alone(base, prompt, 12)  # the whole prompt in one forward
    limited.configure(prefill_chunk=chunk)
    assert alone(base, prompt, 12) == expected


def test_queue_is_fifo_and_a_full_queue_is_refused_with_a_message(base, limited: Scheduler) -> None:
    limited.configure(max_rows=1, max_queue=2)
    running = base.stream(PROMPTS[0], max_new_tokens=30, temperature=0)
    next(running)
    queued = [base.stream(p, max_new_tokens=5, temperature=0) for p in PROMPTS[1:3]]
    assert limited.stats()["queued"] == 2 and limited.full()
    with pytest.raises(CapacityError, match=r"max_queue=2"):
        base.stream(PROMPTS[3], max_new_tokens=5, temperature=0)
    finished: list[int] = []

    def read(i: int) -> None:
        list(queued[i])
        finished.append(i)

    threads = [threading.Thread(target=read, args=(i,)) for i in (1, 0)]
    for t in threads:
        t.start()
    list(running)
    for t in threads:
        t.join(60)
    assert finished == [0, 1]  # first come, first admitted
    assert limited.stats()["rows"] == 0 and not limited.full()


def test_request_too_large_for_the_cache_limit_is_refused_with_a_message(base, limited: Scheduler) -> None:
    limited.configure(max_cached_tokens=40)
    with pytest.raises(CapacityError, match=r"needs \d+ cached tokens.*max_cached_tokens=40"):
        base.stream("the water", max_new_tokens=100, temperature=0)
    assert alone(base, "the water", 20)  # a request that fits still runs


def test_rows_wait_for_cache_room_and_the_cache_follows_admitted_tokens(base, limited: Scheduler) -> None:
    limited.configure(max_cached_tokens=60)
    a = base.stream("the water", max_new_tokens=30, temperature=0)
    b = base.stream("the water", max_new_tokens=30, temperature=0)
    next(a)
    need = len(a.prompt_ids) + 30
    assert limited.stats()["rows"] == 1 and limited.stats()["queued"] == 1 and limited.stats()["cached_tokens"] == need
    assert drain_in_threads([a, b]) == [alone(base, "the water", 30)] * 2


def test_generate_waits_for_room_instead_of_refusing(base, limited: Scheduler) -> None:
    limited.configure(max_rows=1, max_queue=0)
    assert base.generate(PROMPTS[:3], max_new_tokens=5, temperature=0) == [
        "".join(base.stream(p, max_new_tokens=5, temperature=0)) for p in PROMPTS[:3]
    ]


def test_bad_limits_are_refused(base) -> None:
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        base.scheduler.configure(max_rows=0)


def test_an_error_in_the_loop_reaches_the_caller_and_the_loop_goes_on(base, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Scheduler._prefill_chunk

    def broken(self, row, size):
        raise RuntimeError("boom")

    monkeypatch.setattr(Scheduler, "_prefill_chunk", broken)
    with pytest.raises(RuntimeError, match="boom"):
        list(base.stream("the water", max_new_tokens=5, temperature=0))
    monkeypatch.setattr(Scheduler, "_prefill_chunk", real)
    assert alone(base, "the water", 5)
    deadline = time.monotonic() + 5
    while base.scheduler.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert base.scheduler.stats()["rows"] == 0


def test_image_rows_batch_with_chat_rows(batches) -> None:
    """The tiny app models: a multimodal adapter without V2 extras shares the chat rows' forward, each image row
    with its own visual prompt."""
    from PIL import Image

    from llama_adapter.tiny import load_tiny, load_tiny_captioner

    chat = load_tiny("cpu")
    captioner = load_tiny_captioner(chat)
    images = [Image.new("RGB", (64, 48), color) for color in ((200, 30, 30), (20, 40, 220))]
    jobs = [(chat, "tell me a story", None), (captioner, "describe", images[0]), (captioner, "describe", images[1])]
    expected = [alone(pipe, prompt, 12, image=image) for pipe, prompt, image in jobs]
    assert expected[1] != expected[2]  # the image matters
    batches.clear()
    streams = [pipe.stream(prompt, max_new_tokens=12, temperature=0, image=image) for pipe, prompt, image in jobs]
    assert drain_in_threads(streams) == expected
    assert any({chat.model, captioner.model} <= set(b) for b in batches)


def test_an_unread_stream_waits_for_its_reader(base) -> None:
    expected = alone(base, "the water", 60)
    stream = base.stream("the water", max_new_tokens=60, temperature=0)
    first = next(stream)
    time.sleep(0.5)  # far longer than LOOKAHEAD steps of the tiny model
    assert stream._steps._row.n_new <= LOOKAHEAD + 1  # it computed a few tokens ahead, then waited
    assert first + "".join(stream) == stream.text
    assert stream.generated_ids == expected


def test_generate_decodes_its_rows_together(base, batches) -> None:
    """generate() reads its rows one after another, yet they decode in one batch (none waits for its reader)."""
    batches.clear()
    base.generate(PROMPTS, max_new_tokens=30, temperature=0)
    assert max(len(b) for b in batches) == len(PROMPTS)
    # About one forward per token, not one per row and token (a prompt joins in one to a few chunks).
    assert len(batches) <= 30 + 2 * len(PROMPTS)
