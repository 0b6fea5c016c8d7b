"""SQuAD-style answer metrics (exact match, token F1) and selection recall.

Normalisation follows the official SQuAD v1.1 evaluation script: lower-case, drop punctuation and the
articles a/an/the, fold whitespace.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from dro_plugins.data import Passage

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation and articles, and fold whitespace (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


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


def passage_has_answer(passage: Passage, answers: Sequence[str]) -> bool:
    """The passage's label when the data has one (``has_answer``/``is_gold``), else a normalised string match."""
    if passage.has_answer is not None:
        return passage.has_answer
    text = f" {normalize_answer(passage.text)} "
    return any(f" {normalize_answer(a)} " in text for a in answers if normalize_answer(a))


def selection_recall(selected: Sequence[Passage], answers: Sequence[str]) -> float:
    """1.0 if any selected passage contains an answer (recall@k for one question), else 0.0."""
    return float(any(passage_has_answer(p, answers) for p in selected))
