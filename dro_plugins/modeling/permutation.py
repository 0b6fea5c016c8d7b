"""The token grammar of a selector output such as ``[7] > [2] > [15]``, for constrained decoding.

A permutation ``z`` (k distinct candidate indices, 0-based) is the text of :func:`permutation_text`. Its tokens are
canonical: exactly ``tokenizer.encode(text)``, what the model itself would write. Byte-level BPE tokenizers write
``" > [2]"`` as ``' >' ' [' '2' ']'``, so a label's tokens depend on what precedes it; the grammar therefore has two
label tables, ``[i]`` for the first pick and ``" > [i]"`` (separator included) for every later pick, and checks at
construction that their concatenations are the tokenizer's own encodings. Decoding is constrained by a
:class:`DecodingState`: at each step only tokens that continue a label of an unused candidate are allowed. Sampling
and scoring replay the same states, so ``log p_S(z | x)`` is the log-probability of exactly the distribution that
was sampled (the E-step's importance weights, paper Eq. 7, assume it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SEPARATOR = " > "


def permutation_text(permutation: Sequence[int]) -> str:
    """The text of a permutation (0-based indices), as the selector writes it: ``[7] > [2] > [15]``."""
    return SEPARATOR.join(f"[{i + 1}]" for i in permutation)


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
        ValueError: the tokenizer makes one label's tokens a prefix of another's (decoding would be ambiguous), or
            writes a permutation differently from its label pieces (the grammar cannot be canonical); the message
            names the tokenizer and the label.
    """

    def __init__(self, tokenizer, num_candidates: int, top_k: int):
        if not 1 <= top_k <= num_candidates:
            raise ValueError(f"top_k must be in 1..{num_candidates}, got {top_k}")
        self.num_candidates = num_candidates
        self.top_k = top_k
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        self.first = [encode(f"[{i + 1}]") for i in range(num_candidates)]
        self.later = [encode(f"{SEPARATOR}[{i + 1}]") for i in range(num_candidates)]
        for table in (self.first, self.later):
            for i, a in enumerate(table):
                for j, b in enumerate(table):
                    if i != j and b[: len(a)] == a:
                        raise ValueError(f"tokenizer '{name}' makes label [{i + 1}] a prefix of [{j + 1}]; cannot decode")
        if top_k > 1:  # every label in both slots, next to another label, as the tokenizer writes it in context
            for i in range(num_candidates):
                other = (i + 1) % num_candidates
                for permutation in ([i, other], [other, i]):
                    if encode(permutation_text(permutation)) != tuple(self.encode(permutation)):
                        raise ValueError(
                            f"tokenizer '{name}' writes '{permutation_text(permutation)}' with tokens that differ from its "
                            f"label pieces, so the selector's grammar cannot be canonical for label [{i + 1}]"
                        )

    def labels(self, slot: int) -> list[tuple[int, ...]]:
        """Token ids of each candidate's label at ``slot`` (0 = the first pick)."""
        return self.first if slot == 0 else self.later

    @property
    def max_length(self) -> int:
        """Tokens of the longest permutation."""
        return max(map(len, self.first)) + (self.top_k - 1) * max(map(len, self.later))

    def encode(self, permutation: Sequence[int]) -> list[int]:
        """Output token ids of a permutation (0-based candidate indices): ``tokenizer.encode(permutation_text(z))``."""
        tokens: list[int] = []
        for slot, index in enumerate(permutation):
            tokens += self.labels(slot)[index]
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
    """Where a constrained decode stands: picks so far and the partial label being written."""

    def __init__(self, grammar: PermutationGrammar):
        self.grammar = grammar
        self.picked: list[int] = []
        self.prefix: tuple[int, ...] = ()

    @property
    def done(self) -> bool:
        return len(self.picked) == self.grammar.top_k

    def allowed(self) -> tuple[int, ...]:
        """Allowed next token ids, in a fixed order (empty when done)."""
        if self.done:
            return ()
        depth = len(self.prefix)
        nexts: dict[int, None] = {}
        for index, label in enumerate(self.grammar.labels(len(self.picked))):
            if index not in self.picked and label[:depth] == self.prefix:
                nexts[label[depth]] = None
        return tuple(nexts)

    def advance(self, token: int) -> None:
        """Take ``token`` (which must be allowed) and move to the next state."""
        self.prefix += (token,)
        for index, label in enumerate(self.grammar.labels(len(self.picked))):
            if label == self.prefix and index not in self.picked:
                self.picked.append(index)
                self.prefix = ()
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
