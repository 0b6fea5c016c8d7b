"""The token grammar of a selector output such as ``[7] > [2] > [15]``, for constrained decoding.

A permutation ``z`` (k distinct candidate indices, 0-based) is written as the tokens of ``[i]`` for each
pick, joined by the tokens of `` > ``. Each piece is tokenized on its own, so the token sequence of a
permutation is fixed, whatever merges the tokenizer would make across pieces. Decoding is constrained by
a :class:`DecodingState`: at each step only tokens that continue a label of an unused candidate (or the
separator) are allowed. Sampling and scoring replay the same states, so ``log p_S(z | x)`` is the
log-probability of exactly the distribution that was sampled (DESIGN.md §1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SEPARATOR = " > "


@dataclass(frozen=True)
class Choice:
    """One decoding step where more than one token is allowed.

    Attributes:
        offset: position of the chosen token within the output tokens.
        allowed: the allowed token ids at that step.
        chosen: index into ``allowed`` of the token taken.
    """

    offset: int
    allowed: tuple[int, ...]
    chosen: int


class PermutationGrammar:
    """Token sequences of ranked selections of ``top_k`` out of ``num_candidates`` passages.

    Raises:
        ValueError: a label's tokens are a prefix of another label's, so decoding would be ambiguous.
    """

    def __init__(self, tokenizer, num_candidates: int, top_k: int):
        if not 1 <= top_k <= num_candidates:
            raise ValueError(f"top_k must be in 1..{num_candidates}, got {top_k}")
        self.num_candidates = num_candidates
        self.top_k = top_k
        self.labels = [tuple(tokenizer.encode(f"[{i + 1}]", add_special_tokens=False)) for i in range(num_candidates)]
        self.separator = tuple(tokenizer.encode(SEPARATOR, add_special_tokens=False))
        for i, a in enumerate(self.labels):
            for j, b in enumerate(self.labels):
                if i != j and b[: len(a)] == a:
                    raise ValueError(f"tokenizer makes label [{i + 1}] a prefix of [{j + 1}]; cannot decode")

    @property
    def max_length(self) -> int:
        """Tokens of the longest permutation: k of the longest labels and k - 1 separators."""
        return self.top_k * max(len(label) for label in self.labels) + (self.top_k - 1) * len(self.separator)

    def encode(self, permutation: Sequence[int]) -> list[int]:
        """Output token ids of a permutation (0-based candidate indices)."""
        tokens: list[int] = []
        for slot, index in enumerate(permutation):
            if slot:
                tokens += self.separator
            tokens += self.labels[index]
        return tokens

    def choices(self, permutation: Sequence[int]) -> list[Choice]:
        """The steps with more than one allowed token when decoding ``permutation``.

        Forced steps (one allowed token) have probability 1 under the constrained distribution and are left out.

        Raises:
            ValueError: the permutation is not valid (repeats, out of range, wrong length).
        """
        state = DecodingState(self)
        found: list[Choice] = []
        for offset, token in enumerate(self.encode(permutation)):
            allowed = state.allowed()
            if token not in allowed:
                raise ValueError(f"invalid permutation {list(permutation)} for {self.num_candidates} candidates")
            if len(allowed) > 1:
                found.append(Choice(offset, allowed, allowed.index(token)))
            state.advance(token)
        if not state.done or tuple(state.picked) != tuple(permutation):
            raise ValueError(f"invalid permutation {list(permutation)}: needs exactly {self.top_k} distinct picks")
        return found


class DecodingState:
    """Where a constrained decode stands: picks so far and the partial label or separator being written."""

    def __init__(self, grammar: PermutationGrammar):
        self.grammar = grammar
        self.picked: list[int] = []
        self.prefix: tuple[int, ...] = ()
        self.in_separator = False

    @property
    def done(self) -> bool:
        return len(self.picked) == self.grammar.top_k

    def allowed(self) -> tuple[int, ...]:
        """Allowed next token ids, in a fixed order (empty when done)."""
        if self.done:
            return ()
        depth = len(self.prefix)
        if self.in_separator:
            return (self.grammar.separator[depth],)
        nexts: dict[int, None] = {}
        for index, label in enumerate(self.grammar.labels):
            if index not in self.picked and label[:depth] == self.prefix:
                nexts[label[depth]] = None
        return tuple(nexts)

    def advance(self, token: int) -> None:
        """Take ``token`` (which must be allowed) and move to the next state."""
        self.prefix += (token,)
        if self.in_separator:
            if self.prefix == self.grammar.separator:
                self.prefix, self.in_separator = (), False
            return
        for index, label in enumerate(self.grammar.labels):
            if label == self.prefix and index not in self.picked:
                self.picked.append(index)
                self.prefix = ()
                self.in_separator = not self.done and bool(self.grammar.separator)
                return


_LABEL = re.compile(r"\[\s*(\d+)\s*\]")


def parse_permutation(text: str, num_candidates: int, top_k: int) -> list[int] | None:
    """Read a ranked selection such as ``[7] > [2] > [15]`` from free text (unconstrained decoding).

    Labels are 1-based; out-of-range labels and repeats are skipped; the first ``top_k`` valid labels are kept.

    Returns:
        ``top_k`` distinct 0-based candidate indices, best first, or None when the text holds fewer than
        ``top_k`` valid labels (the output is unusable).
    """
    picked: list[int] = []
    for match in _LABEL.finditer(text):
        index = int(match.group(1)) - 1
        if 0 <= index < num_candidates and index not in picked:
            picked.append(index)
        if len(picked) == top_k:
            return picked
    return None
