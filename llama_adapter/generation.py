"""Sampling, the KV-cache decode loop, and the streaming iterator that every caller uses."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelArgs
from .images import ImageInput
from .model import AdapterKV, CacheStep, KVCache, Transformer
from .tokenizer import StreamDecoder, Tokenizer
from .visual import VisualEncoder


class PromptTruncatedWarning(UserWarning):
    """The prompt did not fit in the context and lost tokens from its start."""


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


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts the text at the first stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def finish(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Request:
    """One prompt, already tokenised and fitted to the context."""

    ids: list[int]
    truncated: int  # tokens dropped from the prompt's start


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """How many prompt tokens fit: the reply keeps room for ``min(max_new_tokens, max_seq_len // 4)``."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 4)


def fit_prompt(ids: list[int], max_seq_len: int, max_new_tokens: int, bos_id: int) -> Request:
    """Left-truncate a prompt (keeping BOS) to ``prompt_budget`` tokens, so that a reply still fits.

    Generation then ends at the context limit if the reply runs longer.
    """
    budget = prompt_budget(max_seq_len, max_new_tokens)
    if len(ids) <= budget:
        return Request(ids, 0)
    keep_bos = bool(ids) and ids[0] == bos_id
    head = [bos_id] if keep_bos else []
    tail = ids[len(ids) - (budget - len(head)) :]
    return Request(head + tail, len(ids) - len(head) - len(tail))


class CacheSlot:
    """One reusable, preallocated KV cache (full context length).

    Pipelines that share a base also share their slot: they serve one request at a time, so one
    cache is enough.  A request that finds the cache busy (a second stream interleaved with the
    first) or too small gets a cache of its own.
    """

    def __init__(self) -> None:
        self._cache: KVCache | None = None
        self._busy = False

    def take(
        self, args: ModelArgs, batch: int, length: int, dtype: torch.dtype, device: torch.device, exact_batch: bool = False
    ) -> KVCache:
        if self._cache is not None and not self._busy and self._cache.fits(batch, length, dtype, device, exact_batch):
            self._busy = True
            return self._cache
        cache = KVCache(args, batch, args.max_seq_len, dtype, device)
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
    """Runs the model over a batch of prompts with a KV cache and yields sampled tokens per step."""

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
        self, tokens: Tensor, index: Tensor, pads: Tensor, key_ok: Tensor, cache: KVCache, adapter: Sequence[AdapterKV | None]
    ) -> Tensor:
        """One decode step whose shapes never change: position ``index`` is a tensor, attention spans the whole cache."""
        positions = (index - pads)[:, None]
        mask = (key_ok & (torch.arange(key_ok.shape[1], device=key_ok.device) <= index))[:, None, None, :]
        return self.model.forward_cached(tokens, positions, CacheStep(cache, 0, mask, index), adapter)

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
    ) -> Iterator[list[int]]:
        """Yields the next token of every row, up to ``max_new_tokens`` times or the context limit.

        Prompts are left-padded: each row keeps its true RoPE positions and masks its pad keys.
        Closing the iterator stops the work.
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
        adapter: list[AdapterKV | None] = model.adapter_kv(visual_prompt)
        rows = static_rows(batch) if self._static_step is not None else batch
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
            logits = model.forward_cached(tokens, positions, CacheStep(cache, 0, mask), adapter)
            if self._static_step is not None:  # padding rows: pad tokens, attending to everything
                step_tokens = torch.full((rows, 1), self.pad_id, device=device)
                static_pads, static_key_ok = _pad_rows(pads, rows, 0), _pad_rows(key_ok, rows, True)
                static_adapter = [None if a is None else (_pad_rows(a[0], rows, 0), _pad_rows(a[1], rows, 0)) for a in adapter]
                index = torch.tensor([width], device=device)
            for cur in range(width, width + n_new):
                next_tokens = sample(logits, temperature, top_p, generator)
                yield next_tokens.tolist()
                if cur + 1 == width + n_new:
                    break
                tokens = next_tokens[:, None]
                if self._static_step is not None:
                    step_tokens[:batch] = tokens
                    logits = self._static_step(step_tokens, index, static_pads, static_key_ok, cache, static_adapter)[:batch]
                    index += 1
                else:
                    step = CacheStep(cache, cur, key_ok[:, None, None, : cur + 1] if padded else None)
                    logits = model.forward_cached(tokens, (cur - pads)[:, None], step, adapter)
        finally:
            self.cache_slot.give_back(cache)


class RowText:
    """One row's sampled tokens turned into text: EOS, stop strings, streaming-safe decoding."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.eos_id = tokenizer.eos_id
        self.decoder = StreamDecoder(tokenizer)
        self.stopper = StopMatcher(stop)
        self.generated_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        if token == self.eos_id:
            return self.finish("eos")
        self.generated_ids.append(token)
        out, hit = self.stopper.feed(self.decoder.push(token))
        if hit:
            self.finish_reason = "stop"
        self.text += out
        return out

    def finish(self, reason: str) -> str:
        """End the row: emit held-back text unless it completes a stop string."""
        out, hit = self.stopper.feed(self.decoder.flush())
        out += "" if hit else self.stopper.finish()
        self.finish_reason = "stop" if hit else reason
        self.text += out
        return out


def run_out_reason(row: RowText, max_new_tokens: int) -> str:
    """Why the decode loop ended for a row that saw no EOS or stop string."""
    return "length" if len(row.generated_ids) >= max_new_tokens else "context"


class TextStream(Iterator[str]):
    """Text deltas of one generation; ``"".join(stream)`` equals ``tokenizer.decode(stream.generated_ids)``
    (cut before the first stop string).

    ``truncated_tokens`` says how many prompt tokens were dropped to fit the context.  After
    iteration, ``finish_reason`` is ``eos``, ``stop``, ``length`` (max_new_tokens) or ``context``
    (the context window is full).  ``close()`` stops the computation.
    """

    def __init__(
        self, tokenizer: Tokenizer, request: Request, steps: Iterator[list[int]], max_new_tokens: int, stop: Sequence[str]
    ) -> None:
        self.prompt_ids = request.ids
        self.truncated_tokens = request.truncated
        self._row = RowText(tokenizer, stop)
        self._it = self._run(steps, max_new_tokens)

    @property
    def generated_ids(self) -> list[int]:
        return self._row.generated_ids

    @property
    def text(self) -> str:
        """Everything yielded so far."""
        return self._row.text

    @property
    def finish_reason(self) -> str | None:
        return self._row.finish_reason

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _run(self, steps: Iterator[list[int]], max_new_tokens: int) -> Iterator[str]:
        row = self._row
        try:
            for (token,) in steps:
                if out := row.push(token):
                    yield out
                if row.done:
                    return
            if out := row.finish(run_out_reason(row, max_new_tokens)):
                yield out
        finally:
            steps.close()


def warn_truncated(request: Request) -> None:
    if request.truncated:
        warnings.warn(
            f"prompt too long for the context: dropped its first {request.truncated} tokens",
            PromptTruncatedWarning,
            stacklevel=3,
        )


class Pipeline:
    """A loaded model and tokenizer: ``stream`` for one prompt, ``generate`` for a batch.

    With a ``visual`` encoder (multimodal adapters) both take ``image=``.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        base: str = "",
        adapter: str | None = None,
        visual: VisualEncoder | None = None,
        compile: bool = False,
        cache_slot: CacheSlot | None = None,
    ) -> None:
        if tokenizer.n_words > model.args.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} pieces but the model only {model.args.vocab_size} embeddings")
        if visual is not None and model.adapter is None:
            raise ValueError("a visual encoder needs a model with an adapter: the image enters through the adaption prompts")
        self.model = model
        self.tokenizer = tokenizer
        self.base = base
        self.adapter = adapter
        self.visual = visual
        self._decoder = Decoder(model, tokenizer.pad_id, compile=compile, cache_slot=cache_slot)

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    @property
    def cache_slot(self) -> CacheSlot:
        """The KV cache this pipeline decodes with (shared with pipelines loaded on top of it)."""
        return self._decoder.cache_slot

    @property
    def max_seq_len(self) -> int:
        return self.model.args.max_seq_len

    def adapter_tensors(self) -> dict[str, Tensor]:
        """Everything an adapter file holds (for ``save_adapter``): the model's adapter parameters and,
        for multimodal models, the visual adapter's (CLIP excluded)."""
        tensors: dict[str, Tensor] = dict(self.model.adapter_parameters())
        if self.visual is not None:
            tensors |= self.visual.adapter_parameters()
        return tensors

    def prompt_budget(self, max_new_tokens: int) -> int:
        """The most prompt tokens (BOS included) that ``stream`` keeps for this ``max_new_tokens``."""
        return prompt_budget(self.max_seq_len, max_new_tokens)

    def count_tokens(self, text: str) -> int:
        """Prompt length in tokens as ``stream`` sees it (BOS included)."""
        return len(self.tokenizer.encode(text))

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for p in self.adapter_tensors().values())

    def visual_prompt(self, image: ImageInput | Sequence[ImageInput] | None, batch: int) -> Tensor | None:
        """The image(s) encoded once for the request: [1 or batch, adapter_len, D], or None without an image."""
        if image is None:
            return None
        if self.visual is None:
            raise ValueError("this model takes no images: load it with a multimodal adapter to pass image=")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) not in (1, batch):
            raise ValueError(f"got {len(images)} images for {batch} prompts: pass one image for all, or one per prompt")
        return self.visual.encode(images)

    def _start(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        image: ImageInput | Sequence[ImageInput] | None,
    ) -> tuple[list[Request], Iterator[list[int]]]:
        check_sampling(max_new_tokens, temperature, top_p)
        visual_prompt = self.visual_prompt(image, len(prompts))
        requests = [fit_prompt(self.tokenizer.encode(p), self.max_seq_len, max_new_tokens, self.tokenizer.bos_id) for p in prompts]
        for r in requests:
            warn_truncated(r)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        steps = self._decoder.steps([r.ids for r in requests], max_new_tokens, temperature, top_p, generator, visual_prompt)
        return requests, steps

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.1,
        top_p: float = 0.75,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        image: ImageInput | None = None,
    ) -> TextStream:
        """Stream the continuation of the raw ``prompt`` (no template applied) as text deltas.

        ``image`` (multimodal models): a file path, PIL image or numpy RGB array; a bad image
        raises ``ImageError`` here, before any text.

        A prompt too long for the context is truncated from the left (BOS kept) with a
        ``PromptTruncatedWarning``; ``stream.truncated_tokens`` tells how many tokens went.
        """
        (request,), steps = self._start([prompt], max_new_tokens, temperature, top_p, seed, image)
        return TextStream(self.tokenizer, request, steps, max_new_tokens, _stops(stop))

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.1,
        top_p: float = 0.75,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        image: ImageInput | Sequence[ImageInput] | None = None,
    ) -> list[str]:
        """Complete several prompts in one batch; greedy results equal ``stream`` one by one.

        ``image``: one image for every prompt, or a list with one per prompt.
        """
        if not prompts:
            return []
        _, steps = self._start(prompts, max_new_tokens, temperature, top_p, seed, image)
        rows = [RowText(self.tokenizer, _stops(stop)) for _ in prompts]
        try:
            for tokens in steps:
                for row, token in zip(rows, tokens, strict=True):
                    if not row.done:
                        row.push(token)
                if all(row.done for row in rows):
                    break
        finally:
            steps.close()
        for row in rows:
            if not row.done:
                row.finish(run_out_reason(row, max_new_tokens))
        return [row.text for row in rows]


def _stops(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
