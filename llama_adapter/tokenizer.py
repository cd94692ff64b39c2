"""SentencePiece tokenizer (LLaMA's ``tokenizer.model``) and a streaming-safe detokenizer."""

from __future__ import annotations

from pathlib import Path

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = SentencePieceProcessor(model_file=str(path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # LLaMA's model has no pad piece (-1); batching pads with EOS, which is always masked out.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation is ``decode(ids)``.

    Each step re-decodes a short window: the new tokens plus a few already emitted ones as
    context, so that sentencepiece's handling of a leading space or whitespace piece at the
    window's start is the same in both decodes and cancels out.  Text that ends in an
    incomplete UTF-8 sequence (byte-fallback pieces of an emoji or CJK character) is held
    back until the sequence completes; ``flush`` emits whatever is left at the end.
    """

    CONTEXT = 4  # emitted tokens kept in front of the window

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this have been emitted
        self.text = ""  # everything emitted so far

    def _delta(self) -> str | None:
        """Text of ids[_read:] as the full decode would show it, or None while the window disagrees."""
        done = self.tokenizer.decode(self.ids[self._prefix : self._read])
        new = self.tokenizer.decode(self.ids[self._prefix :])
        return new[len(done) :] if new.startswith(done) else None

    def _advance(self, delta: str) -> str:
        self._read = len(self.ids)
        self._prefix = max(self._read - self.CONTEXT, 0)
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
        if delta is None:  # the window never agreed: fall back to the one full decode
            full = self.tokenizer.decode(self.ids)
            delta = full[len(self.text) :] if full.startswith(self.text) else ""
        return self._advance(delta)
