"""Image-text training data: caption, instruction and LLaVA-style conversation records with an image file.

One record per image, in the same JSON list or JSON Lines files as text data:

    {"image": "coco/0001.jpg", "caption": "A dog runs on the beach."}
    {"image": "coco/0002.jpg", "instruction": "What colour is the bus?", "input": "", "output": "Red."}
    {"image": "coco/0003.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                                 {"from": "gpt", "value": "A kitchen."}]}

Captions are prompted with the official caption instruction.  A conversation's turns before
the last one go into the prompt (``prompts.format_chat``); the loss is on the last answer.
Records without ``image`` (instruction or conversation) are text-only examples, trained with
no visual prompt, as the official fine-tuning mixes text-only instruction data in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from ..errors import DataError, ImageError
from ..inputs.images import check_image_file
from ..inputs.prompts import caption_prompt, format_chat, format_prompt
from ..inputs.text import invalid_unicode_at
from .data import RecordError, read_records, string_field

IMAGE_TOKEN = "<image>"  # LLaVA marks where the image goes; here the image always enters through the adapter
_KINDS = ("caption", "instruction", "conversations")
_ROLES = ("human", "gpt")


@dataclass(frozen=True)
class ImageTextRecord:
    """A prompt, its response, and the image file (relative to the image root until resolved)."""

    prompt_text: str
    response_text: str
    image: Path | None

    def prompt(self) -> str:
        return self.prompt_text

    def response(self) -> str:
        return self.response_text


def image_text_record(obj: object) -> ImageTextRecord:
    """Validate one record: ``image`` plus exactly one of ``caption``, ``instruction``/``output``, ``conversations``."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object with 'image' and a caption, instruction or conversations, found {type(obj).__name__}")
    kinds = [k for k in _KINDS if k in obj]
    if len(kinds) != 1:
        found = " and ".join(repr(k) for k in kinds) if kinds else "none of them"
        raise RecordError(f"needs exactly one of 'caption', 'instruction' (with 'output') or 'conversations'; found {found}")
    image = _image_field(obj)
    if kinds[0] == "caption":
        if image is None:
            raise RecordError("a caption record needs an 'image'")
        return ImageTextRecord(caption_prompt(), string_field(obj, "caption", required=True), image)
    if kinds[0] == "instruction":
        instruction, output = string_field(obj, "instruction", required=True), string_field(obj, "output", required=True)
        # As the official V2 data: a record's input goes to format_prompt as it is, even empty; none without the key.
        given = string_field(obj, "input", required=False) if "input" in obj else None
        return ImageTextRecord(format_prompt(instruction, given), output, image)
    prompt, response = conversation_prompt(obj["conversations"])
    return ImageTextRecord(prompt, response, image)


def _image_field(obj: dict) -> Path | None:
    if "image" not in obj:
        return None
    value = obj["image"]
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"field 'image' must be a non-empty path string, not {value!r}")
    if invalid_unicode_at(value) is not None:
        raise RecordError(f"field 'image' is not valid Unicode (it holds a lone surrogate): {value!r}")
    return Path(value)


def conversation_prompt(turns: object) -> tuple[str, str]:
    """(prompt, response) of a LLaVA conversation: alternating human/gpt turns, human first, gpt last.

    The ``<image>`` marker is removed; earlier exchanges go into the prompt as chat history.
    """
    if not isinstance(turns, list) or not turns:
        raise RecordError("'conversations' must be a non-empty list of {from, value} turns")
    texts = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(f"conversation turn {i} must be an object with 'from' and a string 'value'")
        expected = _ROLES[i % 2]
        if turn.get("from") != expected:
            raise RecordError(f"conversation turn {i} is from {turn.get('from')!r}, expected {expected!r} (turns alternate, human first)")
        if (at := invalid_unicode_at(turn["value"])) is not None:
            raise RecordError(f"conversation turn {i} is not valid Unicode: character {at + 1} is a lone surrogate")
        text = turn["value"].replace(IMAGE_TOKEN, "").strip()
        if not text:
            raise RecordError(f"conversation turn {i} is empty")
        texts.append(text)
    if len(texts) % 2:
        raise RecordError("the conversation must end with a 'gpt' turn (the response to learn)")
    pairs = list(zip(texts[0::2], texts[1::2], strict=True))
    *history, (message, answer) = pairs
    return format_chat(history, message), answer


def read_image_text_records(path: str | Path, image_root: str | Path) -> list[ImageTextRecord]:
    """Validated records with their images resolved under ``image_root``; every image file is opened (header only).

    All problems, malformed records and unusable images alike, are raised together as one DataError.
    """
    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"--image-root {root} is not a directory")
    return read_records(path, partial(_checked_record, root), what="bad record(s); fix or remove them and run again")


def _checked_record(root: Path, obj: object) -> ImageTextRecord:
    record = image_text_record(obj)
    if record.image is None:
        return record
    try:
        check_image_file(root / record.image)
    except ImageError as e:
        raise RecordError(f"image {str(record.image)!r}: {e}") from None
    return replace(record, image=root / record.image)
