"""Command line: stream a completion to stdout.

python -m llama_adapter.generate --base B [--adapter A]
    (--prompt TEXT | --prompt-file PATH|- | --instruction TEXT [--input TEXT] | --caption) [--image PATH]
    [--chat-template alpaca|auto] [--system TEXT]

A closed pipe (``| head -c 10``) ends the run quietly, with the status of a process killed by SIGPIPE
(141); a closed stdout or a full disk is a one-line ``error:`` with status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from .errors import USER_ERRORS, TextError, user_message
from .inputs.chat_template import CHAT_TEMPLATE_CHOICES, prompt_format
from .inputs.prompts import caption_prompt
from .inputs.text import check_text
from .options import DTYPE_CHOICES, QUANTIZE_MODES, SAMPLING, parse_adapter_shape
from .serve.loading import load
from .serve.pipeline import PromptTruncatedWarning

SIGPIPE_STATUS = 128 + 13  # what a shell reports for a process killed by SIGPIPE


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt text from the arguments, a file or stdin, checked to be valid Unicode; None for --instruction,
    which the base's prompt format renders once it is loaded (its parts are checked here)."""
    if args.caption:
        return caption_prompt()
    if args.prompt_file is not None:
        source = "stdin" if args.prompt_file == "-" else args.prompt_file
        try:
            data = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
            prompt = data.decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt file not found: {args.prompt_file}") from None
        except UnicodeDecodeError as e:
            raise TextError(f"the prompt in {source} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise TextError(f"cannot read the prompt from {source}: {e.strerror or e}") from None
        what = f"the prompt in {source}"
    elif args.prompt is not None:
        prompt, what = args.prompt, "--prompt"
    else:
        for value, name in ((args.instruction, "--instruction"), (args.input, "--input"), (args.system, "--system")):
            if value is not None:
                check_text(value, name)
        return None
    # Arguments that are not UTF-8 reach Python as lone surrogates, which no tokenizer can encode.
    check_text(prompt, what)
    return prompt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base LLaMA: Meta or HF checkpoint directory, or a Hugging Face repo id")
    p.add_argument("--adapter", help="adapter: file, directory, official name (e.g. LLaMA-Adapter-V1) or Hugging Face repo id")
    p.add_argument(
        "--adapter-shape",
        metavar="LENxLAYERS",
        help="an official V1 file's prompt length and layers (e.g. 10x30)",
    )
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="raw prompt text, used as is")
    text.add_argument("--prompt-file", help="read the raw prompt from this UTF-8 file, or from stdin with '-' (for long prompts)")
    text.add_argument("--instruction", help="an instruction, wrapped in the Alpaca template")
    text.add_argument("--caption", action="store_true", help="caption --image with the official caption prompt")
    p.add_argument("--input", help="optional input for --instruction")
    p.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATE_CHOICES,
        default="alpaca",
        help="template for --instruction: alpaca (the official adapters'), or auto: the base's own chat template when it has one",
    )
    p.add_argument("--system", help="system prompt for --instruction with a chat template (Alpaca has none)")
    p.add_argument("--image", help="image file for a multimodal adapter (e.g. BIAS-7B, CAPTION-7B)")
    p.add_argument("--max-new-tokens", type=positive_int, default=SAMPLING.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SAMPLING.temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=SAMPLING.top_p)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-seq-len", type=positive_int, help="context length (default: the model's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bf16 on GPU; on CPU chosen with --quantize by available memory")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="weight-only serving: 7B in about 8 GB (int8) or 5 GB (int4)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on GPU); the first request pays")
    args = p.parse_args(argv)
    if args.input is not None and args.instruction is None:
        p.error("--input goes with --instruction")
    if args.caption and args.image is None:
        p.error("--caption needs --image")
    if args.adapter_shape is not None:
        if args.adapter is None:
            p.error("--adapter-shape goes with --adapter")
        try:
            args.adapter_shape = parse_adapter_shape(args.adapter_shape)
        except ValueError as e:
            p.error(f"--adapter-shape: {e}")
    if args.system is not None and args.instruction is None:
        p.error("--system goes with --instruction")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # what was loaded (e.g. an adapter's geometry), apart from the text on stdout
    handler.setFormatter(logging.Formatter("llama_adapter: %(message)s"))
    logging.getLogger("llama_adapter").addHandler(handler)
    logging.getLogger("llama_adapter").setLevel(logging.INFO)
    stream = None
    try:
        prompt = read_prompt(args)
        pipe = load(
            args.base,
            args.adapter,
            adapter_shape=args.adapter_shape,
            device=args.device,
            dtype=args.dtype,
            max_seq_len=args.max_seq_len,
            quantize=args.quantize,
            compile=args.compile,
        )
        if prompt is None:
            prompt = prompt_format(pipe.tokenizer, args.chat_template).instruction(args.instruction, args.input, args.system)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)  # reported below, once, in our words
            stream = pipe.stream(
                prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                stop=args.stop,
                seed=args.seed,
                image=args.image,
            )
        if stream.truncated_tokens:
            print(f"note: the prompt was too long; its first {stream.truncated_tokens} tokens were dropped", file=sys.stderr)
        if sys.stdout is None:  # started with stdout closed (>&-)
            print("error: stdout is closed, so the output cannot be written; redirect it to a file or a pipe", file=sys.stderr)
            return 2
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (| head): stop generating, say nothing
        _silence_stdout()
        return SIGPIPE_STATUS
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; try --quantize int8, a smaller --max-seq-len, or --device cpu", file=sys.stderr)
        return 2
    except OSError as e:  # writing the output failed (USER_ERRORS above took missing input files)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EBADF):
            raise
        _silence_stdout()
        print(f"error: could not write the output: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if stream is not None:
            stream.close()
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
