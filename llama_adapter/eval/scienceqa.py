"""ScienceQA (Lu et al., 2022) from its official release: prompts, answer parsing, the paper's accuracy table,
and the train split as image-instruction training records.

The release directory holds ``problems.json`` (problem id -> question, choices, answer index, hint, image
file name, subject, grade, split), ``pid_splits.json`` (split -> problem ids) and ``images/SPLIT/ID/image.png``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import llama_adapter

from .runner import EvalError, Example, read_json, report

SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
# The paper's columns, as the official evaluation (ScienceQA's get_scores) defines them.
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
REQUIRED = ("question", "choices", "answer", "hint", "image", "subject", "grade", "split")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    hint: str
    image: Path | None  # resolved under the image folder
    subject: str
    grade: int
    split: str

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    def categories(self) -> list[str]:
        """The paper's columns this problem counts in (besides Avg); TXT and IMG overlap, NO is neither."""
        cats = [SUBJECTS[self.subject]]
        if self.hint:
            cats.append("TXT")
        if self.image is not None:
            cats.append("IMG")
        if not self.hint and self.image is None:
            cats.append("NO")
        cats.append("G1-6" if self.grade <= 6 else "G7-12")
        return cats


def question_text(p: Problem) -> str:
    """Context, question and lettered options, as LLaVA and LLaMA-Adapter present ScienceQA (ScienceQA's CQM format)."""
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(p.choices))
    return f"Context: {p.hint.strip() or 'N/A'}\nQuestion: {p.question}\nOptions: {options}"


def prompt(p: Problem) -> str:
    return llama_adapter.format_prompt(question_text(p))


def answer_text(letter: str) -> str:
    """The response a ScienceQA adapter is trained to give (as LLaVA's ScienceQA data)."""
    return f"The answer is {letter}."


_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])")
# "(B) ...", "B." or "B" alone; not "A dog ...", where A is an article.
_LEADING = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.):,]|$))")


def parse_answer(text: str, choices: tuple[str, ...] | list[str]) -> int | None:
    """The chosen option's index, or None when the text names no option unambiguously.

    In order: "The answer is B" / "answer is (B)"; a leading "B." / "(B)" / "B"; the text of exactly
    one choice (the whole reply, else contained in it).  A letter past the last option is no answer.
    """
    n = len(choices)
    for pattern in (_ANSWER_IS, _LEADING):
        m = pattern.search(text.strip())
        if m:
            index = LETTERS.index(next(g for g in m.groups() if g))
            return index if index < n else None
    reply = text.strip().strip(".").strip().lower()
    exact = [i for i, c in enumerate(choices) if c.strip().lower() == reply]
    if len(exact) == 1:
        return exact[0]
    contained = [i for i, c in enumerate(choices) if c.strip() and re.search(rf"\b{re.escape(c.strip().lower())}\b", reply)]
    return contained[0] if len(contained) == 1 else None


# ---------------------------------------------------------------- reading the release


def _problem(pid: str, obj: object, image_root: Path) -> Problem:
    if not isinstance(obj, dict):
        raise EvalError(f"is a {type(obj).__name__}, not an object with {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise EvalError(f"lacks {', '.join(missing)} (expected keys: {', '.join(REQUIRED)})")
    choices = obj["choices"]
    if not isinstance(choices, list) or not choices:
        raise EvalError("has no choices: a multiple-choice problem needs at least two")
    if not all(isinstance(c, str) for c in choices) or len(choices) > len(LETTERS):
        raise EvalError(f"'choices' must be a list of at most {len(LETTERS)} strings")
    if len(choices) < 2:
        raise EvalError(f"has only one choice ({choices[0]!r}): a multiple-choice problem needs at least two")
    answer = obj["answer"]
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise EvalError(f"'answer' must be the index of a choice (0 to {len(choices) - 1}), not {answer!r}")
    if obj["subject"] not in SUBJECTS:
        raise EvalError(f"unknown subject {obj['subject']!r}; expected one of {', '.join(SUBJECTS)}")
    grade = re.fullmatch(r"grade(\d+)", str(obj["grade"]))
    if not grade or not 1 <= int(grade.group(1)) <= 12:
        raise EvalError(f"'grade' must be grade1 ... grade12, not {obj['grade']!r}")
    for key in ("question", "hint", "split"):
        if not isinstance(obj[key], str):
            raise EvalError(f"{key!r} must be a string, not {type(obj[key]).__name__}")
    image = obj["image"]
    if image is not None and (not isinstance(image, str) or not image):
        raise EvalError(f"'image' must be a file name or null, not {image!r}")
    return Problem(
        id=pid,
        question=obj["question"],
        choices=tuple(choices),
        answer=answer,
        hint=obj["hint"],  # as given: the official TXT column counts any non-empty hint
        image=image_root / obj["split"] / pid / image if image else None,
        subject=obj["subject"],
        grade=int(grade.group(1)),
        split=obj["split"],
    )


def read_problems(root: str | Path, split: str, image_root: str | Path | None = None) -> list[Problem]:
    """The problems of ``split`` (in pid_splits.json's order), every one validated; all problems reported at once."""
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root / "images"
    problems_path, splits_path = root / "problems.json", root / "pid_splits.json"
    problems = read_json(problems_path, "ScienceQA problems.json")
    splits = read_json(splits_path, "ScienceQA pid_splits.json")
    if not isinstance(problems, dict):
        raise EvalError(
            f"{problems_path} is a JSON {type(problems).__name__}; ScienceQA's problems.json maps problem ids to "
            f"objects with {', '.join(REQUIRED)}"
        )
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise EvalError(f"{splits_path}: expected an object mapping split names (train, val, test, ...) to lists of problem ids")
    if split not in splits:
        raise EvalError(f"{splits_path} has no split {split!r}; it has {', '.join(sorted(splits))}")
    out, errors = [], []
    for pid in map(str, splits[split]):
        if pid not in problems:
            errors.append(f"problem {pid}: listed in split {split!r} but missing from problems.json")
            continue
        try:
            out.append(_problem(pid, problems[pid], image_root))
        except EvalError as e:
            errors.append(f"problem {pid}: {e}")
    if errors:
        raise EvalError(report(problems_path, errors, "bad problem(s); fix them or use the official release files"))
    if not out:
        raise EvalError(f"{splits_path}: split {split!r} is empty")
    return out


def examples(problems: list[Problem], with_images: bool) -> list[Example]:
    """Prompts for generation; images only for multimodal adapters (a text-only model sees the text alone)."""
    return [Example(p.id, prompt(p), p.image if with_images else None) for p in problems]


def prediction(p: Problem, output: str) -> dict:
    pred = parse_answer(output, p.choices)
    return {"id": p.id, "output": output, "pred": None if pred is None else LETTERS[pred], "answer": p.letter}


# ---------------------------------------------------------------- scores


def scores(problems: list[Problem], preds: dict[str, int | None]) -> dict:
    """Accuracy (%) per paper column, as ScienceQA's official evaluation computes it: correct / problems in the
    column; Avg over all problems.  An unparsed answer (None) is wrong.  A column with no problem is None."""
    correct = dict.fromkeys(COLUMNS, 0)
    total = dict.fromkeys(COLUMNS, 0)
    for p in problems:
        hit = preds[p.id] == p.answer
        for col in (*p.categories(), "Avg"):
            total[col] += 1
            correct[col] += hit
    return {
        "accuracy": {c: (100.0 * correct[c] / total[c] if total[c] else None) for c in COLUMNS},
        "count": total,
        "correct": correct,
    }


def table(accuracy: dict[str, float | None], name: str) -> str:
    """The paper's layout: one row, the columns NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg."""
    cells = ["-" if accuracy[c] is None else f"{accuracy[c]:.2f}" for c in COLUMNS]
    return "\n".join([f"| Model | {' | '.join(COLUMNS)} |", "| --- |" + " ---: |" * len(COLUMNS), f"| {name} | {' | '.join(cells)} |"])


# ---------------------------------------------------------------- training records


def training_records(problems: list[Problem], image_root: Path) -> list[dict]:
    """Image-instruction records for ``python -m llama_adapter.train --image-root IMAGE_ROOT``: the same prompt
    as evaluation, the answer sentence as output; problems without an image are text-only records."""
    out = []
    for p in problems:
        record: dict[str, str] = {"id": p.id}
        if p.image is not None:
            record["image"] = p.image.relative_to(image_root).as_posix()
        record |= {"instruction": question_text(p), "output": answer_text(p.letter)}
        out.append(record)
    return out


def write_training_records(problems: list[Problem], image_root: Path, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = training_records(problems, image_root)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return len(records)
