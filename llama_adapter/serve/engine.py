"""The decode engine: sampling, the reusable KV cache, and the loop that turns prompts into token ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..cancel import CancelToken, check
from ..config import ModelConfig
from ..model.llama import AdapterKV, CacheStep, KVCache, Transformer

# Advances a decode by one token: (next tokens [B, 1], their position) -> logits [B, V].
StepFn = Callable[[Tensor, int], Tensor]


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)  # no host sync, unlike boolean indexing
        choice = torch.multinomial(probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class CacheSlot:
    """One reusable, preallocated KV cache (full context length) for successive ``Decoder.steps`` calls.

    A call that finds the cache busy (a second run interleaved with the first) or too small gets a
    cache of its own.  (Pipelines decode through ``scheduler.Scheduler``, whose rows own their caches.)
    """

    def __init__(self) -> None:
        self._cache: KVCache | None = None
        self._busy = False

    def take(self, args: ModelConfig, batch: int, length: int, dtype: torch.dtype, device: torch.device, static: bool = False) -> KVCache:
        """A cache for ``batch`` rows of up to ``length`` positions; ``static``: for a compiled step (``KVCache.fits``)."""
        if self._cache is not None and not self._busy and self._cache.fits(batch, length, dtype, device, static):
            self._busy = True
            return self._cache
        cache = KVCache(args, batch, args.max_seq_len, dtype, device, zeroed=static)
        if not self._busy:  # keep the newer (larger, or exactly sized) cache for later requests
            self._cache, self._busy = cache, True
        return cache

    def give_back(self, cache: KVCache) -> None:
        if cache is self._cache:
            self._busy = False


def static_rows(batch: int) -> int:
    """Rows of a compiled decode step: the batch padded to a power of two, so that a handful of
    graphs serve every batch size (each new shape is a compilation, and a ninth one is refused)."""
    return 1 << (batch - 1).bit_length()


def _pad_rows(t: Tensor, rows: int, fill: bool | int) -> Tensor:
    """``t`` [B, ...] with ``rows - B`` rows of ``fill`` appended (a broadcast [1, ...] stays as it is)."""
    if t.shape[0] in (1, rows):
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), fill)])


class Decoder:
    """Runs the model over one fixed batch of prompts with a KV cache and yields sampled tokens per step.

    The benchmarks time it; pipelines use its compiled static-shape step for their rows.
    """

    def __init__(self, model: Transformer, pad_id: int, compile: bool = False, cache_slot: CacheSlot | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.cache_slot = cache_slot or CacheSlot()
        # Opt-in: the one-token decode step compiled with static shapes.  On GPU: CUDA graphs, and
        # coordinate-descent tuning, without which inductor keeps an int8 weight's dequantisation
        # apart from the GEMV instead of fusing the two.
        self._static_step = None
        if compile:
            cuda = model.rope_cos.device.type == "cuda"
            options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True} if cuda else None
            self._static_step = torch.compile(self._decode_static, options=options, fullgraph=True, dynamic=False)

    def _decode_static(
        self, tokens: Tensor, index: Tensor, pads: Tensor, key_ok: Tensor, cache: KVCache, adapter_kv: Sequence[AdapterKV | None]
    ) -> Tensor:
        """One decode step whose shapes never change: position ``index`` is a tensor, attention spans the whole cache."""
        positions = (index - pads)[:, None]
        mask = (key_ok & (torch.arange(key_ok.shape[1], device=key_ok.device) <= index))[:, None, None, :]
        return self.model.forward_cached(tokens, positions, CacheStep(cache, 0, mask, index), adapter_kv)

    def _eager_steps(self, pads: Tensor, key_ok: Tensor | None, cache: KVCache, adapter_kv: Sequence[AdapterKV | None]) -> StepFn:
        """Plain steps: attention over the cache up to the current position (``key_ok`` masks left padding)."""

        def advance(tokens: Tensor, cur: int) -> Tensor:
            mask = None if key_ok is None else key_ok[:, None, None, : cur + 1]
            return self.model.forward_cached(tokens, (cur - pads)[:, None], CacheStep(cache, cur, mask), adapter_kv)

        return advance

    def _static_steps(
        self, batch: int, rows: int, width: int, pads: Tensor, key_ok: Tensor, cache: KVCache, adapter_kv: Sequence[AdapterKV | None]
    ) -> StepFn:
        """Compiled steps on ``rows`` >= ``batch`` rows: the padding rows hold pad tokens that attend to everything."""
        step_tokens = torch.full((rows, 1), self.pad_id, device=pads.device)
        static_pads, static_key_ok = _pad_rows(pads, rows, 0), _pad_rows(key_ok, rows, True)
        static_kv = [None if a is None else (_pad_rows(a[0], rows, 0), _pad_rows(a[1], rows, 0)) for a in adapter_kv]
        index = torch.tensor([width], device=pads.device)

        def advance(tokens: Tensor, cur: int) -> Tensor:
            step_tokens[:batch] = tokens
            logits = self._static_step(step_tokens, index, static_pads, static_key_ok, cache, static_kv)[:batch]
            index.add_(1)
            return logits

        return advance

    def _take_cache(self, batch: int, length: int) -> KVCache:
        model = self.model
        static = self._static_step is not None
        # A compiled step must own every row of its cache: a write into the first rows of a larger
        # cache is compiled into a copy of all of it.
        cache = self.cache_slot.take(model.args, batch, length, model.tok_embeddings.weight.dtype, model.rope_cos.device, static)
        if static:  # CUDA graphs may then keep the cache in place
            for t in (*cache.k, *cache.v):
                torch._dynamo.mark_static_address(t)
        return cache

    @torch.inference_mode()
    def steps(
        self,
        prompts: Sequence[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        visual_prompt: Tensor | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[list[int]]:
        """Yields the next token of every row, up to ``max_new_tokens`` times or the context limit.

        Prompts are left-padded: each row keeps its true RoPE positions and masks its pad keys.
        Closing the iterator stops the work; so does ``cancel``, checked before prefill and before
        every decode step (``Cancelled`` is raised), for a caller on another thread.
        """
        model = self.model
        device = model.rope_cos.device
        lengths = [len(p) for p in prompts]
        width, batch = max(lengths), len(prompts)
        n_new = min(max_new_tokens, model.args.max_seq_len - width)
        if n_new < 1:
            raise ValueError(f"prompt of {width} tokens leaves no room in the {model.args.max_seq_len}-token context")
        pads = torch.tensor([width - n for n in lengths], device=device)
        tokens = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        adapter_kv: list[AdapterKV | None] = model.adapter_kv(visual_prompt)
        rows = static_rows(batch) if self._static_step is not None else batch
        check(cancel)
        cache = self._take_cache(rows, width + n_new - 1)
        try:
            positions = (torch.arange(width, device=device)[None] - pads[:, None]).clamp(min=0)
            key_ok = torch.arange(cache.max_len, device=device)[None] >= pads[:, None]  # [B, S]
            padded = bool(pads.any())
            mask = None
            if padded:
                causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
                # Pad queries attend to themselves only, so no softmax row is empty.
                mask = (causal & key_ok[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
                mask = mask[:, None]
            logits = model.forward_cached(tokens, positions, CacheStep(cache, 0, mask), adapter_kv)
            if self._static_step is not None:
                advance = self._static_steps(batch, rows, width, pads, key_ok, cache, adapter_kv)
            else:
                advance = self._eager_steps(pads, key_ok if padded else None, cache, adapter_kv)
            for cur in range(width, width + n_new):
                next_tokens = sample(logits, temperature, top_p, generator)
                yield next_tokens.tolist()
                if cur + 1 == width + n_new:
                    break
                check(cancel)
                logits = advance(next_tokens[:, None], cur)
        finally:
            self.cache_slot.give_back(cache)
