"""The generative list-wise selector p_S(z | x) (paper §4): a causal LM that writes ``[7] > [2] > [15]``.

Decoding is constrained by :mod:`dro_plugins.modeling.permutation`, so every sample is a valid permutation by
construction, and :meth:`LMSelector.log_prob` scores with the same masks and temperature.

Both paths share each question's prompt across its m permutations (one copy of its compute and memory): sampling prefills the prompt
once and the m samples extend one cache, each seeing only the prompt and itself; ``log_prob`` packs
``[prompt][z_1]...[z_m]`` into one row (:mod:`dro_plugins.modeling.packing`). Draws use Gumbel-max noise seeded per
question (from the seed and the question id), so a question's samples do not depend on which questions share
its batch or micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from dro_plugins.modeling.batching import Shape
from dro_plugins.data.examples import Example
from dro_plugins.modeling.causal_lm import compute_dtype, greedy_generate, left_pad
from dro_plugins.modeling.packing import additive_mask, decode_step_mask, pack_shared_prefix
from dro_plugins.modeling.permutation import DecodingState, PermutationGrammar
from dro_plugins.modeling.prompts import render, selector_prompt
from dro_plugins.selectors.base import SampleBatch, draw_seed, gumbel_noise, question_seed
from dro_plugins.modeling.tokenization import encode_prompt
from dro_plugins.modeling.units import AdapterRole, AdapterUnit

# Samples of one question decoded in one row at most; more are decoded in further rows (each with the prompt).
SAMPLES_PER_ROW = 64


def _masked_log_softmax(scores: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax over the valid entries of the last dim; invalid entries get -inf."""
    return (scores / temperature).masked_fill(~valid, float("-inf")).log_softmax(-1)


class LMSelector(AdapterRole):
    """A causal-LM selector with constrained decoding of top-k permutations.

    Args:
        model: a (peft-wrapped) causal LM.
        tokenizer: its tokenizer.
        top_k: how many candidates a permutation picks (k).
        max_passage_words: passages are cut to this many words in the prompt.
        retriever: the retriever whose pools this selector ranks (``retriever.train``, a third trainable unit:
            :class:`dro_plugins.selectors.retriever.RetrieverSelector`); None: the pools the questions came with.
    """

    def __init__(self, model, tokenizer, top_k: int, max_passage_words: int, unit: AdapterUnit | None = None, retriever=None):
        self.model = model
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.max_passage_words = max_passage_words
        if unit is None and hasattr(model, "peft_config"):
            unit = AdapterUnit(model, model.active_adapter)
        self.unit = unit

    @lru_cache(maxsize=64)
    def grammar(self, num_candidates: int, top_k: int) -> PermutationGrammar:
        return PermutationGrammar(self.tokenizer, num_candidates, top_k)

    def prompt_ids(self, example: Example, top_k: int) -> list[int]:
        """Token ids of the selector prompt for one question (chat template applied when present)."""
        text = render(self.tokenizer, selector_prompt(example.question, example.candidates, top_k, self.max_passage_words))
        return encode_prompt(self.tokenizer, text)

    def shape(self, example: Example, num_samples: int, top_k: int | None = None) -> Shape:
        """Tokens one question needs when its m permutations are sampled or scored: one packed row.

        The row is the prompt plus m continuations of the longest permutation (an upper bound), in tokens.
        """
        grammar = self.grammar(len(example.candidates), top_k or self.top_k)
        return Shape(1, len(self.prompt_ids(example, grammar.top_k)) + num_samples * grammar.max_length)

    @torch.no_grad()
    def _decode(self, batch: Sequence[Example], top_k: int, temperature: float, noise: torch.Tensor | None):
        """Constrained decoding of m permutations per question that share one prefilled prompt.

        Args:
            noise: ``[B, m, S, W]`` Gumbel noise (sampling), or None (greedy, m = 1).

        Returns:
            permutations ``[B, m, k]`` and their log-probs ``[B, m]`` (float32, CPU).
        """
        self.activate()
        was_training = self.model.training
        self.model.eval()
        num_samples = 1 if noise is None else noise.shape[1]
        states = [[DecodingState(self.grammar(len(ex.candidates), top_k)) for _ in range(num_samples)] for ex in batch]
        pad, device = self.tokenizer.pad_token_id, self.device
        ids, prompt_mask, positions = left_pad([self.prompt_ids(ex, top_k) for ex in batch], pad, device)
        out = self.model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1:].expand(-1, num_samples, -1)  # every sample starts from the prompt's last position
        next_position = positions[:, -1:] + 1  # [B, 1]
        noise = None if noise is None else noise.to(device)
        mask_dtype = compute_dtype(self.model)
        log_probs = torch.zeros(len(batch), num_samples, device=device)
        step = 0
        while True:
            allowed = [[state.allowed() or (pad,) for state in row] for row in states]
            width = max(len(a) for row in allowed for a in row)
            allowed_ids = torch.tensor([[list(a) + [pad] * (width - len(a)) for a in row] for row in allowed], device=device)
            valid = torch.tensor([[[i < len(a) for i in range(width)] for a in row] for row in allowed], device=device)
            step_log_probs = _masked_log_softmax(logits.gather(-1, allowed_ids).float(), valid, temperature)
            # past this process's longest permutation (another process, in lockstep, decodes on) only padding is left
            ranked = step_log_probs if noise is None or step >= noise.shape[2] else step_log_probs + noise[:, :, step, :width]
            picked = ranked.argmax(-1, keepdim=True)  # [B, m, 1]
            log_probs += step_log_probs.gather(-1, picked).squeeze(-1)
            tokens = allowed_ids.gather(-1, picked).squeeze(-1)  # [B, m]
            for row, row_tokens in zip(states, tokens.tolist()):
                for state, token in zip(row, row_tokens):
                    if not state.done:
                        state.advance(token)
            if self.sync.all_done(all(state.done for row in states for state in row)):
                break
            mask = additive_mask(decode_step_mask(prompt_mask, num_samples, step), mask_dtype)
            out = self.model(
                input_ids=tokens, attention_mask=mask, position_ids=(next_position + step).expand(-1, num_samples),
                cache=out.cache, use_cache=True,
            )
            logits = out.logits
            step += 1
        self.model.train(was_training)
        permutations = torch.tensor([[state.picked for state in row] for row in states])
        return permutations, log_probs.cpu()

    def sample(
        self, batch: Sequence[Example], num_samples: int, temperature: float = 1.0, rng: torch.Generator | int | None = None
    ) -> SampleBatch:
        """Draw ``num_samples`` permutations per question from the constrained selector (no gradient).

        Each question's draws are seeded from ``(seed, question id)``, so they do not depend on the other
        questions in ``batch`` (or on micro-batching and sharding).

        Args:
            batch: B questions.
            num_samples: m.
            temperature: softmax temperature at each constrained step.
            rng: an int seed; or a CPU generator, from which one seed is drawn; when None, the seed is drawn from
                the global torch RNG (drawing rather than re-seeding it, so the caller's seeding stays in effect).

        Returns:
            :class:`SampleBatch` with permutations ``[B, m, k]`` and their log-probs ``[B, m]``.
        """
        seed = draw_seed(rng)
        grammars = [self.grammar(len(ex.candidates), self.top_k) for ex in batch]
        # each question's noise has its own grammar's shape, so it is the same whatever else is in the batch
        noise = torch.zeros(len(batch), num_samples, max(g.max_length for g in grammars), max(g.num_candidates for g in grammars))
        for b, (example, grammar) in enumerate(zip(batch, grammars)):
            own = gumbel_noise(question_seed(seed, example.id), num_samples, grammar.max_length, grammar.num_candidates)
            noise[b, :, : own.shape[1], : own.shape[2]] = own
        chunks = [self._decode(batch, self.top_k, temperature, noise[:, i : i + SAMPLES_PER_ROW]) for i in range(0, num_samples, SAMPLES_PER_ROW)]
        return SampleBatch(torch.cat([c[0] for c in chunks], 1), torch.cat([c[1] for c in chunks], 1))

    def select(self, batch: Sequence[Example], k: int | None = None) -> list[list[int]]:
        """Greedy constrained decoding for inference: the top-k candidate indices (0-based) per question."""
        permutations, _ = self._decode(batch, k or self.top_k, 1.0, None)
        return permutations[:, 0].tolist()

    def candidates(self, batch: Sequence[Example]) -> list[Example]:
        """The pools this selector ranks: re-retrieved by its retriever with the current query tower (when it has
        one, see the class), else the pools the questions came with."""
        return self.retriever.candidates(batch) if self.retriever is not None else list(batch)

    def write(self, batch: Sequence[Example], k: int | None = None, max_new_tokens: int = 64) -> list[str]:
        """Unconstrained greedy decoding: the selector's raw text per question, e.g. ``"[3] > [1]"``.

        For selectors that were not trained with constrained decoding; read the text with
        :func:`dro_plugins.modeling.permutation.parse_permutation`, which may find it unusable.
        """
        self.activate()
        prompts = [self.prompt_ids(ex, k or self.top_k) for ex in batch]
        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens, sync=self.sync)

    def log_prob(self, batch: Sequence[Example], permutations: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Differentiable log p_S(z | x) of given permutations under the constrained distribution.

        Each question's prompt and its m permutations are packed into one row (:mod:`dro_plugins.modeling.packing`), so
        the prompt is computed once, and only the positions of constrained choices reach the loss.

        Args:
            batch: B questions.
            permutations: ``[B, m, k]`` long, 0-based candidate indices.
            temperature: scores at this temperature (1.0 = the selector itself).

        Returns:
            ``[B, m]`` float32 on the model's device: sum over constrained choice steps of the masked log-softmax
            (forced steps add 0).

        Raises:
            ValueError: a permutation is not valid for its question.
        """
        self.activate()
        batch_size, num_samples, top_k = permutations.shape
        blocks, choices = [], []
        for b, example in enumerate(batch):
            grammar = self.grammar(len(example.candidates), top_k)
            rows = permutations[b].tolist()
            blocks.append([grammar.encode(p)[:-1] for p in rows])  # the last token predicts nothing we score
            choices.append([grammar.choices(p) for p in rows])
        packed = pack_shared_prefix([self.prompt_ids(ex, top_k) for ex in batch], blocks, self.tokenizer.pad_token_id)
        device = self.device
        model = self.model if self.unit is None else self.unit.scoring_model()
        logits = model(
            input_ids=packed.input_ids.to(device),
            attention_mask=additive_mask(packed.allowed.to(device), compute_dtype(self.model)),
            position_ids=packed.position_ids.to(device),
            logits_to_keep=packed.keep,
            use_cache=False,
        ).logits  # [B, keep, V]

        num_choices = max([1] + [len(c) for row in choices for c in row])
        width = max([1] + [len(ch.allowed) for row in choices for c in row for ch in c])
        column = torch.zeros(batch_size, num_samples, num_choices, dtype=torch.long)
        allowed_ids = torch.zeros(batch_size, num_samples, num_choices, width, dtype=torch.long)
        valid = torch.zeros(batch_size, num_samples, num_choices, width, dtype=torch.bool)
        valid[..., 0] = True  # padding choices: one allowed entry, log-prob 0
        chosen = torch.zeros(batch_size, num_samples, num_choices, dtype=torch.long)
        for b, row in enumerate(choices):
            for i, steps in enumerate(row):
                for c, choice in enumerate(steps):
                    column[b, i, c] = packed.predicting_column(b, i, choice.offset)
                    allowed_ids[b, i, c, : len(choice.allowed)] = torch.tensor(choice.allowed)
                    valid[b, i, c, : len(choice.allowed)] = True
                    chosen[b, i, c] = choice.chosen
        rows = torch.arange(batch_size, device=device)[:, None, None, None]
        scores = logits[rows, column.to(device)[..., None], allowed_ids.to(device)].float()  # [B, m, C, W]
        step = _masked_log_softmax(scores, valid.to(device), temperature)
        return step.gather(-1, chosen.to(device)[..., None]).squeeze(-1).sum(-1)
