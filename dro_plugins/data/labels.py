"""Answer labels: SQuAD answer normalisation and whether a passage holds an answer.

Used by the data (supervision from labelled passages), the selectors' diagnostics and the metrics. Normalisation
follows the official SQuAD v1.1 evaluation script: lower-case, drop punctuation and the articles a/an/the, fold
whitespace.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

from dro_plugins.data.examples import Passage

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """NFKC-normalise, lower-case, remove punctuation and articles, and fold whitespace (SQuAD v1.1 plus NFKC).

    NFKC first (SQuAD's script does none): a decomposed "é" (NFD) and a composed one compare equal, and so do
    compatibility forms such as full-width digits.
    """
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def passage_has_answer(passage: Passage, answers: Sequence[str]) -> bool:
    """The passage's label when the data has one (``has_answer``/``is_gold``), else a normalised string match."""
    if passage.has_answer is not None:
        return passage.has_answer
    text = f" {normalize_answer(passage.text)} "
    return any(f" {normalize_answer(a)} " in text for a in answers if normalize_answer(a))
