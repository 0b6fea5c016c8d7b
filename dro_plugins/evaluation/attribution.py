"""Where a wrong answer failed: at retrieval, at selection or at generation.

Every validation question falls in exactly one class, tested in this order:

- ``correct``: the generated answer matches a gold answer (exact match after SQuAD normalisation, as EM);
- ``retrieval_miss``: no candidate holds an answer, so no selector could have helped (fix the retriever);
- ``selection_miss``: a candidate holds one, the k selected do not (fix the selector);
- ``generation_miss``: a selected passage holds one and the answer is still wrong (fix the generator).

A passage "holds an answer" by :func:`dro_plugins.data.labels.passage_has_answer`: the data's own label wins when the
file has one (NQ's ``has_answer``, MuSiQue's ``is_gold``); without one, a normalised answer string inside the
normalised passage text. With a pipeline the candidates are its retriever's output, labelled by the string match,
so ``retrieval_miss`` measures the pipeline's own retriever.
"""

from __future__ import annotations

from collections.abc import Sequence

from dro_plugins.data.examples import Example
from dro_plugins.evaluation.metrics import exact_match
from dro_plugins.data.labels import passage_has_answer

CLASSES = ("correct", "generation_miss", "selection_miss", "retrieval_miss")


def failure_class(example: Example, selected: Sequence[int], prediction: str) -> str:
    """One of :data:`CLASSES` for a question, its selected candidates (0-based indices) and the generated answer."""
    if exact_match(prediction, example.answers):
        return "correct"
    if any(passage_has_answer(example.candidates[i], example.answers) for i in selected):
        return "generation_miss"
    if any(passage_has_answer(p, example.answers) for p in example.candidates):
        return "selection_miss"
    return "retrieval_miss"


def fractions(classes: Sequence[str]) -> dict[str, float]:
    """Share of questions per class, every class present (they sum to 1 over a non-empty list)."""
    return {name: sum(c == name for c in classes) / max(len(classes), 1) for name in CLASSES}


def question_ids(predictions: Sequence[dict]) -> dict[str, list[str]]:
    """Question ids per class from evaluation predictions (each with ``id`` and ``failure``)."""
    return {name: [p["id"] for p in predictions if p["failure"] == name] for name in CLASSES}
