"""Training data: reading and validating records, tokenising them, and length-grouped batches.

A dataset file is a JSON list or JSON Lines of records.  Every record is checked before any
compute and all problems are reported at once, each with its list index or line number.
Records become ``Example``s (token ids plus where the response starts); batches are formed
from examples of similar length so that almost no compute is spent on padding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ..errors import DataError
from ..inputs.chat_template import PromptFormat
from ..inputs.prompts import format_prompt
from ..inputs.text import invalid_unicode_at
from ..inputs.tokenizer import TextTokenizer

IGNORE_INDEX = -100  # target value that the loss skips (F.cross_entropy's default ignore_index)


class RecordError(ValueError):
    """One record is malformed (the reader adds where it is)."""


# ---------------------------------------------------------------- records


class TrainingRecord(Protocol):
    """What training needs of a record: the prompt, the response the loss is on, and its image (if any)."""

    @property
    def image(self) -> Path | None: ...

    def prompt(self) -> str: ...

    def response(self) -> str: ...


@dataclass(frozen=True)
class InstructionRecord:
    """An Alpaca record: the prompt is ``format_prompt(instruction, input)``, the response ``output``."""

    instruction: str
    output: str
    input: str = ""

    @property
    def image(self) -> None:
        return None

    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input or None)  # the V1 training code drops an empty input

    def response(self) -> str:
        return self.output


def string_field(obj: dict, name: str, required: bool) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise RecordError(f"missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, not {type(value).__name__}")
    if (at := invalid_unicode_at(value)) is not None:
        raise RecordError(f"field {name!r} is not valid Unicode: character {at + 1} is a lone surrogate; fix the text's encoding")
    return value


def instruction_record(obj: object) -> InstructionRecord:
    """Validate one Alpaca object: ``instruction`` and ``output`` strings, optional ``input`` string."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object with 'instruction' and 'output', found {type(obj).__name__}")
    if "image" in obj:
        raise RecordError("has an 'image': image-text data is trained with --image-root DIR and --phase pretrain|finetune")
    return InstructionRecord(
        instruction=string_field(obj, "instruction", required=True),
        output=string_field(obj, "output", required=True),
        input=string_field(obj, "input", required=False),
    )


def json_items(path: Path, text: str) -> list[tuple[str, object]]:
    """(where, parsed value) per record; JSON syntax errors raise DataError with line numbers."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return [(f"record {i}", item) for i, item in enumerate(items)]
    out: list[tuple[str, object]] = []
    bad: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: invalid JSON ({e.msg}, column {e.colno})")
    if bad:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            raise DataError(problem_report(path, bad)) from None
        kind = type(whole).__name__
        raise DataError(f"{path} holds one JSON {kind}; expected a JSON list of records or JSON Lines (one record per line)")
    return out


def problem_report(
    path: str | Path, problems: Sequence[str], what: str = "malformed record(s); fix or remove them and run again", limit: int = 20
) -> str:
    """One message listing every problem (the first ``limit``), headed by the file and what is wrong (and what to do)."""
    lines = [f"{path}: {len(problems)} {what}:"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def read_records(
    path: str | Path,
    parse: Callable[[object], object] = instruction_record,
    what: str = "malformed record(s); fix or remove them and run again",
) -> list:
    """All records of a JSON-list or JSONL file, each validated by ``parse``; raise one DataError for all problems.

    Records in a list are named by index (from 0), JSONL records by line number (from 1); ``what``
    names the problems in the report's first line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    records, problems = [], []
    for where, item in json_items(path, text):
        try:
            records.append(parse(item))
        except RecordError as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise DataError(problem_report(path, problems, what))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def split_records(records: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` of the records (at least one) is held out."""
    n_val = math.ceil(len(records) * fraction)
    if not 0 < n_val < len(records):
        raise DataError(f"--val-fraction {fraction} leaves no training or no validation records out of {len(records)}")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# ---------------------------------------------------------------- examples


@dataclass(frozen=True, eq=False)
class Example:
    """Token ids (BOS, prompt, response, EOS), the index of the first response token, and the image file if any."""

    ids: Tensor  # int64 [n]: a tensor, not a tuple of Python ints, to keep large datasets small in RAM
    response_start: int
    image: Path | None = None

    @property
    def input_len(self) -> int:
        """Positions fed to the model: every id but the last, which is only ever a target."""
        return len(self.ids) - 1

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.response_start


@dataclass
class Encoded:
    examples: list[Example]
    truncated: int  # examples cut to max_seq_len (they lose their end, EOS included)
    dropped: int  # examples whose prompt alone fills max_seq_len: nothing left to learn from

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


def encode_record(record: TrainingRecord, tokenizer: TextTokenizer, fmt: PromptFormat | None = None) -> Example:
    """Tokenise prompt + response as one text, as generation will see it, ending in EOS.

    With a prompt format (``fmt``, e.g. the base's chat template) an instruction record's texts come
    from it, and the reply ends with the template's own end-of-turn token (Llama 3's ``<|eot_id|>``)
    when the template writes one, instead of an added EOS.  The response starts after the longest
    prefix shared with the prompt tokenised alone, so a piece that merges across the boundary
    counts as response.
    """
    if fmt is not None and isinstance(record, InstructionRecord):
        prompt, full = fmt.training_texts(record.instruction, record.input, record.output)
    else:
        prompt = record.prompt()
        full = prompt + record.response()
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    ids = tokenizer.encode(full, bos=True, eos=False)
    if not ids or ids[-1] not in tokenizer.stop_ids:
        ids.append(tokenizer.eos_id)
    start = 0
    while start < min(len(prompt_ids), len(ids) - 1) and prompt_ids[start] == ids[start]:
        start += 1
    return Example(torch.tensor(ids, dtype=torch.long), start, record.image)


def encode_records(
    records: Sequence[TrainingRecord], tokenizer: TextTokenizer, max_seq_len: int, fmt: PromptFormat | None = None
) -> Encoded:
    examples, truncated, dropped = [], 0, 0
    for record in records:
        ex = encode_record(record, tokenizer, fmt)
        if len(ex.ids) > max_seq_len:
            truncated += 1
            if ex.response_start >= max_seq_len:
                dropped += 1
                continue
            ex = Example(ex.ids[:max_seq_len], ex.response_start, ex.image)
        examples.append(ex)
    return Encoded(examples, truncated, dropped)


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded inputs [B, T] and targets [B, T] (IGNORE_INDEX on prompt and padding), T = longest input."""
    width = max(e.input_len for e in examples)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        inputs[row, : e.input_len] = e.ids[:-1]
        # Position t predicts ids[t + 1]; only response tokens (and EOS) are targets.
        targets[row, e.response_start - 1 : e.input_len] = e.ids[e.response_start :]
    return inputs, targets


# ---------------------------------------------------------------- batches


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a global batch.  Batches are sorted by length, so striding gives every rank similar lengths."""
    return list(batch[rank::world_size])


@dataclass
class LengthGroupedBatches:
    """Deterministic, seeded batches of similar-length examples, the same on every rank.

    Each epoch shuffles all examples, cuts the shuffle into groups of ``group_batches``
    global batches, sorts each group by length and slices it into batches, then shuffles
    the batch order.  A global batch holds ``batch_size`` examples (per-rank batch x world
    size) and every rank takes its ``shard``.  Position in the data is (epoch, batch index),
    so a run resumes exactly from those two numbers.
    """

    lengths: Sequence[int]
    batch_size: int
    seed: int
    group_batches: int = 64

    def epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), group):
            members = sorted(order[start : start + group], key=lambda i: -self.lengths[i])
            batches += [members[j : j + self.batch_size] for j in range(0, len(members), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def padding_efficiency(batches: Sequence[Sequence[int]], lengths: Sequence[int], world_size: int = 1) -> float:
    """Real tokens / computed tokens when every rank pads its shard to the shard's longest example."""
    real = padded = 0
    for batch in batches:
        for rank in range(world_size):
            part = [lengths[i] for i in shard(batch, rank, world_size)]
            if part:
                real += sum(part)
                padded += len(part) * max(part)
    return real / padded if padded else 1.0
