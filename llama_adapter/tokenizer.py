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

    Only a short window of recent tokens is re-decoded each step.  Text that ends in an
    incomplete UTF-8 sequence (byte-fallback pieces of an emoji or CJK character) is held
    back until the sequence completes; ``flush`` emits whatever is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoding from here fixes the text of ids[_prefix:_read]
        self._read = 0  # ids before this have been emitted
        self.text = ""  # everything emitted so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        window = self.ids[self._prefix :]
        done = self.tokenizer.decode(window[: self._read - self._prefix])
        new = self.tokenizer.decode(window)
        if len(new) <= len(done) or new.endswith("\ufffd") or not new.startswith(done):
            return ""
        delta = new[len(done) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The rest of the text (e.g. a trailing invalid byte sequence that never completed)."""
        full = self.tokenizer.decode(self.ids)
        if not full.startswith(self.text):
            raise RuntimeError("streamed text diverged from the full decode")
        delta = full[len(self.text) :]
        self.text = full
        self._prefix = self._read = len(self.ids)
        return delta
