"""SQuAD-style answer metrics (exact match, token F1) and selection recall (recall@k), on answers normalised by
:func:`dro_plugins.data.labels.normalize_answer`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from dro_plugins.data.examples import Passage
from dro_plugins.data.labels import normalize_answer, passage_has_answer


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    guess, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(guess) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(guess), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 between normalised prediction and answer, maximised over the gold answers."""
    return max(_f1(prediction, a) for a in answers)


def selection_recall(selected: Sequence[Passage], answers: Sequence[str]) -> float:
    """1.0 if any selected passage contains an answer (recall@k for one question), else 0.0."""
    return float(any(passage_has_answer(p, answers) for p in selected))
