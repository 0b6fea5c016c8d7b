"""E-step weights, M-step losses and diagnostics against hand-computed values."""

import math

import pytest
import torch

from dro_plugins.training.objective import effective_sample_size, evidence, generator_loss, importance_weights, selector_loss, uniform_weights, weight_entropy

# one question, m = 3 samples with p_G(y | x, d_z) = 0.5, 0.25, 0.25
LOG_LIK = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))


def test_importance_weights_are_normalised_likelihoods():
    # w_i = p_i / sum_j p_j = 0.5 / 1.0, 0.25 / 1.0, 0.25 / 1.0
    assert importance_weights(LOG_LIK)[0].tolist() == pytest.approx([0.5, 0.25, 0.25])
    # invariant to a shared offset: only ratios of likelihoods matter (Eq. 7)
    assert importance_weights(LOG_LIK - 1000.0)[0].tolist() == pytest.approx([0.5, 0.25, 0.25], abs=1e-4)


def test_importance_weights_are_constants():
    log_lik = LOG_LIK.clone().requires_grad_()
    assert not importance_weights(log_lik).requires_grad


def test_uniform_weights():
    assert uniform_weights(LOG_LIK)[0].tolist() == pytest.approx([1 / 3] * 3)


def test_losses_by_hand():
    weights = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    log_probs = torch.tensor([[-1.0, -2.0, -4.0], [-3.0, -5.0, -7.0]], requires_grad=True)
    # question 1: 0.5*1 + 0.25*2 + 0.25*4 = 2.0; question 2: 3.0 (one loss per question)
    loss = selector_loss(weights, log_probs)
    assert loss.tolist() == pytest.approx([2.0, 3.0])
    (loss.sum() / 2).backward()  # the trainer divides by the step's question count
    # d loss / d log_prob = -w / B
    assert log_probs.grad.flatten().tolist() == pytest.approx([-0.25, -0.125, -0.125, -0.5, 0.0, 0.0])
    assert generator_loss(weights, log_probs.detach()).tolist() == pytest.approx([2.0, 3.0])


def test_diagnostics_by_hand():
    weights = importance_weights(LOG_LIK)
    # ESS = 1 / (0.25 + 0.0625 + 0.0625) = 2.6667
    assert effective_sample_size(weights).item() == pytest.approx(1 / 0.375)
    # entropy = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.0397
    assert weight_entropy(weights).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    # evidence = log((0.5 + 0.25 + 0.25) / 3)
    assert evidence(LOG_LIK).item() == pytest.approx(math.log(1 / 3))
    assert effective_sample_size(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(1.0)
    assert weight_entropy(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(0.0)
