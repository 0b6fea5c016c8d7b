"""Supervised targets from relevance labels: the warm-up (paper §6.4) and the learning benchmark's upper bound."""

from __future__ import annotations

import random

from dro_plugins.data.examples import Example
from dro_plugins.data.labels import passage_has_answer


def positive_candidates(example: Example) -> list[int]:
    """Indices of the candidates labelled (or matched) as holding an answer."""
    return [i for i, p in enumerate(example.candidates) if passage_has_answer(p, example.answers)]


def supervised_permutation(example: Example, top_k: int, rng: random.Random) -> list[int] | None:
    """Warm-up target: the positive candidates first, then other candidates drawn at random; None without positives.

    The filler is random rather than first-stage order so that the warm-up teaches which passages help,
    not a preference for early positions.
    """
    positives = positive_candidates(example)
    if not positives:
        return None
    others = [i for i in range(len(example.candidates)) if i not in positives]
    return (positives + rng.sample(others, len(others)))[:top_k]
