"""Command line: stream a completion to stdout.

python -m llama_adapter.generate --base B [--adapter A] (--prompt TEXT | --instruction TEXT [--input TEXT] | --caption)
    [--image PATH]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .errors import USER_ERRORS, user_message
from .inputs.prompts import caption_prompt, format_prompt
from .options import DTYPE_CHOICES, QUANTIZE_MODES, SAMPLING
from .serve.loading import load
from .serve.pipeline import PromptTruncatedWarning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base LLaMA: Meta or HF checkpoint directory, or a Hugging Face repo id")
    p.add_argument("--adapter", help="adapter: file, directory, official name (e.g. LLaMA-Adapter-V1) or Hugging Face repo id")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="raw prompt text, used as is")
    text.add_argument("--instruction", help="an instruction, wrapped in the Alpaca template")
    text.add_argument("--caption", action="store_true", help="caption --image with the official caption prompt")
    p.add_argument("--input", help="optional input for --instruction")
    p.add_argument("--image", help="image file for a multimodal adapter (e.g. BIAS-7B, CAPTION-7B)")
    p.add_argument("--max-new-tokens", type=int, default=SAMPLING.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SAMPLING.temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=SAMPLING.top_p)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-seq-len", type=int, help="context length (default: the model's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bf16 on GPU; on CPU chosen with --quantize by available memory")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="weight-only serving: 7B in about 8 GB (int8) or 5 GB (int4)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on GPU); the first request pays")
    args = p.parse_args(argv)
    if args.input is not None and args.instruction is None:
        p.error("--input goes with --instruction")
    if args.caption and args.image is None:
        p.error("--caption needs --image")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.caption:
        prompt = caption_prompt()
    else:
        prompt = args.prompt if args.prompt is not None else format_prompt(args.instruction, args.input)
    try:
        pipe = load(
            args.base,
            args.adapter,
            device=args.device,
            dtype=args.dtype,
            max_seq_len=args.max_seq_len,
            quantize=args.quantize,
            compile=args.compile,
        )
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
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; try --quantize int8, a smaller --max-seq-len, or --device cpu", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
