"""Prompt templates: the Alpaca templates and caption instruction of the official LLaMA-Adapter repository, word for word."""

from __future__ import annotations

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# The instruction of the official V2 caption training data (no trailing period).
CAPTION_INSTRUCTION = "Generate caption of this image"


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for ``instruction`` (and optional ``input``); the response follows it."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def caption_prompt() -> str:
    """The prompt the official V2 models were trained to caption images with."""
    return format_prompt(CAPTION_INSTRUCTION)
