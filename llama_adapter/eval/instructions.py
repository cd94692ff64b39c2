"""Instruction following: complete a list of instructions and write the outputs in AlpacaEval's format
(``[{"instruction", "output", "generator", ...}]``), for ``alpaca_eval`` or a human to judge.

The input is a JSON list or JSON Lines of objects with ``instruction`` (and optional ``input``), e.g. AlpacaEval's
``alpaca_eval.json``, or of plain strings, e.g. a list of the paper's questions.  Other fields (``dataset``,
a reference ``output``...) are carried over, except ``output`` and ``generator``, which become ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import llama_adapter
from llama_adapter.train.data import json_items

from .runner import EvalError, Example, report


@dataclass(frozen=True)
class Instruction:
    id: str  # its position in the file, from 0
    instruction: str
    input: str
    fields: dict  # the record as read (empty for plain strings)


def read_instructions(path: str | Path) -> list[Instruction]:
    """Every instruction in the file, validated; all bad records reported at once by index or line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"instruction file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    out, errors = [], []
    for i, (where, item) in enumerate(json_items(path, text)):
        if isinstance(item, str):
            item = {"instruction": item}
        if not isinstance(item, dict) or not isinstance(item.get("instruction"), str) or not item["instruction"].strip():
            errors.append(f"{where}: expected a non-empty string or an object with a non-empty 'instruction' string")
        elif not isinstance(item.get("input") or "", str):
            errors.append(f"{where}: 'input' must be a string")
        else:
            out.append(Instruction(str(i), item["instruction"], item.get("input") or "", item))
    if errors:
        raise EvalError(report(path, errors, "bad record(s)"))
    if not out:
        raise EvalError(f"{path} holds no instructions")
    return out


def examples(items: list[Instruction]) -> list[Example]:
    return [Example(it.id, llama_adapter.format_prompt(it.instruction, it.input or None)) for it in items]  # no empty Input: block


def prediction(item: Instruction, output: str) -> dict:
    return {"id": item.id, "output": output.strip()}


def alpaca_eval_outputs(items: list[Instruction], records: list[dict], generator: str) -> list[dict]:
    """AlpacaEval's model-outputs format: the original record with our ``output`` and ``generator``."""
    return [
        it.fields | {"instruction": it.instruction, "output": r["output"], "generator": generator}
        for it, r in zip(items, records, strict=True)
    ]


def summary(records: list[dict]) -> dict:
    """What can be said without a judge: how many outputs, how long, how many empty."""
    words = [len(r["output"].split()) for r in records]
    return {"count": len(records), "empty": sum(w == 0 for w in words), "mean_words": sum(words) / len(words)}
