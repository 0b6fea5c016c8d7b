"""The constrained-decoding grammar of selector outputs."""

import itertools

import pytest
import torch

from dro_plugins.modeling.permutation import DecodingState, PermutationGrammar


class CharTokenizer:
    """One token per character, so labels like [1] and [15] share a prefix and need several choices."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_encode_joins_labels_with_separator():
    grammar = PermutationGrammar(CharTokenizer(), 12, 2)
    assert "".join(map(chr, grammar.encode([11, 0]))) == "[12] > [1]"


def test_every_sequence_decodes_to_a_valid_permutation_and_probabilities_sum_to_one():
    torch.manual_seed(0)
    grammar = PermutationGrammar(CharTokenizer(), 12, 2)
    scores = torch.randn(200)  # a fixed random score per token id

    def log_prob(permutation):
        total = 0.0
        state = DecodingState(grammar)
        for token in grammar.encode(permutation):
            allowed = state.allowed()
            total += (scores[list(allowed)].log_softmax(0)[allowed.index(token)]).item()
            state.advance(token)
        assert state.done and state.picked == list(permutation)
        return total

    perms = list(itertools.permutations(range(12), 2))
    assert len(perms) == 132
    total = sum(torch.tensor(log_prob(p)).exp().item() for p in perms)
    assert total == pytest.approx(1.0, abs=1e-5)


def test_choices_skip_forced_steps_and_reject_invalid_permutations():
    grammar = PermutationGrammar(CharTokenizer(), 12, 2)
    # "[1] > [2]": after "[" choose among 1..9 digits; after "1" choose "]" or a second digit
    choices = grammar.choices([0, 1])
    assert all(len(c.allowed) > 1 for c in choices)
    assert [chr(c.allowed[c.chosen]) for c in choices] == ["1", "]", "2"]
    # the second pick cannot reuse [1]: after "[1" only the two-digit labels remain
    for bad in ([0, 0], [0], [0, 12]):
        with pytest.raises((ValueError, IndexError)):
            grammar.choices(bad)
