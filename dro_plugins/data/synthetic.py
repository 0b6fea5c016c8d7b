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


KEY_WORDS = (FILLERS[20:32], FILLERS[36:48], FILLERS[10:20])  # adjectives, places, verbs: a key is one of each
# Words like the values (colours, animals, foods, materials) that are not values: the corpus task's distractors.
LOOKALIKES = "violet crimson navy scarlet fox deer goat mouse plum mango lime olive tin brass wool linen clay wax".split()


def make_corpus_dataset(size: int, distractors: int = 12, seed: int = 0) -> tuple[list[Example], list[Passage]]:
    """Questions over one shared corpus (the corpus task of ``benchmarks/learning.py``): question i asks for the value
    stored under its key, three words such as "quiet river read"; its gold passage is the key and the value word,
    and ``distractors`` passages hold the same key with a look-alike word (``LOOKALIKES``: "crimson", "fox", not a
    value), so a retriever that matches the key ranks the gold passage among them by the word alone. With 12,
    all-MiniLM-L6-v2 puts the gold passage in its top 8 for about 60% of the questions, in its top 2 for about 22%.
    Every passage of every question is in the corpus, shuffled.

    Returns:
        ``(questions without candidates, corpus)``; ``size`` distinct keys (at most 12 x 12 x 10), reproducible
        from ``seed``; answers are one value word each.

    Raises:
        ValueError: more questions than keys.
    """
    keys = [(a, p, v) for a in KEY_WORDS[0] for p in KEY_WORDS[1] for v in KEY_WORDS[2]]
    if size > len(keys):
        raise ValueError(f"the corpus task has {len(keys)} keys, fewer than {size} questions")
    rng = random.Random(seed)
    questions, corpus = [], []
    for index, key in enumerate(rng.sample(keys, size)):
        value = rng.choice(VALUES)
        phrase = " ".join(key)
        corpus.append(Passage(id=f"q{index}-gold", title="", text=f"{phrase} {value}"))
        corpus += [Passage(id=f"q{index}-d{j}", title="", text=f"{phrase} {rng.choice(LOOKALIKES)}") for j in range(distractors)]
        questions.append(Example(id=f"q{index}", question=f"which value goes with {phrase}?", answers=(value,), candidates=()))
    rng.shuffle(corpus)
    return questions, corpus
