"""SentencePiece tokenizer (LLaMA's ``tokenizer.model``) and a streaming-safe detokenizer."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from .text import sanitize


class Tokenizer:
    def __init__(self, model_path: str | Path) -> None:
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

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids; lone surrogates (not Unicode, which sentencepiece cannot take) are encoded as U+FFFD."""
        ids: list[int] = self.sp.encode(sanitize(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

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
    an emoji or CJK character) is held back until the sequence completes; ``flush`` emits
    whatever is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
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
