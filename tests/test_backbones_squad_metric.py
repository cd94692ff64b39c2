"""The SQuAD exact-match and F1 metric against values worked out by hand from the official scripts' definitions."""

from __future__ import annotations

import pytest

from llama_adapter.backbones.squad_metric import exact_match, f1_score, normalize_answer, squad_scores


def test_normalisation_drops_case_punctuation_articles_and_extra_space() -> None:
    assert normalize_answer("  The Quick, brown-fox!  ") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # "the" only as a whole word
    assert normalize_answer("A.") == ""


def test_exact_match_after_normalisation() -> None:
    assert exact_match("the Eiffel Tower", "Eiffel tower.") == 1
    assert exact_match("Eiffel", "Eiffel Tower") == 0


@pytest.mark.parametrize("version_2", [False, True])
def test_f1_is_over_a_bag_of_tokens(version_2: bool) -> None:
    # pred {big, red, dog}, gold {red, dog, barked}: 2 shared, precision = recall = 2/3.
    assert f1_score("big red dog", "the red dog barked", version_2) == pytest.approx(2 / 3)
    # Repeats count once per occurrence on both sides: red min(2, 1) + blue min(1, 2) = 2 of 3.
    assert f1_score("red red blue", "red blue blue", version_2) == pytest.approx(2 / 3)
    # precision 1/1, recall 1/4: F1 = 2 * 0.25 / 1.25 = 0.4.
    assert f1_score("Paris", "in Paris, France today", version_2) == pytest.approx(0.4)
    assert f1_score("London", "Paris", version_2) == 0.0


def test_a_question_scores_its_best_gold_answer() -> None:
    golds = {"q": ["Denver Broncos", "The Denver Broncos", "Broncos"]}
    # "Denver" against "Denver Broncos": precision 1, recall 1/2 -> 2/3; against "Broncos": 0.
    assert squad_scores({"q": "Denver"}, golds, version_2=False) == {"exact": 0.0, "f1": pytest.approx(200 / 3), "total": 1.0}
    assert squad_scores({"q": "the broncos"}, golds, version_2=False)["exact"] == 100.0


def test_v2_unanswerable_questions_and_the_split_by_answerability() -> None:
    golds = {"has": ["the red dog barked"], "none1": [], "none2": []}
    preds = {"has": "big red dog", "none1": "", "none2": "a dog"}
    scores = squad_scores(preds, golds, version_2=True)
    # has: EM 0, F1 2/3; none1: "" == "" scores 1 and 1; none2: an answer where there is none scores 0 and 0.
    assert scores["exact"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 3)
    assert scores["HasAns_exact"] == 0.0 and scores["HasAns_f1"] == pytest.approx(200 / 3) and scores["HasAns_total"] == 1
    assert scores["NoAns_exact"] == 50.0 and scores["NoAns_f1"] == 50.0 and scores["NoAns_total"] == 2


def test_the_two_versions_differ_where_the_scripts_do() -> None:
    # A gold answer that normalises to nothing: v1.1 keeps it (EM 1 for "", but F1 0, no shared token);
    # v2.0 drops it, leaving the question unanswerable with "" as its gold answer (EM 1, F1 1).
    assert squad_scores({"q": ""}, {"q": ["The"]}, version_2=False) == {"exact": 100.0, "f1": 0.0, "total": 1.0}
    v2 = squad_scores({"q": ""}, {"q": ["The"]}, version_2=True)
    assert v2["exact"] == 100.0 and v2["f1"] == 100.0
    assert v2["HasAns_total"] == 1  # split on the raw answer list, as the v2.0 script does
    # v2.0: an empty prediction for an answerable question scores F1 0 (not a division by zero).
    assert f1_score("", "Paris", version_2=True) == 0.0


def test_missing_predictions_score_zero() -> None:
    scores = squad_scores({"a": "Paris"}, {"a": ["Paris"], "b": ["Rome"]}, version_2=False)
    assert scores == {"exact": 50.0, "f1": 50.0, "total": 2.0}
