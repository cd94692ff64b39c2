"""Prompt templates: the Alpaca templates and caption instruction of the official LLaMA-Adapter repository, word
for word, and chat history folded into them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    """The Alpaca prompt for ``instruction`` (and optional ``input``); the response follows it.

    The input template is used whenever ``input`` is given, even empty, as the official V2
    ``format_prompt`` does (its training data pass a record's ``input`` as it is).  The official V1
    training code instead drops an empty input; our instruction records follow that rule by passing
    ``input or None`` (``train.data.InstructionRecord``).
    """
    if input is not None:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def caption_prompt() -> str:
    """The prompt the official V2 models were trained to caption images with."""
    return format_prompt(CAPTION_INSTRUCTION)


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    dropped_turns: int  # oldest (user, assistant) turns left out so that the prompt fits


def format_chat(turns: Sequence[tuple[str, str]], message: str) -> str:
    """A conversation in the Alpaca template: one Instruction/Response pair per turn, then the new message.

    With no earlier turns this is exactly ``format_prompt(message)``.
    """
    prompt = format_prompt(message)
    if not turns:
        return prompt
    head, tail = prompt.split("### Instruction:\n", 1)
    past = "".join(f"### Instruction:\n{user}\n\n### Response:\n{reply}\n\n" for user, reply in turns)
    return f"{head}{past}### Instruction:\n{tail}"


def fit_chat(
    turns: Sequence[tuple[str, str]],
    message: str,
    count_tokens: Callable[[str], int],
    budget: int,
    render: Callable[[Sequence[tuple[str, str]], str], str] = format_chat,
) -> ChatPrompt:
    """The conversation prompt (``render``: Alpaca's ``format_chat`` or a chat template's) with as many of the
    most recent turns as fit in ``budget`` tokens.

    The new message itself is always kept, even alone over budget: the model then truncates it.
    """
    # Dropping turns never lengthens the prompt, so bisect for the fewest dropped turns that fit.
    lo, hi = 0, len(turns)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(render(turns[mid:], message)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return ChatPrompt(render(turns[lo:], message), lo)
