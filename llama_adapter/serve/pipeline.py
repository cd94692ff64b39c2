"""The text side of generation: prompts fitted to the context, stop strings, the streaming iterator, ``Pipeline``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cancel import CancelToken, check
from ..config import AdapterConfig
from ..inputs.images import ImageInput
from ..inputs.tokenizer import StreamDecoder, TextTokenizer
from ..model.llama import AdapterKV, Transformer
from ..model.quantize import weight_format
from ..model.visual import ClipSpec, VisualEncoder
from ..options import SAMPLING
from ..threads import in_passing_thread
from ..weights.adapter import AdapterShape
from .adapters import AdapterSource, attach_adapter
from .engine import Decoder, check_sampling
from .scheduler import Row, RowHandle, Scheduler


class PromptTruncatedWarning(UserWarning):
    """The prompt did not fit in the context and lost tokens from its start."""


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


def fit_prompt(ids: list[int], max_seq_len: int, max_new_tokens: int, bos_id: int | None) -> Request:
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


class RowText:
    """One row's sampled tokens turned into text: EOS, stop strings, streaming-safe decoding."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str]) -> None:
        self.stop_ids = tokenizer.stop_ids  # EOS and end-of-turn tokens (e.g. Llama 3's <|eot_id|>)
        self.decoder = StreamDecoder(tokenizer)
        self.stopper = StopMatcher(stop)
        self.generated_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        if token in self.stop_ids:
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
        self,
        tokenizer: TextTokenizer,
        request: Request,
        steps: RowHandle,
        max_new_tokens: int,
        stop: Sequence[str],
        cancel: CancelToken | None = None,
    ) -> None:
        self.prompt_ids = request.ids
        self.truncated_tokens = request.truncated
        self._row = RowText(tokenizer, stop)
        self._steps = steps
        self._cancel = cancel
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
        self._steps.close()  # also when iteration never started

    def _run(self, steps: RowHandle, max_new_tokens: int) -> Iterator[str]:
        row = self._row
        try:
            check(self._cancel)
            for (token,) in steps:
                check(self._cancel)  # a cancel from another thread: the row is freed (finally) within one step
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
    """A loaded model and tokenizer: ``stream`` for one prompt, ``generate`` for several.

    With a ``visual`` encoder (multimodal adapters) both take ``image=``.  Requests from any thread,
    and from every pipeline on the same base, are decoded together by one ``Scheduler``.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: TextTokenizer,
        base: str = "",
        adapter_name: str | None = None,
        visual: VisualEncoder | None = None,
        compile: bool = False,
        scheduler: Scheduler | None = None,
    ) -> None:
        if tokenizer.n_words > model.args.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} pieces but the model only {model.args.vocab_size} embeddings")
        if visual is not None and model.adapter_config is None:
            raise ValueError("a visual encoder needs a model with an adapter: the image enters through the adaption prompts")
        self.model = model
        self.tokenizer = tokenizer
        self.base = base  # display labels: what the user loaded
        self.adapter_name = adapter_name
        self.visual = visual
        self.compiled = compile
        # Compiled: rows of this pipeline decode through the decoder's static-shape step, one row per call.
        self._decoder = Decoder(model, tokenizer.pad_id, compile=True) if compile else None
        self.scheduler = scheduler or Scheduler(model, tokenizer.eos_id)

    @in_passing_thread
    def with_adapter(self, adapter: AdapterSource, *, clip: ClipSpec | None = None, adapter_shape: AdapterShape | None = None) -> Pipeline:
        """A pipeline with ``adapter`` on this pipeline's base: the very same base tensors and scheduler, no copy.

        ``adapter``: an adapter file, an official release name, a Hub repo id or file, or an
        ``AdapterConfig`` for a fresh (zero-gated) adapter.  Any adapter this pipeline has is left
        out.  ``clip`` is for multimodal adapters, ``adapter_shape`` for official V1 files (see ``load``).
        """
        model, visual = attach_adapter(self.model, adapter, clip, adapter_shape)
        name = None if isinstance(adapter, AdapterConfig) else str(adapter)
        return Pipeline(model, self.tokenizer, self.base, name, visual, self.compiled, self.scheduler)

    @property
    def adapter(self) -> str | None:
        """Deprecated alias of ``adapter_name`` (kept for one release)."""
        return self.adapter_name

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    @property
    def weight_format(self) -> str:
        """The base's matrices in words, e.g. ``int8 weight-only (per channel), bfloat16 activations``."""
        return weight_format(self.model)

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

    @in_passing_thread
    def visual_prompt(
        self, image: ImageInput | Sequence[ImageInput] | None, batch: int, cancel: CancelToken | None = None
    ) -> Tensor | None:
        """The image(s) encoded once for the request: [1 or batch, adapter_len, D], or None without an image."""
        if image is None:
            return None
        if self.visual is None:
            raise ValueError("this model takes no images: load it with a multimodal adapter to pass image=")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) not in (1, batch):
            raise ValueError(f"got {len(images)} images for {batch} prompts: pass one image for all, or one per prompt")
        return self.visual.encode(images, cancel)

    @in_passing_thread
    def _request_kv(
        self, image: ImageInput | Sequence[ImageInput] | None, batch: int, cancel: CancelToken | None
    ) -> list[list[AdapterKV | None]]:
        """Per row, the adapter K/V with the image's prompt added (rows without an image share one)."""
        visual_prompt = self.visual_prompt(image, batch, cancel)
        check(cancel)
        with torch.inference_mode():
            if visual_prompt is None or len(visual_prompt) == 1:
                return [self.model.adapter_kv(visual_prompt)] * batch
            return [self.model.adapter_kv(visual_prompt[i : i + 1]) for i in range(batch)]

    def _start(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        image: ImageInput | Sequence[ImageInput] | None,
        wait_for_room: bool,
        cancel: CancelToken | None = None,
    ) -> tuple[list[Request], list[RowHandle]]:
        """Submit one scheduler row per prompt; each row has its own generator (seeded ``seed + i``).

        ``wait_for_room`` (``generate``): wait for room in a full queue instead of refusing, and decode the
        rows ahead of their reading (``generate`` reads them one after another).  ``cancel`` is checked
        between image preprocessing stages and before the rows are submitted."""
        check_sampling(max_new_tokens, temperature, top_p)
        kvs = self._request_kv(image, len(prompts), cancel)
        requests = [fit_prompt(self.tokenizer.encode(p), self.max_seq_len, max_new_tokens, self.tokenizer.bos_id) for p in prompts]
        for r in requests:
            warn_truncated(r)
        with torch.inference_mode():
            rows = []
            for i, (r, kv) in enumerate(zip(requests, kvs, strict=True)):
                generator = None
                if temperature > 0:
                    generator = torch.Generator(device=self.device)
                    if seed is None:
                        generator.seed()
                    else:
                        generator.manual_seed(seed + i)
                # generate() reads its rows one after another: they must not wait for their reader.
                rows.append(Row(r.ids, self.model, kv, max_new_tokens, temperature, top_p, generator, self._decoder, not wait_for_room))
        handles: list[RowHandle] = []
        try:
            for row in rows:
                handles.append(self.scheduler.submit(row, wait_for_room))
        except BaseException:
            for handle in handles:
                handle.close()
            raise
        return requests, handles

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = SAMPLING.max_new_tokens,
        temperature: float = SAMPLING.temperature,
        top_p: float = SAMPLING.top_p,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        image: ImageInput | None = None,
        cancel: CancelToken | None = None,
    ) -> TextStream:
        """Stream the continuation of the raw ``prompt`` (no template applied) as text deltas.

        ``image`` (multimodal models): a file path, PIL image or numpy RGB array; a bad image
        raises ``ImageError`` here, before any text.

        ``cancel``: a token another thread may set; the work stops at its next step (between
        preprocessing stages, before prefill, between decode steps) with ``Cancelled``.

        A prompt too long for the context is truncated from the left (BOS kept) with a
        ``PromptTruncatedWarning``; ``stream.truncated_tokens`` tells how many tokens went.
        """
        (request,), (handle,) = self._start([prompt], max_new_tokens, temperature, top_p, seed, image, False, cancel)
        return TextStream(self.tokenizer, request, handle, max_new_tokens, _stops(stop), cancel)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = SAMPLING.max_new_tokens,
        temperature: float = SAMPLING.temperature,
        top_p: float = SAMPLING.top_p,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        image: ImageInput | Sequence[ImageInput] | None = None,
    ) -> list[str]:
        """Complete several prompts, decoded together (and with other callers' requests); greedy results
        equal ``stream`` one by one.  Rows that do not fit the scheduler's limits wait for room.

        ``image``: one image for every prompt, or a list with one per prompt.  ``seed``: prompt i
        samples with ``seed + i``.
        """
        if not prompts:
            return []
        _, handles = self._start(prompts, max_new_tokens, temperature, top_p, seed, image, wait_for_room=True)
        rows = [RowText(self.tokenizer, _stops(stop)) for _ in prompts]
        try:
            for handle, row in zip(handles, rows, strict=True):
                for (token,) in handle:
                    row.push(token)
                    if row.done:
                        break
                handle.close()
        finally:
            for handle in handles:
                handle.close()
        for row in rows:
            if not row.done:
                row.finish(run_out_reason(row, max_new_tokens))
        return [row.text for row in rows]


def _stops(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
