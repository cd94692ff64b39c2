"""SQuAD-format questions: reading and checking, windows over long contexts, and answer-span decoding.

The file is the official layout, ``{"version": ..., "data": [{"paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible"?}]}]}]}``.  Every question is checked
before any model is loaded, and all problems are reported at once, by file and record path
(``train.json: data[0].paragraphs[3].qas[1] (id '57..')``): a missing field, an answer whose span is not the
context's text at ``answer_start``, an answerable question without answers, a duplicate id.  A file is v2.0
(unanswerable questions allowed) when it says ``"version": "v2.0"`` or has an ``is_impossible`` question.

Tokenisation follows transformers' ``run_qa``: question then context, the context cut into windows of
``max_seq_len`` tokens overlapping by ``doc_stride``; a window without the answer is labelled with the CLS
position, as unanswerable questions are.  Decoding takes the best-scoring span (start logit + end logit) of
at most ``max_answer_len`` tokens, inside the context, over all of a question's windows; for v2.0 the
answer is empty when the CLS ("no answer") score beats it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import DataError

N_BEST = 20  # candidate starts and ends per window, as run_qa
CLS = 0  # every window starts with the CLS token: the "no answer" position
SHOWN_PROBLEMS = 30


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # (text, character start)
    impossible: bool
    where: str


def read_squad(path: str | Path) -> tuple[list[Question], bool]:
    """The file's questions and whether it is SQuAD v2.0; a DataError listing every problem otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f'{path}: expected the SQuAD layout, a JSON object with a "data" list of articles')
    problems: list[str] = []
    questions: list[Question] = []
    seen: dict[str, str] = {}
    name = path.name
    for i, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            problems.append(f'{name}: data[{i}]: expected an object with a "paragraphs" list')
            continue
        for j, para in enumerate(paragraphs):
            here = f"{name}: data[{i}].paragraphs[{j}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not isinstance(para.get("qas"), list):
                problems.append(f'{here}: expected an object with a "context" string and a "qas" list')
                continue
            for k, qa in enumerate(para["qas"]):
                q, issues = _question(qa, para["context"], f"{here}.qas[{k}]")
                problems += issues
                if q is None:
                    continue
                if q.qid in seen:
                    problems.append(f"{q.where}: duplicate id (also {seen[q.qid]})")
                seen[q.qid] = q.where
                questions.append(q)
    if not questions and not problems:
        problems.append(f"{path}: no questions")
    if problems:
        more = len(problems) - SHOWN_PROBLEMS
        raise DataError(problems[:SHOWN_PROBLEMS] + ([f"... and {more} more"] if more > 0 else []))
    version_2 = str(doc.get("version", "")).startswith("v2") or any(q.impossible for q in questions)
    return questions, version_2


def _question(qa: object, context: str, where: str) -> tuple[Question | None, list[str]]:
    if not isinstance(qa, dict):
        return None, [f"{where}: expected a JSON object"]
    qid = qa.get("id")
    if not isinstance(qid, str) or not qid:
        return None, [f"{where}: missing string field 'id'"]
    where = f"{where} (id {qid!r})"
    problems = []
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        problems.append(f"{where}: missing or empty 'question'")
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        problems.append(f"{where}: 'is_impossible' must be true or false")
    answers: list[tuple[str, int]] = []
    raw = qa.get("answers", [])
    if not isinstance(raw, list):
        return None, [*problems, f"{where}: 'answers' must be a list"]
    for n, a in enumerate(raw):
        text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
        if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool) or start < 0:
            problems.append(f"{where}: answers[{n}] needs a non-empty 'text' and an 'answer_start' >= 0")
            continue
        found = context[start : start + len(text)]
        if found != text:
            problems.append(f"{where}: answer {text!r} at character {start} is not in the context (the context there reads {found!r})")
            continue
        answers.append((text, start))
    if impossible is True and raw:
        problems.append(f'{where}: marked is_impossible but has answers; unanswerable questions have "answers": []')
    if impossible is False and not raw:
        problems.append(f'{where}: no answers; mark unanswerable questions "is_impossible": true (SQuAD v2.0)')
    if problems:
        return None, problems
    return Question(qid, question.strip(), context, tuple(answers), impossible, where), []


@dataclass
class Windows:
    """Tokenised (question, context window) pairs; ``question`` maps each to its index in the question list."""

    input_ids: list[list[int]] = field(default_factory=list)
    question: list[int] = field(default_factory=list)
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)  # character span of context tokens
    start: list[int] = field(default_factory=list)  # training labels (token positions; CLS when no answer)
    end: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(questions: list[Question], tokenizer, max_seq_len: int, doc_stride: int) -> Windows:
    """All windows of all questions, labelled with the first answer's tokens (CLS where it is not inside)."""
    too_long = [q for q, n in zip(questions, _question_lengths(questions, tokenizer), strict=True) if n > max_seq_len // 2]
    if too_long:
        raise DataError([f"{q.where}: the question is longer than half of --max-seq-len {max_seq_len}; shorten it or raise "
                         "--max-seq-len" for q in too_long[:SHOWN_PROBLEMS]])  # fmt: skip
    enc = tokenizer([q.question for q in questions], [q.context for q in questions], truncation="only_second",
                    max_length=max_seq_len, stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)  # fmt: skip
    out = Windows()
    for w, ids in enumerate(enc["input_ids"]):
        q = questions[enc["overflow_to_sample_mapping"][w]]
        seq = enc.sequence_ids(w)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], seq, strict=True)]
        if ids[0] != tokenizer.cls_token_id:
            raise DataError(f"the tokenizer does not start its pairs with its CLS token {tokenizer.cls_token!r}; use RoBERTa's or BERT's")
        start = end = CLS
        if q.answers and not q.impossible:
            text, char_start = q.answers[0]
            start, end = _answer_tokens(offsets, char_start, char_start + len(text))
        out.input_ids.append(ids)
        out.question.append(enc["overflow_to_sample_mapping"][w])
        out.offsets.append(offsets)
        out.start.append(start)
        out.end.append(end)
    return out


def _question_lengths(questions: list[Question], tokenizer) -> list[int]:
    return [len(ids) for ids in tokenizer([q.question for q in questions], add_special_tokens=False)["input_ids"]]


def _answer_tokens(offsets: list[tuple[int, int] | None], char_start: int, char_end: int) -> tuple[int, int]:
    """The first and last context tokens covering [char_start, char_end), or (CLS, CLS) if the window misses it."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    first, last = context[0], context[-1]
    if offsets[first][0] > char_start or offsets[last][1] < char_end:  # type: ignore[index]
        return CLS, CLS
    start = next(i for i in context if offsets[i][1] > char_start)  # type: ignore[index]
    end = next(i for i in reversed(context) if offsets[i][0] < char_end)  # type: ignore[index]
    return start, end


def collate(windows: Windows, indices: list[int], pad_id: int) -> dict[str, Tensor]:
    """A right-padded batch of windows, as long as its longest."""
    width = max(len(windows.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(windows.input_ids[i])
        ids[row, :n] = torch.tensor(windows.input_ids[i])
        mask[row, :n] = 1
    start = torch.tensor([windows.start[i] for i in indices])
    end = torch.tensor([windows.end[i] for i in indices])
    return {"input_ids": ids, "attention_mask": mask, "start": start, "end": end}


def best_answer(question: Question, windows: Windows, logits: dict[int, tuple[Tensor, Tensor]], max_answer_len: int,
                version_2: bool) -> str:  # fmt: skip
    """The answer text for ``question`` from the start/end logits of its windows (window index -> 1-D tensors)."""
    best_score, best_text = -float("inf"), ""
    null_score = float("inf")
    for w, (start_logits, end_logits) in logits.items():
        offsets = windows.offsets[w]
        null_score = min(null_score, (start_logits[CLS] + end_logits[CLS]).item())
        starts = torch.topk(start_logits, min(N_BEST, len(start_logits))).indices.tolist()
        ends = torch.topk(end_logits, min(N_BEST, len(end_logits))).indices.tolist()
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = (start_logits[s] + end_logits[e]).item()
                if score > best_score:
                    best_score = score
                    best_text = question.context[offsets[s][0] : offsets[e][1]]  # type: ignore[index]
    if version_2 and null_score > best_score:
        return ""
    return best_text
