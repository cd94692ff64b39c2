"""Hugging Face ``tokenizer.json`` files through the ``tokenizers`` library: Llama 3's byte-level BPE
(128k vocabulary), and the sentencepiece-style files of TinyLlama, SmolLM and other LLaMA-family bases.

Special tokens come from the files beside it (see ``weights.base.read_special_tokens``): BOS and EOS
from ``tokenizer_config.json``, end-of-turn ids from ``config.json`` and ``generation_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as Backend

from .tokenizer import with_bos_eos


@dataclass(frozen=True)
class SpecialTokens:
    """What the configs say about special tokens: texts (tokenizer_config.json) and ids (config / generation config)."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    add_bos: bool | None = None  # tokenizer_config's add_bos_token; None: whatever the file's post-processor does
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default=())


class HFTokenizer:
    def __init__(self, path: str | Path, special: SpecialTokens = SpecialTokens()) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        try:
            self.backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for unreadable files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json file ({e})") from None
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.n_words: int = max(vocab.values()) + 1
        self._special_ids = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

        def token_id(text: str | None, what: str) -> int | None:
            if text is None:
                return None
            if text not in vocab:
                raise ValueError(f"{path}: the {what} token {text!r} (tokenizer_config.json) is not in the vocabulary")
            return vocab[text]

        self.bos_id: int | None = token_id(special.bos, "BOS")
        if self.bos_id is None:
            self.bos_id = special.bos_id
        eos = token_id(special.eos, "EOS")
        eos_ids = ([eos] if eos is not None else []) + list(special.eos_ids)
        if not eos_ids:
            raise ValueError(f"{path}: no EOS token: neither tokenizer_config.json nor config.json / generation_config.json names one")
        self.eos_id: int = eos_ids[0]
        self.stop_ids: frozenset[int] = frozenset(eos_ids)
        pad = token_id(special.pad, "pad")
        self.pad_id: int = pad if pad is not None else self.eos_id
        self.chat_template: str | None = None
        self.add_bos = special.add_bos if special.add_bos is not None else self._post_processor_adds_bos()

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        ids = self.backend.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return with_bos_eos(ids, self.bos_id, self.eos_id, bos and self.add_bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id) or ""

    @cached_property
    def anchor(self) -> tuple[int, str]:
        """A visible, whitespace-free, non-special token that decodes on its own as in the middle of a text."""
        for i in range(self.n_words):
            if self.backend.id_to_token(i) is None or i in self._special_ids.values():
                continue
            text = self.decode([i])
            plain = text.isprintable() and "\ufffd" not in text and not any(c.isspace() for c in text)
            if text and plain and self.decode([i, i]) == text * 2:
                return i, text
        raise ValueError(f"{self.path} has no plain visible token to stream text with")
