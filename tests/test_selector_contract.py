"""The contract every selector kind keeps (:class:`dro_plugins.selectors.base.Selector`), run over the LM selector and the retriever selector:
samples are exact draws of the distribution ``log_prob`` computes, at any temperature, seeded per question."""

from __future__ import annotations

import itertools

import pytest
import torch

from dro_plugins.config import MINILM
from dro_plugins.data.examples import Example, Passage
from dro_plugins.modeling.loading import load_sentence_encoder
from dro_plugins.selectors.lm import LMSelector
from dro_plugins.selectors.retriever import BiEncoderScorer, RetrieverSelector

WORDS = ["red stone", "blue river", "green field", "small tower", "quiet road"]


def question(qid: str, n: int) -> Example:
    return Example(qid, "which one is red?", ("red",), tuple(Passage(str(i), "", WORDS[i]) for i in range(n)))


@pytest.fixture(params=["lm", "retriever"])
def selector(request, tiny_lm, tokenizer):
    """A selector of each kind whose distribution over top-2 lists is far from uniform."""
    if request.param == "lm":
        model = tiny_lm(seed=3)
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(40.0)
        return LMSelector(model, tokenizer, top_k=2, max_passage_words=10)
    encoder = load_sentence_encoder(MINILM, "selector.model", "cpu", 32)
    documents = load_sentence_encoder(MINILM, "selector.document_model", "cpu", 32)
    return RetrieverSelector(BiEncoderScorer(encoder, 0.1), documents, top_k=2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_frequencies_match_log_prob(selector, temperature):
    example = question("q", 4)
    perms = list(itertools.permutations(range(4), 2))
    with torch.no_grad():
        exact = selector.log_prob([example], torch.tensor(perms)[None], temperature)[0].exp()
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-4)  # a distribution over the 12 top-2 lists
    assert exact.max().item() > 2 / len(perms)  # far from uniform, so the test can tell samplers apart
    draws = selector.sample([example], 4000, temperature, torch.Generator().manual_seed(0))
    counts = torch.zeros(len(perms))
    for p in draws.permutations[0].tolist():
        counts[perms.index(tuple(p))] += 1
    assert 0.5 * (counts / counts.sum() - exact).abs().sum().item() < 0.04  # total variation
    with torch.no_grad():  # the log-prob reported at sampling time is the one log_prob computes
        rescored = selector.log_prob([example], draws.permutations[:, :50], temperature)
    assert torch.allclose(rescored, draws.log_probs[:, :50], atol=1e-4)


def test_draws_are_valid_and_seeded_per_question(selector):
    batch = [question("a", 5), question("b", 3)]
    draws = selector.sample(batch, 32, 1.5, 11)
    assert draws.permutations.shape == (2, 32, 2)
    for row, example in zip(draws.permutations.tolist(), batch):
        assert all(len(set(p)) == 2 and all(0 <= i < len(example.candidates) for i in p) for p in row)
    alone = selector.sample(batch[1:], 32, 1.5, 11)
    assert torch.equal(alone.permutations[0], draws.permutations[1])
    picked = selector.select(batch)
    assert [len(set(p)) for p in picked] == [2, 2]
    assert selector.candidates(batch) == batch  # no index: the pool the questions came with
