"""Tokenizers: what the rest of the package needs of one (``TextTokenizer``), LLaMA's sentencepiece
``tokenizer.model`` (``Tokenizer``), and a streaming-safe detokenizer for both.  Hugging Face
``tokenizer.json`` files (Llama 3's byte-level BPE) are read by ``hf_tokenizer.HFTokenizer``.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Protocol

from sentencepiece import SentencePieceProcessor

from .text import sanitize


class TextTokenizer(Protocol):
    """The interface generation and training use; both backends satisfy it.

    ``encode(text, bos=True)`` starts with BOS once (text that already begins with the BOS token
    gets no second one) and reads special-token strings in ``text`` (``<|eot_id|>``, ``</s>``) as
    those tokens; ``decode`` leaves special tokens out.  ``stop_ids``: every id that ends a reply
    (EOS and the model's end-of-turn tokens).  ``anchor`` is for ``StreamDecoder``.
    """

    path: Path
    n_words: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: frozenset[int]
    chat_template: str | None  # the base's own (jinja), set by the loader when it has one

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """The literal text of a (special) token, e.g. ``<|eot_id|>``, for chat templates."""
        ...

    @property
    def anchor(self) -> tuple[int, str]: ...


def with_bos_eos(ids: list[int], bos_id: int | None, eos_id: int, bos: bool, eos: bool) -> list[int]:
    """``ids`` with BOS in front (unless it is already there) and EOS at the end, as asked."""
    head = [bos_id] if bos and bos_id is not None and not (ids and ids[0] == bos_id) else []
    return head + ids + ([eos_id] if eos else [])


class Tokenizer:
    """LLaMA-1/2's sentencepiece ``tokenizer.model``."""

    def __init__(self, model_path: str | Path, read_control_pieces: bool = False) -> None:
        """``read_control_pieces``: read ``<s>`` / ``</s>`` in text as those tokens, which a chat template's
        rendering needs (Llama-2-chat writes them).  Off, text is text, as the official LLaMA-Adapter code
        encodes it: a user who types ``</s>`` gets those characters, never an end of sequence."""
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:  # e.g. a Llama-3 tiktoken file, or a corrupt download
            raise ValueError(f"{path} is not a sentencepiece model ({e}); LLaMA-1/2 ship one as tokenizer.model") from None
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # LLaMA's model has no pad piece (-1); batching pads with EOS, which is always masked out.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        # The loader adds the end-of-turn ids a base's config.json / generation_config.json name.
        self.stop_ids: frozenset[int] = frozenset({self.eos_id})
        self.chat_template: str | None = None
        self.read_control_pieces = read_control_pieces

    @cached_property
    def _specials(self) -> tuple[re.Pattern[str], dict[str, int]]:
        """The control pieces (``<s>``, ``</s>``) by their text, and a pattern that splits text on them."""
        sp = self.sp
        pieces = {sp.id_to_piece(i): i for i in range(self.n_words) if sp.is_control(i)}
        alternatives = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
        return re.compile(f"({alternatives})" if pieces else r"(?!)"), pieces

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids; lone surrogates (not Unicode, which sentencepiece cannot take) are encoded as U+FFFD.

        With ``read_control_pieces``, control-piece strings in the text are those tokens (as transformers
        reads them in Llama-2-chat prompts); each stretch of text between them is encoded on its own, as
        Meta's chat code does.
        """
        text = sanitize(text)
        if not self.read_control_pieces:
            return with_bos_eos(self.sp.encode(text), self.bos_id, self.eos_id, bos, eos)
        pattern, pieces = self._specials
        ids: list[int] = []
        for part in pattern.split(text) if "<" in text else [text]:
            if part in pieces:
                ids.append(pieces[part])
            elif part:
                ids += self.sp.encode(part)
        return with_bos_eos(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    @cached_property
    def anchor(self) -> tuple[int, str]:
        """A plain visible piece (no whitespace, not special, not a byte) and its text, for StreamDecoder."""
        sp = self.sp
        for i in range(self.n_words):
            piece = sp.id_to_piece(i)
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) and "\u2581" not in piece and piece.strip():
                return i, self.decode([i])
        raise ValueError(f"{self.path} has no plain visible piece to stream text with")


class StreamDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation is ``decode(ids)``.

    Each step re-decodes only the tokens not yet emitted.  Away from the start of the text they
    are decoded behind a fixed visible anchor piece whose text is then cut off, so sentencepiece's
    start-of-text whitespace handling (dummy prefix, collapsed leading spaces) never applies to
    a mid-text window.  Text that ends in an incomplete UTF-8 sequence (byte-fallback pieces of
    an emoji or CJK character, or of byte-level BPE tokens) is held back until the sequence
    completes; ``flush`` emits whatever is left at the end.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        if self._prefix == 0:  # the true start of the text: exactly as decode(ids) sees it
            return self.tokenizer.decode(ids)
        anchor, anchor_text = self.tokenizer.anchor
        return self.tokenizer.decode([anchor, *ids])[len(anchor_text) :]

    def _delta(self) -> str | None:
        """Text of ids[_read:] as the full decode shows it, or None while the windows disagree."""
        done = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        return new[len(done) :] if new.startswith(done) else None

    def _advance(self, delta: str) -> str:
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta

    def push(self, token: int) -> str:
        self.ids.append(token)
        delta = self._delta()
        if not delta or delta.endswith("\ufffd"):
            return ""
        return self._advance(delta)

    def flush(self) -> str:
        """The rest of the text (e.g. a trailing invalid byte sequence that never completed)."""
        delta = self._delta()
        if delta is None:  # the windows never agreed: fall back to the one full decode
            full = self.tokenizer.decode(self.ids)
            delta = full[len(self.text) :] if full.startswith(self.text) else ""
        return self._advance(delta)
