"""Continuous batching: one decode loop per loaded base, shared by every pipeline on that base.

Callers submit a request (a ``Row``) and read its tokens from a ``RowHandle``; a background thread
runs the batch.  Each iteration it

1. drops cancelled rows and admits queued ones, first come first served, while the row and
   cached-token limits allow;
2. runs one decode step for every decoding row: one forward per *kind* of row (below);
3. prefills one chunk of the oldest newcomer's prompt, so that a long prompt joins over several
   iterations while the others keep getting tokens.  With nobody decoding a chunk is
   ``prefill_chunk`` tokens.  While rows of its kind decode, the chunk rides along in their decode
   step (one ragged forward: their tokens and the chunk's through the same weight reads), sized so
   that the step takes at most ``RIDE_SLOWDOWN`` times as long as without it.  Otherwise (compiled
   rows, or only rows of another kind decoding) it is a forward of its own between their steps,
   sized from the measured prefill speed to take about as long as their step.

Every row has its own KV cache, sized for its prompt plus its reply (so memory follows the admitted
tokens, not rows x context), its own position, sampling settings, generator and adapter K/V.
Attention runs per row over that row's own cache, with no padding and no mask: a row's attention is
computed exactly as it is alone, and only the projections see the other rows.

Kinds: adapters that only add adaption prompts (V1, ours, multimodal ones without extras) leave
the base projections as they are, so their rows share one forward, whatever adapter each row has.
Adapters with V2 extras (biases, LoRA, tuned norms) change the projections; their rows batch only
with rows of the same pipeline.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import LlamaAdapterError
from ..model.attention import attention
from ..model.llama import AdapterKV, KVCache, RaggedAdapters, RowAdapters, Transformer
from .engine import Decoder, sample

log = logging.getLogger("llama_adapter.scheduler")

IDLE_EXIT_S = 2.0  # the loop thread ends after this long with nothing to do; the next request starts a new one
# Every token crosses from the loop thread to its reader's thread.  With Python's default GIL switch
# interval (5 ms) each crossing stalls the loop by up to that long (a lone tiny-model stream ran 3x
# slower); the loop lowers the process's interval to this when it starts, and never raises it.
SWITCH_INTERVAL_S = 1e-4
# A row whose reader has this many tokens unread waits (keeps its place, skips steps) until they are read:
# a stream that is not read costs little, as with a lazy iterator.
LOOKAHEAD = 8
MIN_BUSY_CHUNK = 8  # the smallest prefill chunk (or ride budget) while others decode: smaller ones waste the matrix units
# Prompt chunks riding along with a decode step may make that step at most this much slower (``_size_ride``).
RIDE_SLOWDOWN = 1.5
# After this many steps with chunks riding, one without: it measures the decode step of the batch as it is now
# (rows join as they finish prefilling), which the next rides are sized against.
RIDES_PER_PLAIN_STEP = 8


class CapacityError(LlamaAdapterError, ValueError):
    """A request can never fit the scheduler's limits, or its queue is full; the message names the limit."""


@dataclass(frozen=True)
class Limits:
    """What one base serves at once.  ``max_cached_tokens`` bounds the KV cache of all admitted rows
    together: each row reserves its prompt plus ``max_new_tokens`` (the whole context when compiled)."""

    max_rows: int
    max_cached_tokens: int
    max_queue: int = 64
    prefill_chunk: int = 256  # prompt tokens per prefill forward (at most; fewer while other rows decode)

    def check(self) -> None:
        for name in ("max_rows", "max_cached_tokens", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


def kv_bytes_per_token(model: Transformer) -> int:
    args = model.args
    return 2 * args.n_layers * args.kv_heads * args.head_dim * model.tok_embeddings.weight.element_size()


def default_limits(model: Transformer) -> Limits:
    """16 rows on CPU, 64 on GPU; cached tokens: a quarter of the free RAM on CPU, half the free GPU
    memory on GPU, at least one full context and at most what ``max_rows`` full contexts need."""
    device = model.rope_cos.device
    args = model.args
    if device.type == "cuda":
        rows, free = 64, torch.cuda.mem_get_info(device)[0] // 2
    else:
        rows = 16
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (OSError, ValueError, AttributeError):
            free = 4 << 30
    tokens = free // kv_bytes_per_token(model)
    return Limits(
        max_rows=rows,
        max_cached_tokens=int(min(max(tokens, args.max_seq_len), rows * args.max_seq_len)),
        prefill_chunk=256,
    )


_END = object()  # the last item of a row's token queue


class Row:
    """One request in the scheduler: its tokens, cache, sampling settings and adapter K/V."""

    def __init__(
        self,
        ids: list[int],
        model: Transformer,
        adapter_kv: Sequence[AdapterKV | None],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        decoder: Decoder | None = None,
        lazy: bool = True,
    ) -> None:
        self.ids = ids
        self.lazy = lazy  # waits while LOOKAHEAD tokens are unread (a reader that reads rows one after another passes False)
        self.model = model
        self.adapter_kv = adapter_kv
        self.limit = min(max_new_tokens, model.args.max_seq_len - len(ids))
        if self.limit < 1:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {model.args.max_seq_len}-token context")
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.decoder = decoder  # compiled pipelines: its static-shape step decodes this row
        cfg = model.adapter_config
        extras = cfg is not None and (cfg.bias or cfg.norm or cfg.lora_rank > 0)
        # Rows of one kind share a forward: prompt-only adapters all leave the base projections alone.
        # (Compiled rows are decoded one per call of their pipeline's static step.)
        self.kind: tuple[bool, object] = (decoder is not None, model if extras else "prompt-only")
        self.reserve = model.args.max_seq_len if decoder is not None else len(ids) + self.limit
        self.out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.freed = threading.Event()
        self.cancelled = False
        self.cache: KVCache | None = None
        # Compiled rows: the decode position as a tensor, and the static step's (empty) padding.
        self.index: Tensor | None = None
        self.pads: Tensor | None = None
        self.key_ok: Tensor | None = None
        self.pos = 0  # tokens in the cache
        self.n_new = 0
        self.next_token = -1

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.ids)


class RowsStep:
    """Attention of each row over its own cache (``AttentionStep``): row i writes its T tokens at ``starts[i]`` and
    attends to its first ``starts[i] + T`` positions.  No padding, no mask across rows.

    Rows are the batch entries of q [B, H, T, hd]; or, with ``lengths``, spans of the tokens of a ragged step
    q [1, H, N, hd] (row i's ``lengths[i]`` tokens follow row i - 1's), so that rows of one token each (decoding)
    and a row's prompt chunk go through the projections as one matrix.
    """

    def __init__(self, caches: Sequence[KVCache], starts: Sequence[int], lengths: Sequence[int] | None = None) -> None:
        self.caches, self.starts, self.ragged = caches, starts, lengths is not None
        # Each row's (batch index, token span) in q, k and v: the same in every layer.
        if lengths is None:
            self.spans = [(slice(i, i + 1), slice(None)) for i in range(len(caches))]
        else:
            ends = itertools.accumulate(lengths)
            self.spans = [(slice(None), slice(end - n, end)) for n, end in zip(lengths, ends, strict=True)]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        outs = []
        for cache, start, (row, tokens) in zip(self.caches, self.starts, self.spans, strict=True):
            keys, values = cache.update(layer, start, k[row, :, tokens], v[row, :, tokens])
            query = q[row, :, tokens]
            t = query.shape[2]
            mask = None
            if t > 1 and start > 0:  # a later prefill chunk: causal, shifted by what is cached
                mask = torch.ones(t, start + t, dtype=torch.bool, device=q.device).tril(start)
            outs.append(attention(query, keys, values, mask, is_causal=t > 1 and start == 0))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2 if self.ragged else 0)


def row_adapters(rows: Sequence[Row], n_layers: int) -> list[RowAdapters | AdapterKV | None]:
    """Per layer, the rows' adapter K/V grouped by prompt length and stacked (a lone row keeps its own)."""
    if len(rows) == 1:
        return list(rows[0].adapter_kv)
    out: list[RowAdapters | AdapterKV | None] = []
    for layer in range(n_layers):
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if (kv := row.adapter_kv[layer]) is not None:
                groups.setdefault(kv[0].shape[2], []).append(i)
        if not groups:
            out.append(None)
            continue
        plan = []
        for members in groups.values():
            kp = torch.cat([rows[i].adapter_kv[layer][0] for i in members])  # type: ignore[index]
            vp = torch.cat([rows[i].adapter_kv[layer][1] for i in members])  # type: ignore[index]
            everyone = len(members) == len(rows)
            plan.append((None if everyone else torch.tensor(members, device=kp.device), kp, vp))
        out.append(RowAdapters(plan))
    return out


class RowHandle:
    """A submitted row's tokens, one ``[token]`` list per step (the decode engine's shape).

    ``close()`` cancels the row and returns once the scheduler has freed it (within one step).
    A handle dropped without closing cancels its row too.
    """

    def __init__(self, scheduler: Scheduler, row: Row) -> None:
        self._scheduler, self._row, self._done = scheduler, row, False

    def __iter__(self) -> RowHandle:
        return self

    def __next__(self) -> list[int]:
        if self._done:
            raise StopIteration
        item = self._row.out.get()
        if self._row.out.qsize() == LOOKAHEAD - 1:  # the row may have been waiting for this read
            self._scheduler.wake()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return [item]  # type: ignore[list-item]

    def close(self) -> None:
        self._done = True
        self._scheduler.cancel(self._row, wait=True)

    def __del__(self) -> None:
        if not self._done:
            self._scheduler.cancel(self._row, wait=False)


class Scheduler:
    """The decode loop of one loaded base; see the module docstring."""

    def __init__(self, model: Transformer, eos_id: int, limits: Limits | None = None) -> None:
        self.args = model.args
        self.dtype = model.tok_embeddings.weight.dtype
        self.device = model.rope_cos.device
        self.eos_id = eos_id
        self.limits = limits or default_limits(model)
        self.limits.check()
        self._cond = threading.Condition()
        self._queue: deque[Row] = deque()
        self._rows: list[Row] = []  # admitted, in admission order
        self._thread: threading.Thread | None = None
        self.steps = 0  # loop iterations that computed something (tests and stats)
        self._prefill_rate: float | None = None  # prompt tokens per second, measured on chunks
        self._decode_s = 0.0  # the last iteration's decode time (without a prompt chunk riding along)
        self._rides = 0  # steps with chunks riding since the last one without
        self._ride = MIN_BUSY_CHUNK  # prompt tokens that ride along with a decode step (sized by how much they slow it)
        self._ride_slowdown: dict[int, float] = {}  # ride budget -> how much it slowed the decode step (mean of the last few)
        # The stacked adapter K/V of the last batch of each kind, rebuilt only when its rows change.
        self._plans: dict[tuple[bool, object], tuple[list[Row], list[RowAdapters | AdapterKV | None]]] = {}

    # ------------------------------------------------------------------ callers

    def configure(self, **changes: int) -> Limits:
        """Change limits (``max_rows``, ``max_cached_tokens``, ``max_queue``, ``prefill_chunk``); running rows keep going."""
        limits = replace(self.limits, **changes)
        limits.check()
        with self._cond:
            self.limits = limits
            self._cond.notify_all()
        return limits

    def stats(self) -> dict[str, int]:
        """``rows`` (the batch now), ``queued``, ``cached_tokens`` (reserved by admitted rows) and the limits."""
        with self._cond:
            return {
                "rows": len(self._rows),
                "queued": len(self._queue),
                "cached_tokens": sum(r.reserve for r in self._rows),
                "max_rows": self.limits.max_rows,
                "max_cached_tokens": self.limits.max_cached_tokens,
                "max_queue": self.limits.max_queue,
            }

    def full(self) -> bool:
        """Whether ``stream()`` would now be refused for a full queue, whatever its size (the app asks before it
        takes a message)."""
        with self._cond:
            return self._queue_refuses(self._has_room(1))

    def submit(self, row: Row, wait_for_room: bool = False) -> RowHandle:
        """Queue ``row``.  A row that could never fit, or a full queue (unless ``wait_for_room``), raises ``CapacityError``."""
        with self._cond:
            limits = self.limits
            if row.reserve > limits.max_cached_tokens:
                what = (
                    "the whole context (compiled decoding)"
                    if row.decoder is not None
                    else (f"prompt {len(row.ids)} + up to {row.limit} new tokens")
                )
                raise CapacityError(
                    f"this request needs {row.reserve} cached tokens ({what}), more than this model's limit of "
                    f"max_cached_tokens={limits.max_cached_tokens}: shorten the prompt or lower max_new_tokens, or raise the "
                    "limit with pipe.scheduler.configure(max_cached_tokens=...)"
                )
            while self._queue_refuses(self._has_room(row.reserve)):
                if not wait_for_room:
                    raise CapacityError(
                        f"the server is busy: {len(self._rows)} requests are running and {len(self._queue)} are waiting, "
                        f"the most the queue holds (max_queue={self.limits.max_queue}); try again in a moment"
                    )
                self._cond.wait()
            self._queue.append(row)
            self._ensure_thread()
            self._cond.notify_all()
        return RowHandle(self, row)

    def cancel(self, row: Row, wait: bool) -> None:
        """Stop ``row``: a queued row leaves the queue at once, a running one at the next step boundary."""
        with self._cond:
            if row.freed.is_set():
                return
            row.cancelled = True
            if row in self._queue:
                self._queue.remove(row)
                self._free(row)
                return
            self._cond.notify_all()
            thread = self._thread
        while wait and not row.freed.wait(0.05):
            if thread is None or not thread.is_alive():  # no loop to free it: do it here
                with self._cond:
                    if row in self._rows:
                        self._rows.remove(row)
                    self._free(row)
                return

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the loop

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            if sys.getswitchinterval() > SWITCH_INTERVAL_S:
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            self._thread = threading.Thread(target=self._loop, name="llama-adapter-scheduler", daemon=True)
            self._thread.start()

    def _has_room(self, reserve: int) -> bool:
        """Whether a row reserving ``reserve`` cached tokens could be admitted now."""
        used = sum(r.reserve for r in self._rows)
        return len(self._rows) < self.limits.max_rows and used + reserve <= self.limits.max_cached_tokens

    def _queue_refuses(self, room: bool) -> bool:
        """Whether a new request (admissible now: ``room``) finds the queue full: it would have to wait behind
        ``max_queue`` others, or there is no room and no place left in the queue."""
        return (bool(self._queue) or not room) and len(self._queue) >= self.limits.max_queue

    def _free(self, row: Row) -> None:
        row.cache = None
        row.out.put(_END)
        row.freed.set()
        self._cond.notify_all()

    def _admit(self) -> None:
        """Drop cancelled rows; admit queued rows in order while they fit (the first that does not fit waits, and so do the rest)."""
        for row in [r for r in self._rows if r.cancelled]:
            self._rows.remove(row)
            self._free(row)
        while self._queue and self._has_room(self._queue[0].reserve):
            self._rows.append(self._queue.popleft())
            self._cond.notify_all()
        if self._queue and not self._rows:  # the limits were lowered below what the first request needs
            row = self._queue.popleft()
            row.out.put(CapacityError(f"this request needs {row.reserve} cached tokens, more than the limits now allow ({self.limits})"))
            self._free(row)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._admit()
                    if not self._rows:
                        if not self._queue:
                            self._cond.wait(IDLE_EXIT_S)
                            self._admit()
                            if not self._rows and not self._queue:
                                self._thread, self._plans, self._ride_slowdown = None, {}, {}
                                # The next session's batch is another: its decode step is measured afresh.
                                self._decode_s, self._rides, self._ride = 0.0, 0, MIN_BUSY_CHUNK
                                return
                        continue
                    rows = [r for r in self._rows if r.prefilling or r.cancelled or not r.lazy or r.out.qsize() < LOOKAHEAD]
                    if not rows:  # every reader is behind: wait for one to read (``RowHandle`` wakes us)
                        self._cond.wait(IDLE_EXIT_S)
                        continue
                try:
                    finished = self._iterate(rows)
                except Exception as e:  # a bug or out of memory: every row of this batch gets the error
                    log.exception("decode step failed")
                    finished = rows
                    for row in rows:
                        row.out.put(e)
                with self._cond:
                    self.steps += 1
                    for row in finished:
                        if row in self._rows:
                            self._rows.remove(row)
                            self._free(row)

    def _iterate(self, rows: list[Row]) -> list[Row]:
        """One decode step for every decoding row and one prefill chunk, riding along with the decode step of its
        kind where there is one; returns the rows that finished."""
        finished: list[Row] = []
        decoding = [r for r in rows if not r.prefilling and not r.cancelled]
        kinds: dict[tuple[bool, object], list[Row]] = {}
        for row in decoding:
            kinds.setdefault(row.kind, []).append(row)
        prefilling = [r for r in rows if r.prefilling and not r.cancelled]
        # Newcomers of a kind that is decoding ride along in its step (compiled rows decode one by one: never),
        # but not in every step: a step now and then without them measures the decode step the rides are sized by
        # (and the first one, before any ride).
        can_ride = [r for r in prefilling if r.decoder is None and r.kind in kinds]
        riders = can_ride if self._decode_s > 0 and self._rides < RIDES_PER_PLAIN_STEP else []
        budget = left = min(self._ride, self.limits.prefill_chunk)
        start = time.perf_counter()
        for kind, batch in kinds.items():
            chunks = self._chunks([r for r in riders if r.kind == kind], left)
            left -= sum(size for _, size in chunks)
            logits = self._decode(batch, chunks)
            for row, row_logits in zip(batch, logits, strict=False):
                row.pos += 1
                finished += self._emit(row, row_logits)
            done = [row for row, _ in chunks if not row.prefilling]  # their prompt's last chunk: their first token
            for row, row_logits in zip(done, logits[len(batch) :], strict=True):
                finished += self._emit(row, row_logits)
        elapsed = time.perf_counter() - start
        if riders:
            self._rides += 1
            self._size_ride(budget, budget - left, elapsed / self._decode_s)
        elif kinds:  # (an iteration with nobody decoding measures nothing)
            self._rides, self._decode_s = 0, elapsed
        # The oldest newcomer that cannot ride: a chunk of its own, between decode steps.
        newcomer = next((r for r in prefilling if r not in can_ride), None)
        if newcomer is not None:
            start = time.perf_counter()
            # Busy: some row is decoding, or would be if its reader caught up (it still waits for tokens).
            size = self._chunk_size(busy=any(not r.prefilling for r in rows) or len(self._rows) > len(rows))
            logits = self._prefill_chunk(newcomer, size)
            rate = size / max(time.perf_counter() - start, 1e-6)
            self._prefill_rate = rate if self._prefill_rate is None else (self._prefill_rate + rate) / 2
            if not newcomer.prefilling:
                finished += self._emit(newcomer, logits)
        return finished

    @staticmethod
    def _chunks(riders: list[Row], budget: int) -> list[tuple[Row, int]]:
        """Prompt chunks that ride along, oldest newcomer first, ``budget`` tokens in all."""
        chunks = []
        for row in riders:
            if budget <= 0:
                break
            size = min(budget, len(row.ids) - row.pos)
            chunks.append((row, size))
            budget -= size
        return chunks

    def _size_ride(self, budget: int, rode: int, slowdown: float) -> None:
        """The next ride budget from how much ``rode`` tokens of this one slowed the decode step: halve above
        ``RIDE_SLOWDOWN``; double below halfway to it, unless the doubled budget is known to slow the step too much
        (not retried until the loop goes idle: a retry would be a long gap for every running stream).  Fewer tokens
        than the budget (the tails of prompts) say nothing about the budget, unless even they were too slow."""
        if rode < budget:
            if slowdown > RIDE_SLOWDOWN:
                self._ride = max(MIN_BUSY_CHUNK, budget // 2)
            return
        seen = self._ride_slowdown.get(budget)
        self._ride_slowdown[budget] = slowdown if seen is None else (seen + slowdown) / 2
        if self._ride_slowdown[budget] > RIDE_SLOWDOWN:
            self._ride = max(MIN_BUSY_CHUNK, budget // 2)
        elif slowdown < (1 + RIDE_SLOWDOWN) / 2 and self._ride_slowdown.get(2 * budget, 1.0) <= RIDE_SLOWDOWN:
            self._ride = min(self.limits.prefill_chunk, 2 * budget)

    def _chunk_size(self, busy: bool) -> int:
        """Prompt tokens to prefill now: ``prefill_chunk``, or while others decode, what fits in one of their steps."""
        limit = self.limits.prefill_chunk
        if not busy:
            return limit
        fit = int((self._prefill_rate or 0.0) * self._decode_s)
        return min(limit, max(MIN_BUSY_CHUNK, 1 << (fit.bit_length() - 1) if fit else 0))

    def _allocate(self, row: Row) -> None:
        row.cache = KVCache(self.args, 1, row.reserve, self.dtype, self.device, zeroed=row.decoder is not None)
        if row.decoder is not None:  # compiled: CUDA graphs may then keep the cache in place
            for t in (*row.cache.k, *row.cache.v):
                torch._dynamo.mark_static_address(t)

    def _prefill_chunk(self, row: Row, size: int) -> Tensor:
        if row.cache is None:
            self._allocate(row)
        assert row.cache is not None
        chunk = row.ids[row.pos : row.pos + size]
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(row.pos, row.pos + len(chunk), device=self.device)[None]
        logits = row.model.forward_cached(tokens, positions, RowsStep([row.cache], [row.pos]), row.adapter_kv)
        row.pos += len(chunk)
        return logits

    def _decode(self, batch: list[Row], chunks: Sequence[tuple[Row, int]] = ()) -> Tensor:
        """Logits [B, V] of the next token of every row in ``batch`` (one kind).

        With ``chunks`` ((row, tokens): rows of the same kind that are prefilling), those next tokens of their prompts
        go through the same forward, as one ragged step: the weights are read once for all, so the chunks cost the
        running rows little (a decode step is bound by reading the weights).  The logits of the rows whose prompt
        that ends follow, in order: [B + ended, V].
        """
        if batch[0].decoder is not None:  # compiled: one static-shape graph call per row
            return torch.cat([self._decode_compiled(row) for row in batch])
        rows, plan = self._plans.get(batch[0].kind, ([], []))
        if rows != batch:
            plan = row_adapters(batch, self.args.n_layers)
            self._plans[batch[0].kind] = (batch, plan)
        caches: list[KVCache] = [r.cache for r in batch]  # type: ignore[misc]
        if not chunks:
            tokens = torch.tensor([[r.next_token] for r in batch], device=self.device)
            positions = torch.tensor([[r.pos] for r in batch], device=self.device)
            return batch[0].model.forward_cached(tokens, positions, RowsStep(caches, [r.pos for r in batch]), plan)
        ids, where, last = [r.next_token for r in batch], [r.pos for r in batch], list(range(len(batch)))
        for row, size in chunks:
            if row.cache is None:
                self._allocate(row)
            caches.append(row.cache)  # type: ignore[arg-type]
            ids += row.ids[row.pos : row.pos + size]
            where += range(row.pos, row.pos + size)
            if row.pos + size == len(row.ids):
                last.append(len(ids) - 1)
        step = RowsStep(caches, [*(r.pos for r in batch), *(row.pos for row, _ in chunks)], [1] * len(batch) + [n for _, n in chunks])
        ragged = [RaggedAdapters(len(batch), kv, [(n, row.adapter_kv[layer]) for row, n in chunks]) for layer, kv in enumerate(plan)]
        for row, size in chunks:
            row.pos += size
        tokens, positions = torch.tensor([ids], device=self.device), torch.tensor([where], device=self.device)
        return batch[0].model.forward_cached(tokens, positions, step, ragged, torch.tensor(last, device=self.device))

    def _decode_compiled(self, row: Row) -> Tensor:
        assert row.decoder is not None and row.decoder._static_step is not None and row.cache is not None
        if row.index is None:
            row.index = torch.tensor([row.pos], device=self.device)
            row.pads = torch.zeros(1, dtype=torch.long, device=self.device)
            row.key_ok = torch.ones(1, row.cache.max_len, dtype=torch.bool, device=self.device)
        tokens = torch.tensor([[row.next_token]], device=self.device)
        logits = row.decoder._static_step(tokens, row.index, row.pads, row.key_ok, row.cache, row.adapter_kv)
        row.index.add_(1)
        return logits

    def _emit(self, row: Row, logits: Tensor) -> list[Row]:
        """Sample the row's next token and hand it over; returns [row] when the row is done."""
        if row.cancelled:
            return [row]
        logits = logits.view(1, -1)
        token = int(sample(logits, row.temperature, row.top_p, row.generator)[0])
        row.out.put(token)
        row.n_new += 1
        row.next_token = token
        if token == self.eos_id or row.n_new >= row.limit:
            return [row]
        return []
