"""A synthetic retrieval task on which tiny models can learn selection, used by tests and benchmarks.

Each question has ``num_candidates`` passages in random order. Exactly one passage (the gold one) holds
the answer: a value word drawn fresh for every question. The other passages hold only filler words.
Nothing can be memorised, and the generator can answer only if the selector puts the gold passage in
the top-k, so with top-k of n candidates chance selection recall is k / n.
"""

from __future__ import annotations

import random

from dro_plugins.data import Example, Passage

VALUES = (
    "red blue green yellow purple orange black white brown pink silver golden "
    "lion tiger horse rabbit eagle snake wolf bear monkey dolphin shark whale "
    "apple banana cherry lemon grape melon peach pear onion carrot potato tomato "
    "copper iron steel glass stone marble silk cotton paper leather rubber plastic"
).split()

FILLERS = (
    "often quite very rather almost always never perhaps maybe surely "
    "walk run sit stand open close read write speak listen think know "
    "small large early late quick slow happy calm loud quiet warm cold "
    "city river road house field forest garden bridge tower market street village"
).split()


def make_example(rng: random.Random, index: int, num_candidates: int, passage_words: int = 6) -> Example:
    """One question: ``num_candidates`` filler passages, one of which (at a random position) holds the value."""
    value = rng.choice(VALUES)
    gold = rng.randrange(num_candidates)
    candidates = []
    for i in range(num_candidates):
        words = [rng.choice(FILLERS) for _ in range(passage_words)]
        if i == gold:
            words[rng.randrange(passage_words)] = value
        candidates.append(Passage(id=f"q{index}-p{i}", title="", text=" ".join(words), has_answer=i == gold))
    return Example(id=f"q{index}", question="which value word is written in the passages?", answers=(value,), candidates=tuple(candidates))


def make_dataset(size: int, num_candidates: int = 8, seed: int = 0, passage_words: int = 6) -> list[Example]:
    """``size`` independent questions, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [make_example(rng, i, num_candidates, passage_words) for i in range(size)]
