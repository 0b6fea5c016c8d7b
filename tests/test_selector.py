"""The LM selector: valid permutations, gradients that match the EM target (sampling against ``log_prob`` is in
tests/test_selector_contract.py, over every selector kind)."""

import itertools
import math

import torch

from dro_plugins.data.examples import Example, Passage
from dro_plugins.training.objective import importance_weights, selector_loss
from dro_plugins.selectors.lm import LMSelector


def toy_example(n: int) -> Example:
    words = ["red stone", "blue river", "green field", "small tower", "quiet road"]
    return Example("toy", "which one?", ("red",), tuple(Passage(str(i), "", words[i]) for i in range(n)))


def peaky_selector(tiny_lm, tokenizer, top_k, scale=40.0):
    """A random tiny selector whose output distribution is far from uniform (scaled LM head)."""
    model = tiny_lm(seed=3)
    with torch.no_grad():
        head = model.base_model.model.lm_head.modules_to_save["default"]
        head.weight.mul_(scale)
    return LMSelector(model, tokenizer, top_k=top_k, max_passage_words=10)


def test_samples_are_valid_permutations(tiny_lm, tokenizer):
    example = toy_example(5)
    selector = LMSelector(tiny_lm(), tokenizer, top_k=3, max_passage_words=10)
    draws = selector.sample([example, example], 64, 1.5, torch.Generator().manual_seed(1))
    assert draws.permutations.shape == (2, 64, 3)
    for p in draws.permutations.reshape(-1, 3).tolist():
        assert len(set(p)) == 3 and all(0 <= i < 5 for i in p)
    greedy = selector.select([example])
    assert len(greedy[0]) == 3 and len(set(greedy[0])) == 3


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def test_m_step_gradient_matches_exact_em_gradient(tiny_lm, tokenizer):
    """With many samples, grad of -sum_i w_i log p_S(z_i) -> -grad log sum_z p_S(z) p_G(y|z) (Eq. 10 vs Eq. 4).

    At a uniform selector this is also the issue's target: -grad of sum_z p_G(z) log p_S(z) / sum_z p_G(z).
    """
    example = toy_example(3)
    selector = peaky_selector(tiny_lm, tokenizer, top_k=2, scale=8.0)
    perms = list(itertools.permutations(range(3), 2))
    p_g = torch.tensor([0.9, 0.05, 0.3, 0.01, 0.2, 0.02])  # fixed generator likelihoods per permutation

    # exact: -log sum_z p_S(z) p_G(z), gradient by autograd
    selector.model.zero_grad()
    lp = selector.log_prob([example], torch.tensor(perms)[None])[0]
    (-(torch.logsumexp(lp + p_g.log(), 0))).backward()
    exact = _flat_grad(selector.model).clone()

    # Monte Carlo: the E-step's self-normalised weights on samples from the selector, then the M-step loss
    draws = selector.sample([example], 6000, 1.0, torch.Generator().manual_seed(0))
    index = {p: i for i, p in enumerate(perms)}
    sample_log_lik = p_g.log()[[index[tuple(p)] for p in draws.permutations[0].tolist()]][None]
    weights = importance_weights(sample_log_lik)
    # identical permutations share one log-prob, so score the 6 distinct ones and sum their weights
    merged = torch.zeros(len(perms)).index_add_(0, torch.tensor([index[tuple(p)] for p in draws.permutations[0].tolist()]), weights[0])
    selector.model.zero_grad()
    lp = selector.log_prob([example], torch.tensor(perms)[None])
    selector_loss(merged[None], lp).sum().backward()
    estimate = _flat_grad(selector.model)

    relative_error = ((estimate - exact).norm() / exact.norm()).item()
    assert relative_error < 0.1, relative_error
    cosine = torch.nn.functional.cosine_similarity(estimate, exact, dim=0).item()
    assert cosine > 0.99


def test_uniform_selector_gradient_matches_issue_formula():
    """At p_S uniform the posterior is p_G(z) / sum p_G: the M-step gradient is grad of the issue's target."""
    theta = torch.zeros(6, requires_grad=True)  # a tabular selector over 6 permutations
    p_g = torch.tensor([0.9, 0.05, 0.3, 0.01, 0.2, 0.02])
    target = (p_g * theta.log_softmax(0)).sum() / p_g.sum()
    (exact,) = torch.autograd.grad(target, theta)
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(theta.detach().softmax(0), 20000, replacement=True, generator=generator)
    weights = importance_weights(p_g.log()[samples][None])
    loss = selector_loss(weights, theta.log_softmax(0)[samples][None]).sum()
    (grad,) = torch.autograd.grad(-loss, theta)
    assert torch.allclose(grad, exact, atol=0.02)
    assert math.isclose(exact.sum().item(), 0.0, abs_tol=1e-6)
