"""Synthetic retrieval tasks on which tiny models can learn selection, used by tests and benchmarks.

Value task (:func:`make_dataset`): each question has ``num_candidates`` passages in random order. Exactly one passage (the gold one) holds
the answer: a value word drawn fresh for every question. The other passages hold only filler words.
Nothing can be memorised, and the generator can answer only if the selector puts the gold passage in
the top-k, so with top-k of n candidates chance selection recall is k / n.

Entity task (:func:`make_entity_dataset`): each question asks for one attribute (color, animal, food,
material) of one person. The gold passage pairs that person with a value of that attribute; three
distractors pair the same person with values of the other attributes, and the rest pair other people
with values of the asked attribute. Matching the person alone, or the attribute alone, finds the gold
passage only by luck: the selector must match both.
"""

from __future__ import annotations

import random

from dro_plugins.data.examples import Example, Passage

VALUES = (
    "red blue green yellow purple orange black white brown pink silver golden "
    "lion tiger horse rabbit eagle snake wolf bear monkey dolphin shark whale "
    "apple banana cherry lemon grape melon peach pear onion carrot potato tomato "
    "copper iron steel glass stone marble silk cotton paper leather rubber plastic"
).split()

# VALUES in groups of 12, one group per attribute of the entity task.
ATTRIBUTES = {name: VALUES[12 * i : 12 * (i + 1)] for i, name in enumerate(("color", "animal", "food", "material"))}

PEOPLE = (
    "john mary paul peter james david sarah emma henry lucy alice frank grace simon ruth tom kate jack anne rose adam eric luke sam"
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


def make_entity_example(rng: random.Random, index: int, num_candidates: int) -> Example:
    """One entity question: "what is the <attribute> of <person>?" over two-word passages "<person> <value>".

    Raises:
        ValueError: fewer than 5 candidates (the gold passage, three same-person distractors and one other).
    """
    if num_candidates < 5:
        raise ValueError(f"the entity task needs at least 5 candidates, got {num_candidates}")
    person, attribute = rng.choice(PEOPLE), rng.choice(list(ATTRIBUTES))
    value = rng.choice(ATTRIBUTES[attribute])
    texts = [f"{person} {value}"]
    texts += [f"{person} {rng.choice(values)}" for name, values in ATTRIBUTES.items() if name != attribute]
    others = [p for p in PEOPLE if p != person]
    other_values = [v for v in ATTRIBUTES[attribute] if v != value]  # only the gold passage holds the answer
    texts += [f"{rng.choice(others)} {rng.choice(other_values)}" for _ in range(num_candidates - len(texts))]
    order = rng.sample(range(num_candidates), num_candidates)
    candidates = tuple(
        Passage(id=f"q{index}-p{i}", title="", text=texts[j], has_answer=j == 0) for i, j in enumerate(order)
    )
    return Example(id=f"q{index}", question=f"what is the {attribute} of {person}?", answers=(value,), candidates=candidates)


def make_entity_dataset(size: int, num_candidates: int = 8, seed: int = 0) -> list[Example]:
    """``size`` independent entity questions, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [make_entity_example(rng, i, num_candidates) for i in range(size)]
