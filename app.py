"""LLaMA-Adapter web app: streaming chat and image captioning, locally or on Hugging Face Spaces.

    python app.py --tiny                        # a tiny random model, offline, in seconds
    python app.py                               # LLaMA-7B + LLaMA-Adapter-V1 (downloaded once)
    python app.py --base DIR --adapter FILE     # local weights

UI only: every model call goes through ``llama_adapter``.
"""

from __future__ import annotations

import argparse
import html
import itertools
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch

import llama_adapter
from event_cancel import per_event_cancel
from llama_adapter import ImageError, Pipeline, PromptTruncatedWarning
from llama_adapter.cancel import Cancelled, CancelToken
from llama_adapter.errors import USER_ERRORS, TextError, user_message
from llama_adapter.inputs.chat_template import CHAT_TEMPLATE_CHOICES, AlpacaFormat, PromptFormat, prompt_format
from llama_adapter.inputs.images import load_image
from llama_adapter.inputs.prompts import CAPTION_INSTRUCTION, fit_chat, format_prompt
from llama_adapter.inputs.text import check_length, check_text
from llama_adapter.options import DTYPE_CHOICES, QUANTIZE_MODES, SAMPLING, one_of, parse_adapter_shape
from llama_adapter.serve.threaded import iterate_in_thread
from llama_adapter.tiny import load_tiny, load_tiny_captioner

# The public LLaMA-7B (Hugging Face layout, safetensors) and the official instruction adapter.
DEFAULT_BASE = "huggyllama/llama-7b"
DEFAULT_ADAPTER = "LLaMA-Adapter-V1"
DEFAULT_CAPTION_ADAPTER = "CAPTION-7B"  # the official V2 captioning model (CLIP ViT-L/14 through open_clip)

ASSETS = Path(__file__).resolve().parent / "assets"
QUEUE_SIZE = 64
UPLOAD_CACHE = (600, 3600)  # (every, older than) in seconds: Gradio's delete_cache for uploaded files
PANEL_REFRESH_S = 2.0  # how often an open page updates the batch size and queue length in the model panel
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
CHAT_EXAMPLES = [
    "Tell me about alpacas.",
    "Write a short poem about the moon.",
    "List three ideas for a rainy afternoon.",
    "Explain what a transformer model is to a ten-year-old.",
]
CAPTION_EXAMPLES = sorted(ASSETS.glob("example-*.*"))
NO_IMAGE_MODEL = (
    "No image model is loaded, so images cannot be captioned. "
    "Start the app with --caption-adapter (or LLAMA_ADAPTER_CAPTION_ADAPTER) naming a multimodal adapter."
)

log = logging.getLogger("llama_adapter.app")

try:  # ZeroGPU on Hugging Face Spaces: a GPU is attached only while a decorated function runs.
    import spaces

    gpu: Callable[[Callable[..., Any]], Callable[..., Any]] = spaces.GPU
except ImportError:

    def gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn


# ---------------------------------------------------------------- configuration

ENV_VARS = {
    "base": "LLAMA_ADAPTER_BASE",
    "adapter": "LLAMA_ADAPTER_ADAPTER",
    "caption_adapter": "LLAMA_ADAPTER_CAPTION_ADAPTER",
    "adapter_shape": "LLAMA_ADAPTER_ADAPTER_SHAPE",
    "device": "LLAMA_ADAPTER_DEVICE",
    "dtype": "LLAMA_ADAPTER_DTYPE",
    "quantize": "LLAMA_ADAPTER_QUANTIZE",
    "compile": "LLAMA_ADAPTER_COMPILE",
    "tiny": "LLAMA_ADAPTER_TINY",
    "chat_template": "LLAMA_ADAPTER_CHAT_TEMPLATE",
    "system_prompt": "LLAMA_ADAPTER_SYSTEM_PROMPT",
    "max_batch": "LLAMA_ADAPTER_MAX_BATCH",
    "max_queue": "LLAMA_ADAPTER_MAX_QUEUE",
}  # --host, --port and --share fall back to Gradio's own GRADIO_SERVER_NAME, GRADIO_SERVER_PORT, GRADIO_SHARE


@dataclass(frozen=True)
class Settings:
    base: str
    adapter: str | None
    caption_adapter: str | None
    adapter_shape: tuple[int, int] | None  # an official V1 chat adapter's LENxLAYERS, where the file cannot tell
    device: str | None
    dtype: str | None
    quantize: str | None
    compile: bool
    tiny: bool
    host: str | None  # None: Gradio decides (its env vars, then 127.0.0.1:7860), as Spaces expects
    port: int | None
    share: bool | None
    chat_template: str = "alpaca"  # or "auto": the base's own chat template, when it has one
    system_prompt: str = ""  # for chat templates; the Alpaca template has no system prompt
    max_batch: int | None = None  # the scheduler's max_rows; None: its default for the device
    max_queue: int | None = None  # requests waiting for a row; None: the scheduler's default


def parse_settings(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    p = argparse.ArgumentParser(prog="python app.py", description="LLaMA-Adapter web app: streaming chat and image captioning.")
    p.add_argument("--base", help=f"base LLaMA: directory or Hugging Face repo id (default {DEFAULT_BASE}) [{ENV_VARS['base']}]")
    p.add_argument(
        "--adapter",
        help=f"chat adapter: file, official name or repo id; 'none' for the bare base (default {DEFAULT_ADAPTER}) [{ENV_VARS['adapter']}]",
    )
    p.add_argument(
        "--adapter-shape",
        metavar="LENxLAYERS",
        help=f"an official V1 chat adapter's prompt length and layers (e.g. 10x30) [{ENV_VARS['adapter_shape']}]",
    )
    p.add_argument(
        "--caption-adapter",
        help=f"multimodal adapter for the captioning tab; 'none' for no image model (default {DEFAULT_CAPTION_ADAPTER}) "
        f"[{ENV_VARS['caption_adapter']}]",
    )
    p.add_argument("--device", help=f"cpu or cuda (default: cuda when available) [{ENV_VARS['device']}]")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help=f"default: bf16 on GPU; on CPU, by free memory [{ENV_VARS['dtype']}]")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help=f"weight-only: 7B in 8 GB (int8) or 5 GB (int4) [{ENV_VARS['quantize']}]")
    p.add_argument(
        "--compile", action="store_true", default=None, help=f"compile the decode step (CUDA graphs on GPU) [{ENV_VARS['compile']}=1]"
    )
    p.add_argument(
        "--tiny", action="store_true", default=None, help=f"a tiny random model, built offline, to try the UI [{ENV_VARS['tiny']}=1]"
    )
    p.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATE_CHOICES,
        help=f"alpaca (default: the official adapters' template) or auto: the base's own chat template [{ENV_VARS['chat_template']}]",
    )
    p.add_argument("--system-prompt", help=f"initial system prompt for chat templates [{ENV_VARS['system_prompt']}]")
    p.add_argument("--max-batch", help=f"requests decoding together (default: 16 on CPU, 64 on GPU) [{ENV_VARS['max_batch']}]")
    p.add_argument("--max-queue", help=f"requests waiting for room in the batch (default 64) [{ENV_VARS['max_queue']}]")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1) [GRADIO_SERVER_NAME]")
    p.add_argument("--port", type=int, help="port (default 7860, or the next free one) [GRADIO_SERVER_PORT]")
    p.add_argument("--share", action="store_true", default=None, help="also serve through a public gradio.live link [GRADIO_SHARE=True]")
    a = p.parse_args(argv)

    def pick(name: str) -> str | None:
        value = getattr(a, name)
        return value if value is not None else env.get(ENV_VARS[name]) or None

    def flag(name: str) -> bool:
        return bool(getattr(a, name)) or env.get(ENV_VARS[name], "").lower() in {"1", "true", "yes", "on"}

    def optional(value: str) -> str | None:
        return None if value.lower() == "none" else value

    adapter = pick("adapter") or DEFAULT_ADAPTER
    caption_adapter = pick("caption_adapter") or DEFAULT_CAPTION_ADAPTER
    shape_text = pick("adapter_shape")
    try:
        adapter_shape = parse_adapter_shape(shape_text) if shape_text else None
    except ValueError as e:
        p.error(f"--adapter-shape / {ENV_VARS['adapter_shape']}: {e}")
    dtype = pick("dtype")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        p.error(f"{ENV_VARS['dtype']}={dtype!r}: use {one_of(DTYPE_CHOICES)}")
    chat_template = pick("chat_template") or "alpaca"
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        p.error(f"{ENV_VARS['chat_template']}={chat_template!r}: use {one_of(CHAT_TEMPLATE_CHOICES)}")

    def count(name: str, minimum: int) -> int | None:
        text = pick(name)
        if text is None:
            return None
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if not minimum <= value <= 1_000_000:
            p.error(f"--{name.replace('_', '-')} / {ENV_VARS[name]}={text!r}: give a whole number from {minimum} to 1000000")
        return value

    quantize = pick("quantize")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        p.error(f"{ENV_VARS['quantize']}={quantize!r}: use {one_of(QUANTIZE_MODES)}")
    return Settings(
        base=pick("base") or DEFAULT_BASE,
        adapter=optional(adapter),
        caption_adapter=optional(caption_adapter),
        adapter_shape=adapter_shape,
        device=pick("device"),
        dtype=dtype,
        quantize=quantize,
        compile=flag("compile"),
        tiny=flag("tiny"),
        host=a.host,
        port=a.port,
        share=a.share,
        chat_template=chat_template,
        system_prompt=pick("system_prompt") or "",
        max_batch=count("max_batch", 1),
        max_queue=count("max_queue", 0),
    )


# ---------------------------------------------------------------- models


@dataclass
class Models:
    chat: Pipeline
    caption: Pipeline | None  # None: no image model, and the captioning tab says so
    tiny: bool
    chat_format: PromptFormat = field(default_factory=AlpacaFormat)  # how the chat tab and /chat build prompts
    system_prompt: str = ""


def load_models(s: Settings) -> Models:
    models = load_pipelines(s)
    limits = {"max_rows": s.max_batch, "max_queue": s.max_queue}
    models.chat.scheduler.configure(**{k: v for k, v in limits.items() if v is not None})  # the caption model shares it
    return models


def load_pipelines(s: Settings) -> Models:
    if s.tiny:
        print("Building the tiny random model (random weights, for trying the interface)...", flush=True)
        chat = load_tiny(s.device or "cpu", s.dtype)
        return Models(chat, load_tiny_captioner(chat), True, prompt_format(chat.tokenizer, s.chat_template), s.system_prompt)
    print(f"Loading {s.base} with adapter {s.adapter or 'none'} (downloads are cached after the first run)...", flush=True)
    chat = llama_adapter.load(
        s.base, s.adapter, device=s.device, dtype=s.dtype, quantize=s.quantize, compile=s.compile, adapter_shape=s.adapter_shape
    )
    caption = None
    if s.caption_adapter:
        print(f"Loading the image model: {s.caption_adapter} on the same base...", flush=True)
        caption = chat.with_adapter(s.caption_adapter)  # shares the base weights: no second copy
    return Models(chat, caption, False, prompt_format(chat.tokenizer, s.chat_template), s.system_prompt)


def startup_error(err: Exception) -> str:
    return (
        f"error: the model could not be loaded.\n{user_message(err)}\n\n"
        "To try the app without any download:    python app.py --tiny\n"
        "To use weights already on this machine:  python app.py --base /path/to/llama-7b --adapter /path/to/adapter.pth"
    )


# ---------------------------------------------------------------- generation glue


def user_error(message: str) -> gr.Error:
    """A message for the user; bad input is expected, so no traceback in the server log either."""
    return gr.Error(message, print_exception=False)


def message_text(message: dict[str, Any]) -> str:
    """The text of a Gradio message, whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def chat_turns(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(user, assistant) pairs; a user message with no reply (e.g. stopped at once) pairs with ''."""
    turns: list[tuple[str, str]] = []
    for m in history:
        if m.get("role") == "user":
            turns.append((message_text(m), ""))
        elif m.get("role") == "assistant" and turns and not turns[-1][1]:
            turns[-1] = (turns[-1][0], message_text(m))
    return turns


_request_ids = itertools.count(1)


def stream_text(
    pipe: Pipeline,
    prompt: str,
    kind: str,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    cancel: CancelToken,
    started: float,
    image: Any = None,
) -> Iterator[str]:
    """The growing reply.  However the job ends (done, Stop, a client cancel), the model's work stops at
    its next step and one log line records why, after how many tokens and how long the job (from
    ``started``, preprocessing included) really ran."""
    rid = next(_request_ids)
    reason = "cancelled"  # unless the loop runs to its end
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)  # said to the user below, in our words
            stream = pipe.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, image=image, cancel=cancel)
    except Cancelled:
        log.info("%s #%d: cancelled after 0 tokens in %.2fs", kind, rid, time.monotonic() - started)
        return
    except ValueError as e:
        raise user_error(str(e)) from None
    if stream.truncated_tokens:
        gr.Warning(
            f"Your message is too long for the model's {pipe.max_seq_len}-token context, so its first "
            f"{stream.truncated_tokens} tokens were dropped. Shorten it for a complete answer."
        )
    log.info("%s #%d: started, prompt %d tokens", kind, rid, len(stream.prompt_ids))
    text = ""
    try:
        for delta in stream:
            text += delta
            yield text
        reason = stream.finish_reason or "done"
    except Cancelled:
        pass
    except Exception:  # a bug, not bad input: keep the details in the server log, tell the user plainly
        reason = "failed"
        log.exception("%s #%d: failed", kind, rid)
        raise user_error("Generation failed on the server (the details are in its log). Try again or change the settings.") from None
    finally:
        stream.close()
        log.info("%s #%d: %s after %d tokens in %.2fs", kind, rid, reason, len(stream.generated_ids), time.monotonic() - started)


# ---------------------------------------------------------------- the page


def model_panel(models: Models) -> str:
    """The model facts as an HTML table (escaped: names come from the command line)."""
    chat = models.chat
    rows = [
        ("Base", chat.base),
        ("Chat adapter", chat.adapter_name or "none"),
        ("Caption adapter", models.caption.adapter_name if models.caption else "none (no image model loaded)"),
        ("Device", str(chat.device)),
        ("Dtype", str(chat.dtype).removeprefix("torch.")),
        ("Weights", chat.weight_format),
        ("Context", f"{chat.max_seq_len} tokens"),
        ("Prompt template", "the base's chat template" if models.chat_format.name == "auto" else "Alpaca"),
        ("Trainable parameters", f"{chat.adapter_parameter_count():,} (the adapter)"),
        *serving_rows(chat),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='model-table'>{cells}</table>"


class ChatSession:
    """The conversation the model sees, kept on the server for each browser tab.

    The page shows it, but the page's copy can be overtaken: after Clear, an update that the cancelled
    reply had already sent may still paint the old turns.  So the next message is built on this
    history, never on the page's; Clear empties it and starts a new epoch, and a reply streaming for an
    older epoch writes nothing here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.history: list[dict[str, Any]] = []
        self.epoch = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> ChatSession:
        return ChatSession()  # gr.State copies its default for each tab: each starts empty, with its own lock

    def clear(self) -> None:
        with self._lock:
            self.history, self.epoch = [], self.epoch + 1

    def commit(self, epoch: int, history: list[dict[str, Any]]) -> bool:
        """Record ``history`` unless the conversation was cleared since ``epoch``; whether it was recorded."""
        with self._lock:
            if epoch != self.epoch:
                return False
            self.history = history
            return True


def check_message(text: str, limit: int, what: str = "The message") -> None:
    """Refuse, with a message for the user, text that is not Unicode or far too long (before any tokenising)."""
    try:
        check_text(text, what)
        check_length(text, limit, what)
    except TextError as e:
        raise user_error(str(e)) from None


def serving_rows(pipe: Pipeline) -> list[tuple[str, str]]:
    """The scheduler now: requests decoding together (the batch) and waiting for room (the queue)."""
    s = pipe.scheduler.stats()
    return [
        ("Batch", f"{s['rows']} of {s['max_rows']} rows, {s['cached_tokens']:,} of {s['max_cached_tokens']:,} cached tokens"),
        ("Queue", f"{s['queued']} waiting (at most {s['max_queue']})"),
    ]


def build_demo(models: Models) -> gr.Blocks:
    chat_pipe = models.chat
    limit = chat_pipe.max_seq_len
    chat_format = models.chat_format

    def check_new_message(message: str) -> None:
        if not message or not message.strip():
            raise user_error("The message is empty: type a question or an instruction first.")
        check_message(message, limit)
        if chat_pipe.scheduler.full():  # refused here, before the box is cleared: the message stays in it
            s = chat_pipe.scheduler.stats()
            raise user_error(
                f"The server is busy: {s['rows']} requests are running and {s['queued']} are waiting, as many as it "
                "takes. Your message is still in the box: send it again in a moment."
            )

    def add_user_message(message: str, session: ChatSession) -> tuple[str, list[dict[str, Any]]]:
        check_new_message(message)
        history = [*session.history, {"role": "user", "content": message}]
        session.commit(session.epoch, history)
        return "", history

    @gpu
    def respond(
        session: ChatSession, temperature: float, top_p: float, max_new_tokens: int, system: str, cancel: CancelToken
    ) -> Iterator[list[dict[str, Any]]]:
        started = time.monotonic()
        n = int(max_new_tokens)  # the sliders have checked the ranges
        epoch, history = session.epoch, session.history
        turns = chat_turns(history)
        if not turns:
            raise user_error("There is no message to answer: type one first.")
        *past, (message, _) = turns

        def render(earlier: list[tuple[str, str]], text: str) -> str:
            return chat_format.chat(earlier, text, system.strip() or None)

        try:
            prompt = fit_chat(past, message, chat_pipe.count_tokens, chat_pipe.prompt_budget(n), render)
        except ValueError as e:  # the base's template refused the conversation
            raise user_error(str(e)) from None
        if prompt.dropped_turns:
            gr.Warning(
                f"The conversation no longer fits in the model's {limit}-token context: it does not see the oldest "
                f"{prompt.dropped_turns} turn(s). Clear the chat to start afresh."
            )
        for text in stream_text(chat_pipe, prompt.text, "chat", temperature, top_p, n, cancel, started):
            update = [*history, {"role": "assistant", "content": text}]
            if not session.commit(epoch, update):
                return  # cleared meanwhile: the page must not get this conversation back
            yield update

    async def respond_stream(session: ChatSession, temperature: float, top_p: float, max_new_tokens: int, system: str):
        async for update in iterate_in_thread(lambda cancel: respond(session, temperature, top_p, max_new_tokens, system, cancel)):
            yield update

    def drop_last_reply(session: ChatSession) -> list[dict[str, Any]]:
        """For retry: everything up to and including the last user message."""
        history = session.history
        last_user = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=-1)
        session.commit(session.epoch, history[: last_user + 1])
        return session.history

    def clear_history(session: ChatSession) -> list[dict[str, Any]]:
        session.clear()
        return []

    def clear_chat(session: ChatSession) -> tuple[list[dict[str, Any]], str]:
        return clear_history(session), ""

    @gpu
    def chat_api(message: str, temperature: float, top_p: float, max_new_tokens: int, cancel: CancelToken) -> Iterator[str]:
        """One instruction in, the streamed reply out (no history: each call stands alone)."""
        started = time.monotonic()
        if not message or not message.strip():
            raise user_error("The message is empty: send a question or an instruction.")
        check_message(message, limit)
        prompt = chat_format.instruction(message, None, models.system_prompt or None)
        yield from stream_text(chat_pipe, prompt, "chat", temperature, top_p, int(max_new_tokens), cancel, started)

    async def chat_stream(message: str, temperature: float, top_p: float, max_new_tokens: int):
        # Runs with preprocess=False: Gradio's own range checks print a traceback per bad request; ours do not.
        message = message if isinstance(message, str) else ""
        temperature, top_p, max_new_tokens = checked_settings((temperature, top_p, max_new_tokens))
        async for text in iterate_in_thread(lambda cancel: chat_api(message, temperature, top_p, max_new_tokens, cancel)):
            yield text

    @gpu
    def caption(
        image: dict[str, Any] | None, prompt: str, temperature: float, top_p: float, max_new_tokens: int, cancel: CancelToken
    ) -> Iterator[str]:
        # Runs with preprocess=False: the upload arrives as Gradio's file dict, so a bad file gets our message.
        started = time.monotonic()
        if not image or not image.get("path"):
            raise user_error("No image: upload an image (or pick an example) first.")
        try:
            # Named as the user knows it: the server's upload path means nothing to them.
            picture = load_image(image["path"], name=image.get("orig_name") or Path(image["path"]).name)
        except ImageError as e:
            raise user_error(str(e)) from None
        if models.caption is None:
            raise user_error(NO_IMAGE_MODEL)
        if not prompt or not prompt.strip():
            gr.Warning("The prompt is empty: using the default caption prompt.")
            prompt = CAPTION_INSTRUCTION
        check_message(prompt, limit, "The prompt")
        yield from stream_text(
            models.caption, format_prompt(prompt), "caption", temperature, top_p, int(max_new_tokens), cancel, started, image=picture
        )

    async def caption_stream(image: dict[str, Any] | None, prompt: str, temperature: float, top_p: float, max_new_tokens: int):
        prompt = prompt if isinstance(prompt, str) else ""
        temperature, top_p, max_new_tokens = checked_settings((temperature, top_p, max_new_tokens))
        async for text in iterate_in_thread(lambda cancel: caption(image, prompt, temperature, top_p, max_new_tokens, cancel)):
            yield text

    # Concurrent requests (tabs, API clients, chat and captions alike) are batched by the model's scheduler,
    # which bounds and queues them itself; Gradio's queue only caps how many wait for a worker.
    model_event = {"concurrency_limit": None}
    # Uploads are deleted an hour after they arrive, so Gradio's cache cannot grow without bound.
    with gr.Blocks(title="LLaMA-Adapter", fill_width=False, delete_cache=UPLOAD_CACHE) as demo:
        gr.HTML(
            "<header class='app-header'><h1>LLaMA-Adapter</h1>"
            "<p>A frozen LLaMA that follows instructions through a small zero-init attention adapter "
            "(1.2M parameters for LLaMA-7B). "
            "Replies stream as they are generated. "
            "<a href='https://arxiv.org/abs/2303.16199' target='_blank'>Paper</a></p></header>"
        )
        if models.tiny:
            gr.HTML(
                "<div class='tiny-banner'><strong>Tiny random model.</strong> Started with <code>--tiny</code>: random weights "
                "for trying the interface, so the replies are nonsense.</div>"
            )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=320):
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat"):
                        chatbot = gr.Chatbot(
                            label="Conversation",
                            height=460,
                            buttons=["copy"],
                            placeholder="Ask anything: the whole conversation is the model's context.",
                            elem_id="chatbot",
                        )
                        with gr.Row(elem_classes="input-row"):
                            message = gr.Textbox(
                                placeholder="Type a message and press Enter", show_label=False, scale=5, min_width=160, elem_id="chat-input"
                            )
                            send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="chat-send")
                            stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="chat-stop")
                        clear = gr.Button("Clear conversation", size="sm", variant="secondary", elem_id="chat-clear")
                        gr.Examples(CHAT_EXAMPLES, inputs=[message], label="Examples", cache_examples=False)
                    with gr.Tab("Image captioning", id="caption"):
                        if models.caption is None:
                            gr.HTML(f"<div class='notice' id='no-image-model'>{NO_IMAGE_MODEL}</div>")
                        with gr.Row(equal_height=False):
                            with gr.Column(min_width=260):
                                image = gr.Image(
                                    type="filepath", label="Image", sources=["upload", "clipboard"], height=300, elem_id="caption-image"
                                )
                                caption_prompt = gr.Textbox(value=CAPTION_INSTRUCTION, label="Prompt", lines=2, elem_id="caption-prompt")
                                with gr.Row():
                                    caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-run")
                                    caption_stop = gr.Button("Stop", variant="stop", elem_id="caption-stop")
                            with gr.Column(min_width=260):
                                caption_out = gr.Textbox(label="Caption", lines=8, interactive=False, elem_id="caption-output")
                        gr.Examples(
                            [[str(p), CAPTION_INSTRUCTION] for p in CAPTION_EXAMPLES],
                            inputs=[image, caption_prompt],
                            label="Example images",
                            cache_examples=False,
                        )
            with gr.Column(scale=1, min_width=260):
                with gr.Accordion("Generation settings", open=True):
                    max_new_tokens = gr.Slider(1, limit, value=min(SAMPLING.max_new_tokens, limit), step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=SAMPLING.temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=SAMPLING.top_p, step=0.05, label="Top-p")
                    system = gr.Textbox(
                        value=models.system_prompt,
                        label="System prompt",
                        lines=2,
                        visible=chat_format.name != "alpaca",  # the Alpaca template has no place for one
                        elem_id="system-prompt",
                    )
                with gr.Accordion("Model", open=True):
                    panel = gr.HTML(model_panel(models), elem_id="model-panel")

        settings = [temperature, top_p, max_new_tokens]

        def checked_settings(values: tuple[Any, ...]) -> list[Any]:
            """The sliders' own range checks, as a message for the user (and no traceback in the server log)."""
            checked = []
            for slider, value in zip(settings, values, strict=True):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise user_error(f"{slider.label}: {value!r} is not a number")
                try:
                    checked.append(slider.preprocess(value))
                except gr.Error as e:
                    raise user_error(f"{slider.label}: {e.message}") from None
            return checked

        session = gr.State(ChatSession())
        submit_events = [
            # The check is queued (outside the model's group, no limit), as Gradio shows no error message of a
            # queue=False step, and has no outputs, so that no "Error" label covers the conversation.
            trigger(check_new_message, [message], None, concurrency_limit=None, show_progress="hidden", api_visibility="private")
            .success(add_user_message, [message, session], [message, chatbot], queue=False, api_visibility="private")
            .success(respond_stream, [session, *settings, system], [chatbot], api_visibility="private", **model_event)
            for trigger in (message.submit, send.click)
        ]
        retry_event = chatbot.retry(drop_last_reply, [session], [chatbot], queue=False, api_visibility="private").then(
            respond_stream, [session, *settings, system], [chatbot], api_visibility="private", **model_event
        )
        chat_events = [*submit_events, retry_event]
        stop.click(None, cancels=chat_events, api_visibility="private")
        clear.click(clear_chat, [session], [chatbot, message], cancels=chat_events, queue=False, api_visibility="private")
        chatbot.clear(clear_history, [session], [chatbot], cancels=chat_events, queue=False, api_visibility="private")

        # The API's /chat: plain text in and out, through hidden components.
        api_message = gr.Textbox(visible=False, label="message")
        api_reply = gr.Textbox(visible=False, label="reply")
        gr.Button(visible=False).click(chat_stream, [api_message, *settings], [api_reply], api_name="chat", preprocess=False, **model_event)

        caption_event = caption_btn.click(
            caption_stream, [image, caption_prompt, *settings], [caption_out], api_name="caption", preprocess=False, **model_event
        )
        caption_stop.click(None, cancels=[caption_event], api_visibility="private")
        refresh = gr.Timer(PANEL_REFRESH_S)
        refresh.tick(lambda: model_panel(models), None, [panel], queue=False, api_visibility="private", show_progress="hidden")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    handler = logging.StreamHandler()  # the package's log (requests, loaded adapters); other libraries keep their own levels
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package_log = logging.getLogger("llama_adapter")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    try:
        models = load_models(settings)
    except USER_ERRORS as e:
        print(startup_error(e), file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print("error: out of GPU memory while loading; try --quantize int8, --caption-adapter none, or --device cpu", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    demo = build_demo(models)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        # System fonts: the page must not depend on a font CDN (offline machines, privacy).
        theme=gr.themes.Soft(primary_hue="orange", secondary_hue="stone", font=SYSTEM_FONTS, font_mono=MONO_FONTS),
        css_paths=[ASSETS / "style.css"],
        allowed_paths=[str(ASSETS)],
        max_file_size="25mb",
        footer_links=["api", "gradio"],
        app_kwargs=per_event_cancel(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
