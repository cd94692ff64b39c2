"""Checks on text from users before it reaches the tokenizer: valid Unicode, bounded length.

Python strings may hold lone surrogates (``"\\ud800"``, e.g. from JSON's ``"\\ud800"`` escape), which
are not Unicode text: sentencepiece cannot encode them and raises a bare RuntimeError.
"""

from __future__ import annotations

from ..errors import TextError

# A LLaMA piece is at most 16 characters, and few are longer than 8: text longer than this many
# characters per token of context cannot fit, so it is refused before any tokenising work.
CHARS_PER_CONTEXT_TOKEN = 32


def invalid_unicode_at(text: str) -> int | None:
    """The index of the first lone surrogate in ``text``, or None if it is valid Unicode."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def sanitize(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (the replacement character)."""
    if invalid_unicode_at(text) is None:
        return text
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def check_text(text: str, what: str = "the text") -> None:
    """Raise TextError, naming ``what`` and the position, if ``text`` is not valid Unicode."""
    at = invalid_unicode_at(text)
    if at is not None:
        raise TextError(
            f"{what} is not valid Unicode: character {at + 1} is a lone surrogate (U+{ord(text[at]):04X}), "
            "which is not a character; remove it or fix the encoding of the text"
        )


def max_chars(max_seq_len: int) -> int:
    """The longest text accepted for a model with a ``max_seq_len``-token context."""
    return CHARS_PER_CONTEXT_TOKEN * max_seq_len


def check_length(text: str, max_seq_len: int, what: str = "the text") -> None:
    limit = max_chars(max_seq_len)
    if len(text) > limit:
        raise TextError(
            f"{what} is {len(text):,} characters long; the model reads at most {max_seq_len:,} tokens, so at most "
            f"{limit:,} characters ({CHARS_PER_CONTEXT_TOKEN} per token of context) are accepted: shorten it"
        )
