"""What every evaluation task shares: the resumable predictions file, batched generation with a progress bar,
and the run settings that a resumed run must match.

A run writes into one output directory:

    run.json            what produced the predictions (task, data, model, generation settings)
    predictions.jsonl   one JSON object per example, with its "id"; appended batch by batch, so a
                        rerun of the same command skips what is done.  A complete run rewrites it
                        in the dataset's order, so a resumed run ends with the same file as an
                        uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

import llama_adapter
from llama_adapter.errors import LlamaAdapterError
from llama_adapter.train.data import problem_report as report


class EvalError(LlamaAdapterError, ValueError):
    """The benchmark files or the output directory cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class Example:
    """One prompt to complete, and its image for multimodal adapters."""

    id: str
    prompt: str
    image: Path | None = None


@dataclass(frozen=True)
class Generation:
    """Sampling settings; greedy (temperature 0) by default so that scores are reproducible."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 0.75
    seed: int | None = None


def read_json(path: Path, what: str) -> object:
    """A JSON file, or an EvalError saying where it is broken."""
    if not path.is_file():
        raise EvalError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def digest(*paths: Path) -> str:
    """sha256 of the files' bytes: predictions made from another version of a benchmark file are not reused."""
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_images(examples: Sequence[Example], what: str = "example") -> None:
    """Open every image's header before any generation; all missing or unreadable files in one error."""
    problems = []
    for ex in examples:
        if ex.image is None:
            continue
        try:
            llama_adapter.check_image_file(ex.image)
        except llama_adapter.ImageError as e:
            problems.append(f"{what} {ex.id}: {e}")
    if problems:
        raise EvalError(report("images", problems, "unusable image(s); fix the files or the image folder and run again"))


class PredictionFile:
    """``predictions.jsonl`` in an output directory, guarded by ``run.json``.

    ``settings`` describe what produces the predictions; a directory holding predictions made with
    other settings is refused rather than mixed.  Settings that cannot change a prediction (the
    batch size, the device) should be left out of them.
    """

    def __init__(self, out_dir: str | Path, settings: dict[str, object]) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / "predictions.jsonl"
        self.dir.mkdir(parents=True, exist_ok=True)
        run = self.dir / "run.json"
        if run.is_file() and self.path.is_file():
            before = read_json(run, "run settings")
            before = before if isinstance(before, dict) else {}
            changed = sorted(k for k in set(settings) | set(before) if before.get(k) != settings.get(k))
            if changed:
                raise EvalError(
                    f"{self.dir} holds predictions made with other settings (different {', '.join(changed)}); "
                    f"use another --out, or delete {self.path} to start over"
                )
        run.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.done: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines[-1]:  # a line cut short by a kill mid-write: drop it, its example runs again
            text = text[: len(text) - len(lines[-1])]
            self.path.write_text(text, encoding="utf-8")
        done = {}
        for n, line in enumerate(lines[:-1], start=1):
            try:
                record = json.loads(line)
                done[str(record["id"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalError(f"{self.path} line {n} is not a prediction record; delete the file to start over") from None
        return done

    def append(self, records: Sequence[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.done[str(r["id"])] = r

    def finish(self, order: Sequence[str]) -> list[dict]:
        """Rewrite the file in dataset ``order`` (atomically) and return its records in that order."""
        records = [self.done[i] for i in order]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path)
        return records


def batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    """Batches that ``Pipeline.generate`` can take: all with an image or all without, of similar length.

    Longest prompts first, so that a batch pads little and memory trouble shows at once.
    """
    for group in ([e for e in examples if e.image is not None], [e for e in examples if e.image is None]):
        group = sorted(group, key=lambda e: len(e.prompt), reverse=True)
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def generate_all(
    pipe: llama_adapter.Pipeline,
    examples: Sequence[Example],
    predictions: PredictionFile,
    generation: Generation,
    batch_size: int,
    record: Callable[[Example, str], dict],
    desc: str,
) -> int:
    """Complete every example not yet in ``predictions``, batch by batch; returns how many prompts were truncated.

    ``record(example, output)`` makes the line stored for an example (it must hold ``"id"``).
    """
    pending = [e for e in examples if e.id not in predictions.done]
    truncated = 0
    with tqdm(total=len(examples), initial=len(examples) - len(pending), unit="ex", desc=desc, dynamic_ncols=True) as bar:
        for batch in batches(pending, batch_size):
            images = [e.image for e in batch] if batch[0].image is not None else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", llama_adapter.PromptTruncatedWarning)
                try:
                    outputs = pipe.generate([e.prompt for e in batch], image=images, **asdict(generation))
                except llama_adapter.ImageError as e:
                    raise EvalError(f"while generating for {', '.join(x.id for x in batch)}: {e}") from None
            for w in caught:  # truncations are counted and reported once, in the summary; others pass through
                if issubclass(w.category, llama_adapter.PromptTruncatedWarning):
                    truncated += 1
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            predictions.append([record(e, out) for e, out in zip(batch, outputs, strict=True)])
            bar.update(len(batch))
    return truncated
