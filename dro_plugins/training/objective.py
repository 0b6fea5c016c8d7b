"""DRO's E-step weights, M-step losses and diagnostics, as pure functions on tensors.

Shapes: ``B`` questions, ``m`` sampled permutations per question. Equation numbers are those of
Shi et al., "Direct Retrieval-augmented Optimization", arXiv 2505.03075.
"""

from __future__ import annotations

import math

import torch


def importance_weights(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance weights of the E-step (Eq. 7 and 19).

    With z_i ~ p_S(z | x) as the proposal, the prior cancels and
    ``w_i = p_G(y | x, d_{z_i}) / sum_j p_G(y | x, d_{z_j})``, computed as a softmax over log-likelihoods.

    Args:
        log_likelihoods: ``[B, m]`` log p_G(y | x, d_{z_i}).

    Returns:
        ``[B, m]`` weights, detached, each row summing to 1.
    """
    return torch.softmax(log_likelihoods.detach().float(), dim=-1)


def uniform_weights(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """Every sample weighted ``1/m``: the unweighted ablation (what one-sample training amounts to)."""
    return torch.full_like(log_likelihoods.detach().float(), 1.0 / log_likelihoods.shape[-1])


def selector_loss(weights: torch.Tensor, selector_log_probs: torch.Tensor) -> torch.Tensor:
    """M-step selector loss ``L_S = -sum_i w_i log p_S(z_i | x)`` (Eq. 10), one per question.

    This is a cross-entropy towards the weighted sample distribution, so it is bounded below and safe to
    minimise for several steps on cached samples. (A policy-gradient baseline, ``w_i - 1/m``, keeps the
    expected gradient but makes the loss unbounded on a fixed sample set: the M-step then pushes every
    sampled permutation down at once, and the selector collapsed onto unsampled positions in our runs.)

    Losses stay per question so that the trainer can divide their sum by the optimizer step's question count:
    the update then does not depend on how the step was split into micro-batches (or processes).

    Args:
        weights: ``[B, m]`` importance weights (treated as constants; moved to the log-probs' device).
        selector_log_probs: ``[B, m]`` differentiable log p_S(z_i | x).

    Returns:
        ``[B]`` losses.
    """
    return -(weights.detach().to(selector_log_probs.device) * selector_log_probs).sum(-1)


def generator_loss(weights: torch.Tensor, generator_log_likelihoods: torch.Tensor) -> torch.Tensor:
    """M-step generator loss ``L_G = -sum_i w_i log p_G(y | x, d_{z_i})`` (Eq. 11), one per question.

    Args:
        weights: ``[B, m]`` importance weights (treated as constants; moved to the log-likelihoods' device).
        generator_log_likelihoods: ``[B, m]`` differentiable log p_G(y | x, d_{z_i}).

    Returns:
        ``[B]`` losses.
    """
    return -(weights.detach().to(generator_log_likelihoods.device) * generator_log_likelihoods).sum(-1)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size ``1 / sum_i w_i^2`` per question: 1 (one sample dominates) to m (uniform).

    Args:
        weights: ``[B, m]`` normalised weights.

    Returns:
        ``[B]``.
    """
    return 1.0 / (weights**2).sum(-1)


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_i w_i log w_i`` (nats) of each question's weights: 0 to log m.

    Returns:
        ``[B]``.
    """
    return -(weights * weights.clamp_min(1e-30).log()).sum(-1)


def evidence(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo estimate of log p(y | x) = ``log (1/m) sum_i p_G(y | x, d_{z_i})`` (the ELBO's target, Eq. 4).

    Args:
        log_likelihoods: ``[B, m]``.

    Returns:
        ``[B]`` in nats.
    """
    return torch.logsumexp(log_likelihoods.float(), dim=-1) - math.log(log_likelihoods.shape[-1])
