"""Shared-prefix packing: the packed row scores every continuation exactly as scoring it alone would."""

import itertools

import pytest
import torch

from dro_plugins.data.examples import Example, Passage
from dro_plugins.modeling.packing import decode_step_mask, pack_shared_prefix, shared_prefix_allowed
from dro_plugins.selectors.lm import LMSelector


def test_mask_pattern_by_hand():
    # prompt of 2 tokens, blocks of 2 and 1 tokens: rows are queries, columns keys
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # block 1 sees the prompt and itself
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1],  # block 2 sees the prompt and itself, not block 1
        ],
        dtype=torch.bool,
    )
    assert torch.equal(shared_prefix_allowed(2, [2, 1]), expected)


def test_left_padding_positions_and_columns():
    packed = pack_shared_prefix([[5, 6, 7], [8]], [[[1, 2], [3]], [[4]]], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 1, 2, 3], [0, 0, 0, 0, 8, 4]]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]  # each block restarts at the prompt length
    assert packed.position_ids[1, 4:].tolist() == [0, 1]
    assert packed.keep == 4  # row 0: 3 block tokens + the prompt's last position
    # token 0 of a continuation is predicted at the prompt's last token, token o at the block's token o - 1
    assert packed.predicting_column(0, 1, 0) == 2 - (6 - 4)
    assert packed.predicting_column(0, 0, 2) == 4 - (6 - 4)
    assert packed.allowed[1, 0].tolist() == [True, False, False, False, False, False]  # padding sees itself only


def test_decode_step_mask():
    prompt = torch.tensor([[0, 1, 1]])
    mask = decode_step_mask(prompt, num_samples=2, step=1)[0].int().tolist()
    # prompt columns, then step 0 (samples 0, 1), then step 1 (samples 0, 1)
    assert mask == [[0, 1, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0, 1]]


def _questions():
    words = ["red stone", "blue river", "green field", "small tower", "quiet road", "old mill"]
    return [
        Example("a", "which one?", ("red",), tuple(Passage(str(i), "", words[i]) for i in range(4))),
        Example("b", "which passage names the colour of the sky today?", ("blue",), tuple(Passage(str(i), "t", w) for i, w in enumerate(words))),
        Example("c", "where?", ("mill",), tuple(Passage(str(i), "", w + " " + w) for i, w in enumerate(words[:5]))),
    ]


def _separate_log_prob(selector, example, permutation, temperature=1.0):
    """Reference: one plain causal forward over prompt + output, constrained log-softmax at each choice."""
    grammar = selector.grammar(len(example.candidates), len(permutation))
    prompt = selector.prompt_ids(example, len(permutation))
    output = grammar.encode(permutation)
    logits = selector.model(input_ids=torch.tensor([prompt + output]), use_cache=False).logits[0].float()
    total = torch.zeros(())
    for choice in grammar.choices(permutation):
        scores = logits[len(prompt) - 1 + choice.offset, list(choice.allowed)]
        total = total + (scores / temperature).log_softmax(-1)[choice.chosen]
    return total


@pytest.mark.parametrize("num_samples", [1, 3])
def test_packed_log_prob_equals_separate_scoring_values_and_gradients(tiny_lm, tokenizer, num_samples):
    selector = LMSelector(tiny_lm(seed=4), tokenizer, top_k=2, max_passage_words=10)
    questions = _questions()
    generator = torch.Generator().manual_seed(num_samples)
    permutations = torch.stack(
        [torch.stack([torch.randperm(len(q.candidates), generator=generator)[:2] for _ in range(num_samples)]) for q in questions]
    )
    weights = torch.rand(len(questions), num_samples, generator=generator)

    packed = selector.log_prob(questions, permutations, temperature=1.5)
    (weights * packed).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in selector.model.named_parameters() if p.grad is not None}
    selector.model.zero_grad()

    separate = torch.stack(
        [
            torch.stack([_separate_log_prob(selector, q, perm, 1.5) for perm in permutations[b].tolist()])
            for b, q in enumerate(questions)
        ]
    )
    (weights * separate).sum().backward()
    assert torch.allclose(packed, separate, atol=1e-5), (packed - separate).abs().max()
    assert packed_grads
    for name, param in selector.model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(packed_grads[name], param.grad, atol=1e-5, rtol=1e-4), name


def test_shared_prompt_sampling_matches_separate_scoring(tiny_lm, tokenizer):
    """Samples decoded from one shared prompt cache report the log-probs a plain forward gives them."""
    selector = LMSelector(tiny_lm(seed=2), tokenizer, top_k=3, max_passage_words=10)
    questions = _questions()
    drawn = selector.sample(questions, 5, temperature=1.0, rng=7)
    with torch.no_grad():
        for b, q in enumerate(questions):
            for i, perm in enumerate(drawn.permutations[b].tolist()):
                assert drawn.log_probs[b, i].item() == pytest.approx(_separate_log_prob(selector, q, perm).item(), abs=1e-5)


def test_samples_do_not_depend_on_the_other_questions_in_the_batch(tiny_lm, tokenizer):
    selector = LMSelector(tiny_lm(seed=2), tokenizer, top_k=2, max_passage_words=10)
    questions = _questions()
    together = selector.sample(questions, 6, 1.0, rng=11)
    for b, q in enumerate(questions):
        alone = selector.sample([q], 6, 1.0, rng=11)
        assert torch.equal(alone.permutations[0], together.permutations[b])
        assert torch.allclose(alone.log_probs[0], together.log_probs[b], atol=1e-5)
    # more samples than fit one row: the rows continue the same per-question stream of draws
    many = selector.sample(questions[:1], 70, 1.0, rng=11)
    assert torch.equal(many.permutations[0, :6], together.permutations[0])
    assert len({tuple(p) for p in many.permutations[0].tolist()}) <= len(list(itertools.permutations(range(4), 2)))
