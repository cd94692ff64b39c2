"""Exact match and F1 as the official SQuAD evaluation scripts (v1.1 and v2.0) define them.

Both normalise an answer the same way: lower case, punctuation removed, the articles a/an/the removed,
whitespace collapsed; F1 is over the normalised whitespace tokens (a bag: repeated tokens count), and a
question scores the maximum over its gold answers.  The scripts differ at the edges, and each is followed:

- v1.1: every gold answer counts, even one that normalises to nothing; F1 is 0 when no token is shared.
- v2.0: gold answers that normalise to nothing are dropped, and a question with none left is unanswerable,
  with the empty string as its only gold answer; F1 is 1 when both sides are empty, else 0 if either is.
  ``HasAns_*`` and ``NoAns_*`` split the scores by answerable and unanswerable questions.

Scores are percentages, as the scripts print them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, version_2: bool) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str], version_2: bool) -> list[str]:
    """The answers a prediction is compared with; [""] for a v2.0 question with no (non-empty) answer."""
    if not version_2:
        return list(answers)
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]], version_2: bool) -> dict[str, float]:
    """``exact`` and ``f1`` (and for v2.0 the HasAns/NoAns split) over the questions of ``golds``, by id.

    A question without a prediction scores 0, as in the official scripts.
    """
    if not golds:
        raise ValueError("no questions to score")
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_answer: dict[str, bool] = {}
    for qid, answers in golds.items():
        gold = gold_answers(answers, version_2)
        pred = predictions.get(qid)
        has_answer[qid] = bool(answers)  # the v2.0 script splits on the raw answer list
        if pred is None:
            exact[qid] = f1[qid] = 0.0
            continue
        exact[qid] = float(max(exact_match(pred, g) for g in gold))
        f1[qid] = max(f1_score(pred, g, version_2) for g in gold)

    def mean(values: dict[str, float], ids: list[str]) -> float:
        return 100.0 * sum(values[i] for i in ids) / len(ids)

    ids = list(golds)
    scores = {"exact": mean(exact, ids), "f1": mean(f1, ids), "total": float(len(ids))}
    if version_2:
        for name, want in (("HasAns", True), ("NoAns", False)):
            part = [i for i in ids if has_answer[i] == want]
            if part:
                scores |= {f"{name}_exact": mean(exact, part), f"{name}_f1": mean(f1, part), f"{name}_total": float(len(part))}
    return scores
