"""Failure attribution: four questions built so that each class is known by hand."""

import pytest

from dro_plugins.evaluation.attribution import CLASSES, failure_class, fractions, question_ids
from dro_plugins.data.examples import Example, Passage


def _passage(i, text, has_answer=None):
    return Passage(id=f"p{i}", title=f"t{i}", text=text, has_answer=has_answer)


# candidates: 0 and 1 never hold "paris"; 2 holds it by text
WITH_ANSWER = (_passage(0, "rome is large"), _passage(1, "oslo is cold"), _passage(2, "the capital is Paris."))
WITHOUT = (_passage(0, "rome is large"), _passage(1, "oslo is cold"), _passage(2, "lima is far"))


@pytest.mark.parametrize(
    "candidates, selected, prediction, expected",
    [
        (WITH_ANSWER, [0, 1], "The Paris!", "correct"),  # EM after normalisation, whatever was selected
        (WITH_ANSWER, [2, 0], "rome", "generation_miss"),  # the answer was in front of the generator
        (WITH_ANSWER, [0, 1], "rome", "selection_miss"),  # it was among the candidates, not the selected
        (WITHOUT, [0, 1], "rome", "retrieval_miss"),  # no candidate had it
    ],
)
def test_each_class_by_hand(candidates, selected, prediction, expected):
    example = Example(id="q", question="capital of france?", answers=("Paris",), candidates=candidates)
    assert failure_class(example, selected, prediction) == expected


def test_the_data_label_wins_over_the_string_match():
    # labelled data: the label decides, even against the text (NQ's has_answer, MuSiQue's is_gold)
    labelled = (_passage(0, "mentions paris", has_answer=False), _passage(1, "no city here", has_answer=True))
    example = Example(id="q", question="capital of france?", answers=("Paris",), candidates=labelled)
    assert failure_class(example, [0], "rome") == "selection_miss"
    assert failure_class(example, [1], "rome") == "generation_miss"


def test_fractions_and_ids():
    predictions = [{"id": "a", "failure": "correct"}, {"id": "b", "failure": "retrieval_miss"}, {"id": "c", "failure": "correct"}]
    shares = fractions([p["failure"] for p in predictions])
    assert list(shares) == list(CLASSES) and sum(shares.values()) == pytest.approx(1.0)
    assert shares["correct"] == pytest.approx(2 / 3) and shares["selection_miss"] == 0.0
    assert question_ids(predictions) == {"correct": ["a", "c"], "generation_miss": [], "selection_miss": [], "retrieval_miss": ["b"]}
