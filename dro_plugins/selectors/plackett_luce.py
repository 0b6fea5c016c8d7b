"""The Plackett-Luce distribution over top-k lists of n scored candidates (Plackett, 1975; Luce, 1959).

A top-k list z = (z_1, ..., z_k) is built by picking, at each position j, one of the candidates not yet picked
with probability softmax over their scores:

    log p(z | s) = sum_{j=1..k} [ s_{z_j} - logsumexp_{l not in z_<j} s_l ]

Exact samples come from the Gumbel top-k trick: the k largest of ``s_i + g_i`` with i.i.d. standard Gumbel ``g_i``,
in decreasing order, are a draw of z (Kool, van Hoof and Welling, 2019, "Stochastic Beams and Where to Find Them",
§3). The greedy (most likely) list is the top-k by score. These are pure functions; the retriever selector
(:mod:`dro_plugins.selectors.retriever`) supplies the scores.
"""

from __future__ import annotations

import torch


def log_prob(scores: torch.Tensor, permutations: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """log p(z | s) of top-k lists under Plackett-Luce.

    Args:
        scores: ``[B, n]`` candidate scores (logits; the temperature already applied).
        permutations: ``[B, m, k]`` long, 0-based distinct candidate indices, best first.
        valid: ``[B, n]`` bool, False for padding candidates (questions with fewer than n); None = all valid.

    Returns:
        ``[B, m]`` log-probabilities in float32 (float64 for float64 scores), differentiable in ``scores``.
    """
    scores = scores if scores.dtype == torch.float64 else scores.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    batch, num_samples, top_k = permutations.shape
    expanded = scores[:, None, :].expand(batch, num_samples, -1)
    picked = expanded.gather(-1, permutations)  # [B, m, k]
    # still available before position j: not among z_<j; a cumulative mask, one row per position
    taken = torch.zeros(batch, num_samples, top_k, scores.shape[-1], dtype=torch.bool, device=scores.device)
    onehot = torch.nn.functional.one_hot(permutations, scores.shape[-1]).bool()  # [B, m, k, n]
    taken[:, :, 1:] = onehot[:, :, :-1].cumsum(2).bool()
    remaining = expanded[:, :, None, :].masked_fill(taken, float("-inf"))  # [B, m, k, n]
    return (picked - remaining.logsumexp(-1)).sum(-1)


def log_prob_over_corpus(scores: torch.Tensor, permutations: torch.Tensor, corpus_logsumexp: torch.Tensor) -> torch.Tensor:
    """log p(z | s) of top-k lists when each position normalises over a whole corpus, not only the pool:

        log p(z | s) = sum_{j=1..k} [ s_{z_j} - log( exp(L) - sum_{i<j} exp(s_{z_i}) ) ],   L = logsumexp_corpus s

    i.e. Plackett-Luce over the corpus, of which the pool's scores are a part. Exact for the corpus when ``L`` is its
    exact logsumexp (:func:`corpus_logsumexp`).

    Args:
        scores: ``[B, n]`` the pool's scores; permutations: ``[B, m, k]`` indices into the pool.
        corpus_logsumexp: ``[B]`` L, differentiable.

    Returns:
        ``[B, m]`` log-probabilities (float32, float64 for float64 scores).
    """
    scores = scores if scores.dtype == torch.float64 else scores.float()
    total = corpus_logsumexp.to(scores.dtype)[:, None, None]  # [B, 1, 1]
    batch, num_samples, _ = permutations.shape
    picked = scores[:, None, :].expand(batch, num_samples, -1).gather(-1, permutations)  # [B, m, k]
    share = (picked - total).exp()  # each picked passage's share of the corpus mass
    removed = torch.cat([torch.zeros_like(share[..., :1]), share[..., :-1].cumsum(-1)], -1)  # taken before position j
    return (picked - total - torch.log1p(-removed.clamp(max=1 - 1e-6))).sum(-1)


def corpus_logsumexp(queries: torch.Tensor, documents: torch.Tensor, temperature: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``L = logsumexp_i (q . d_i / tau)`` over a corpus, ``[B]``, differentiable in ``queries`` and ``temperature``.

    One matrix product per chunk of ``chunk`` documents; each chunk is recomputed in the backward pass
    (activation checkpointing), so memory is ``B x chunk`` scores at a time, not ``B x N``.

    Args:
        queries: ``[B, d]`` unit query embeddings; documents: ``[N, d]`` unit document embeddings (constants);
        temperature: tau, a scalar tensor.
    """
    from torch.utils.checkpoint import checkpoint

    def part(q, block, tau):
        return (q @ block.T / tau).logsumexp(-1)

    parts = [
        checkpoint(part, queries, documents[i : i + chunk], temperature, use_reentrant=False) if torch.is_grad_enabled()
        else part(queries, documents[i : i + chunk], temperature)
        for i in range(0, documents.shape[0], chunk)
    ]
    return torch.stack(parts, -1).logsumexp(-1)


def gumbel_top_k(scores: torch.Tensor, top_k: int, noise: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact Plackett-Luce samples: the top-k of ``scores + noise``, best first.

    Args:
        scores: ``[B, n]``; noise: ``[B, m, n]`` standard Gumbel; valid: ``[B, n]`` or None (as in :func:`log_prob`).

    Returns:
        ``[B, m, k]`` long candidate indices.
    """
    perturbed = scores.float()[:, None, :] + noise.to(scores.device)
    if valid is not None:
        perturbed = perturbed.masked_fill(~valid[:, None, :], float("-inf"))
    return perturbed.topk(top_k, dim=-1).indices


def greedy(scores: torch.Tensor, top_k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The most likely top-k list under Plackett-Luce: the candidates by decreasing score. ``[B, n]`` -> ``[B, k]``."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores.topk(top_k, dim=-1).indices
