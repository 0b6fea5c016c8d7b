"""The generative list-wise selector p_S(z | x) (paper §4): a causal LM that writes ``[7] > [2] > [15]``.

Decoding is constrained by :mod:`dro_plugins.permutation`, so every sample is a valid permutation by
construction, and :meth:`LMSelector.log_prob` scores with the same masks and temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from dro_plugins.data import Example
from dro_plugins.lm import continuation_hidden, extend, greedy_generate, run_shared_prompt, token_logits
from dro_plugins.permutation import DecodingState, PermutationGrammar
from dro_plugins.prompts import render, selector_prompt


@dataclass
class SampleBatch:
    """Permutations drawn in an E-step.

    Attributes:
        permutations: ``[B, m, k]`` long, 0-based candidate indices, best first.
        log_probs: ``[B, m]`` log-probability of each permutation under the sampling distribution
            (the selector at the sampling temperature, constrained).
    """

    permutations: torch.Tensor
    log_probs: torch.Tensor


def _masked_log_softmax(scores: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax over the valid entries of the last dim; invalid entries get -inf."""
    return (scores / temperature).masked_fill(~valid, float("-inf")).log_softmax(-1)


class LMSelector:
    """A causal-LM selector with constrained decoding of top-k permutations.

    Args:
        model: a (peft-wrapped) causal LM.
        tokenizer: its tokenizer.
        top_k: how many candidates a permutation picks (k).
        max_passage_words: passages are cut to this many words in the prompt.
    """

    def __init__(self, model, tokenizer, top_k: int, max_passage_words: int):
        self.model = model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.max_passage_words = max_passage_words

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @lru_cache(maxsize=64)
    def grammar(self, num_candidates: int, top_k: int) -> PermutationGrammar:
        return PermutationGrammar(self.tokenizer, num_candidates, top_k)

    def prompt_ids(self, example: Example, top_k: int) -> list[int]:
        """Token ids of the selector prompt for one question (chat template applied when present)."""
        text = render(self.tokenizer, selector_prompt(example.question, example.candidates, top_k, self.max_passage_words))
        return self.tokenizer.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def _decode(self, batch: Sequence[Example], num_samples: int, top_k: int, temperature: float, rng: torch.Generator | None):
        """Constrained decoding of ``num_samples`` permutations per question; greedy when ``rng`` is None."""
        was_training = self.model.training
        self.model.eval()
        states = [DecodingState(self.grammar(len(ex.candidates), top_k)) for ex in batch for _ in range(num_samples)]
        pad = self.tokenizer.pad_token_id
        shared = run_shared_prompt(self.model, [self.prompt_ids(ex, top_k) for ex in batch], num_samples, pad, self.device)
        log_probs = torch.zeros(len(states))
        while True:
            allowed = [state.allowed() or (pad,) for state in states]
            width = max(len(a) for a in allowed)
            allowed_ids = torch.tensor([list(a) + [pad] * (width - len(a)) for a in allowed])
            valid = torch.tensor([[i < len(a) for i in range(width)] for a in allowed])
            scores = token_logits(self.model, shared.hidden, allowed_ids).cpu()
            step_log_probs = _masked_log_softmax(scores, valid, temperature)
            if rng is None:
                picked = step_log_probs.argmax(-1, keepdim=True)
            else:
                picked = torch.multinomial(step_log_probs.exp(), 1, generator=rng)
            log_probs += step_log_probs.gather(1, picked).squeeze(1)
            tokens = allowed_ids.gather(1, picked).squeeze(1)
            for state, token in zip(states, tokens.tolist()):
                if not state.done:
                    state.advance(token)
            if all(state.done for state in states):
                break
            _, shared = extend(self.model, shared, tokens[:, None])
        self.model.train(was_training)
        permutations = torch.tensor([state.picked for state in states]).view(len(batch), num_samples, top_k)
        return permutations, log_probs.view(len(batch), num_samples)

    def sample(
        self, batch: Sequence[Example], num_samples: int, temperature: float = 1.0, rng: torch.Generator | None = None
    ) -> SampleBatch:
        """Draw ``num_samples`` permutations per question from the constrained selector (no gradient).

        Args:
            batch: B questions.
            num_samples: m.
            temperature: softmax temperature at each constrained step.
            rng: CPU generator for reproducible draws; when None, one seeded from the global torch RNG
                (drawing from it rather than re-seeding it, so the caller's seeding stays in effect).

        Returns:
            :class:`SampleBatch` with permutations ``[B, m, k]`` and their log-probs ``[B, m]``.
        """
        if rng is None:
            rng = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        permutations, log_probs = self._decode(batch, num_samples, self.top_k, temperature, rng)
        return SampleBatch(permutations, log_probs)

    def select(self, batch: Sequence[Example], k: int | None = None) -> list[list[int]]:
        """Greedy constrained decoding for inference: the top-k candidate indices (0-based) per question."""
        permutations, _ = self._decode(batch, 1, k or self.top_k, 1.0, None)
        return permutations[:, 0].tolist()

    def write(self, batch: Sequence[Example], k: int | None = None, max_new_tokens: int = 64) -> list[str]:
        """Unconstrained greedy decoding: the selector's raw text per question, e.g. ``"[3] > [1]"``.

        For selectors that were not trained with constrained decoding; read the text with
        :func:`dro_plugins.permutation.parse_permutation`, which may find it unusable.
        """
        prompts = [self.prompt_ids(ex, k or self.top_k) for ex in batch]
        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens)

    def log_prob(self, batch: Sequence[Example], permutations: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Differentiable log p_S(z | x) of given permutations under the constrained distribution.

        Args:
            batch: B questions.
            permutations: ``[B, m, k]`` long, 0-based candidate indices.
            temperature: scores at this temperature (1.0 = the selector itself).

        Returns:
            ``[B, m]`` float32: sum over constrained choice steps of the masked log-softmax (forced steps add 0).

        Raises:
            ValueError: a permutation is not valid for its question.
        """
        batch_size, num_samples, top_k = permutations.shape
        outputs, choices = [], []
        for b, example in enumerate(batch):
            grammar = self.grammar(len(example.candidates), top_k)
            for permutation in permutations[b].tolist():
                outputs.append(grammar.encode(permutation))
                choices.append(grammar.choices(permutation))
        pad = self.tokenizer.pad_token_id
        shared = run_shared_prompt(self.model, [self.prompt_ids(ex, top_k) for ex in batch], num_samples, pad, self.device)
        hidden = continuation_hidden(self.model, shared, outputs, pad)

        rows = len(outputs)
        num_choices = max(1, max(len(c) for c in choices))
        width = max([1] + [len(ch.allowed) for row in choices for ch in row])
        position = torch.zeros(rows, num_choices, dtype=torch.long)
        allowed_ids = torch.zeros(rows, num_choices, width, dtype=torch.long)
        valid = torch.zeros(rows, num_choices, width, dtype=torch.bool)
        valid[:, :, 0] = True  # padding choices: one allowed entry, log-prob 0
        chosen = torch.zeros(rows, num_choices, dtype=torch.long)
        for r, row in enumerate(choices):
            for c, choice in enumerate(row):
                position[r, c] = choice.offset  # logits index o predicts output token o
                allowed_ids[r, c, : len(choice.allowed)] = torch.tensor(choice.allowed)
                valid[r, c, : len(choice.allowed)] = True
                chosen[r, c] = choice.chosen
        device = hidden.device
        at_choices = hidden.gather(1, position.to(device)[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [rows, C, H]
        step = _masked_log_softmax(token_logits(self.model, at_choices, allowed_ids), valid.to(device), temperature)
        picked = step.gather(2, chosen.to(device)[:, :, None]).squeeze(2)
        return picked.sum(-1).view(batch_size, num_samples)
