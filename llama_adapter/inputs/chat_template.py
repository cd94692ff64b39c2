"""Prompt formats: the official Alpaca template, or a base's own chat template (jinja, as transformers renders it).

Both turn a conversation (earlier (user, assistant) turns, the new message, an optional system
prompt) into the prompt text the model continues.  ``prompt_format(tokenizer, "auto")`` is the
base's template when it has one (Llama-3-Instruct, TinyLlama-Chat, SmolLM-Instruct) and Alpaca
otherwise; ``"alpaca"`` is the official adapters' template and the default everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, Protocol

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .prompts import format_chat, format_prompt

CHAT_TEMPLATE_CHOICES = ("alpaca", "auto")


class PromptFormat(Protocol):
    name: str

    def chat(self, turns: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        """The prompt for ``message`` after ``turns``, ready for the reply."""
        ...

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        """The prompt for one instruction (and its optional input)."""
        ...

    def training_texts(self, instruction: str, input: str, output: str, system: str | None = None) -> tuple[str, str]:
        """(prompt, prompt + reply) of one training record; the loss is on what the second adds."""
        ...


class AlpacaFormat:
    """The official Alpaca templates (``prompts.py``); it has no place for a system prompt, which is ignored."""

    name = "alpaca"

    def chat(self, turns: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        return format_chat(turns, message)

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        return format_prompt(instruction, input)  # the V2 rule: a given input, even empty, gets the input template

    def training_texts(self, instruction: str, input: str, output: str, system: str | None = None) -> tuple[str, str]:
        prompt = format_prompt(instruction, input or None)  # the V1 training code drops an empty input
        return prompt, prompt + output


class _GenerationTags(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers): rendered as their body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's API)

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A base's jinja chat template, rendered in a sandbox with the names and settings transformers gives it
    (``messages``, ``add_generation_prompt``, the special tokens' texts, ``raise_exception``, ``strftime_now``;
    ``trim_blocks``/``lstrip_blocks``)."""

    name = "auto"

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self.special_tokens = special_tokens

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTags, "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise ValueError(f"the base's chat template does not compile: {e}") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:  # e.g. raise_exception('Conversation roles must alternate ...')
            raise ValueError(f"the base's chat template refused the conversation: {e}") from None

    @staticmethod
    def messages(turns: Sequence[tuple[str, str]], message: str, system: str | None) -> list[dict[str, str]]:
        out = [{"role": "system", "content": system}] if system else []
        for user, reply in turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return [*out, {"role": "user", "content": message}]

    def chat(self, turns: Sequence[tuple[str, str]], message: str, system: str | None = None) -> str:
        return self.render(self.messages(turns, message, system), add_generation_prompt=True)

    def instruction(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        return self.chat([], _user_message(instruction, input or ""), system)

    def training_texts(self, instruction: str, input: str, output: str, system: str | None = None) -> tuple[str, str]:
        messages = self.messages([], _user_message(instruction, input), system)
        prompt = self.render(messages, add_generation_prompt=True)
        full = self.render([*messages, {"role": "assistant", "content": output}], add_generation_prompt=False)
        return prompt, full


def _user_message(instruction: str, input: str) -> str:
    """An Alpaca record as one user message: the input, if any, after a blank line."""
    return f"{instruction}\n\n{input}" if input else instruction


class _HasTemplate(Protocol):
    chat_template: str | None
    bos_id: int | None
    eos_id: int

    def token_text(self, token_id: int) -> str: ...


def prompt_format(tokenizer: _HasTemplate, choice: str = "alpaca") -> PromptFormat:
    """``alpaca``, or ``auto``: the base's own chat template when it has one, else Alpaca."""
    if choice not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"unknown chat template {choice!r}; use {' or '.join(CHAT_TEMPLATE_CHOICES)}")
    if choice == "alpaca" or not tokenizer.chat_template:
        return AlpacaFormat()
    special = {"eos_token": tokenizer.token_text(tokenizer.eos_id)}
    special["bos_token"] = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    return ChatTemplate(tokenizer.chat_template, special)
