"""Chat history folded into the Alpaca template, and fitted to the context by dropping the oldest turns."""

from __future__ import annotations

from pathlib import Path

from llama_adapter import Tokenizer
from llama_adapter.inputs.prompts import fit_chat, format_chat, format_prompt


def test_a_single_message_is_the_plain_alpaca_prompt() -> None:
    assert format_chat([], "Name a color.") == format_prompt("Name a color.")


def test_turns_follow_the_template_in_order() -> None:
    text = format_chat([("Hi", "Hello!"), ("How are you?", "Fine.")], "Bye")
    header = format_prompt("x").split("### Instruction:")[0]
    assert text == (
        header + "### Instruction:\nHi\n\n### Response:\nHello!\n\n"
        "### Instruction:\nHow are you?\n\n### Response:\nFine.\n\n"
        "### Instruction:\nBye\n\n### Response:"
    )


def test_a_message_that_quotes_the_template_stays_intact() -> None:
    message = "What does '### Instruction:\n' mean?"
    assert format_chat([("a", "b")], message).endswith(f"### Instruction:\n{message}\n\n### Response:")


def test_fit_chat_drops_the_oldest_turns_first(tokenizer_path: Path) -> None:
    tok = Tokenizer(tokenizer_path)

    def count(text: str) -> int:
        return len(tok.encode(text))

    turns = [(f"question {i} about the water", f"answer {i} with some words") for i in range(12)]
    full = fit_chat(turns, "last one", count, budget=10**6)
    assert full.dropped_turns == 0 and full.text == format_chat(turns, "last one")
    budget = count(format_chat(turns[5:], "last one"))
    fitted = fit_chat(turns, "last one", count, budget)
    assert fitted.dropped_turns == 5 and fitted.text == format_chat(turns[5:], "last one")
    assert fit_chat(turns, "last one", count, budget - 1).dropped_turns == 6


def test_fit_chat_keeps_the_message_even_alone_over_budget(tokenizer_path: Path) -> None:
    tok = Tokenizer(tokenizer_path)
    fitted = fit_chat([("a", "b")], "a long message " * 50, lambda t: len(tok.encode(t)), budget=5)
    assert fitted.dropped_turns == 1 and fitted.text == format_prompt("a long message " * 50)


def test_an_empty_input_follows_each_models_own_code() -> None:
    """The official V2 format_prompt uses the input template whenever an input is given, even empty; the V1
    training code drops an empty input, and so do our instruction records."""
    from llama_adapter.inputs.prompts import PROMPT_INPUT, PROMPT_NO_INPUT
    from llama_adapter.train.data import instruction_record
    from llama_adapter.train.image_data import image_text_record

    assert format_prompt("Name a color.", "") == PROMPT_INPUT.format(instruction="Name a color.", input="")
    assert format_prompt("Name a color.") == PROMPT_NO_INPUT.format(instruction="Name a color.")
    v1 = instruction_record({"instruction": "Name a color.", "input": "", "output": "red"})
    assert v1.prompt() == format_prompt("Name a color.")
    v2 = image_text_record({"instruction": "Name a color.", "input": "", "output": "red"})
    assert v2.prompt() == format_prompt("Name a color.", "")
    assert image_text_record({"instruction": "Name a color.", "output": "red"}).prompt() == format_prompt("Name a color.")
