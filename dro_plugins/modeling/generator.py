"""The generator p_G(y | x, d_z): a causal LM that answers from the passages a permutation selects."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dro_plugins.modeling.batching import MAX_PADDING, Shape, plan_microbatches
from dro_plugins.data.examples import Example, Passage
from dro_plugins.modeling.causal_lm import greedy_generate, tail_logits
from dro_plugins.modeling.prompts import generator_prompt, render
from dro_plugins.modeling.tokenization import chat_format, encode_prompt, encode_with_target, stop_token_ids
from dro_plugins.modeling.units import AdapterRole, AdapterUnit


# (question, passages in selection order) -> the text the generator reads, up to where its answer starts
PromptRenderer = Callable[[str, Sequence[Passage]], str]
# characters of a prompt's end that decide how an answer's tokens join it (BPE pre-tokens are far shorter)
JOIN_CONTEXT = 64
# prompt text -> the token ids serving feeds the model (special tokens as the serving framework adds them)
PromptEncoder = Callable[[str], list[int]]


class LMGenerator(AdapterRole):
    """A causal-LM generator.

    The prompt lists the selected passages in the permutation's order: by default the built-in instruction
    (:func:`dro_plugins.modeling.prompts.generator_prompt`, chat template applied when the tokenizer has one); a framework
    adapter passes its pipeline's own prompt template instead, so training and serving read the same text, and its
    framework's encoder, so they read the same token ids. The target is the first gold answer as the tokenizer's chat
    format writes it (:mod:`dro_plugins.modeling.tokenization`): e.g. followed by ``<|eot_id|>`` for Llama 3, by the eos token
    without a chat template. Generation stops on those end-of-turn tokens.

    Args:
        model: a (peft-wrapped) causal LM.
        tokenizer: its tokenizer; needs ``eos_token_id`` and ``pad_token_id``.
        max_passage_words: passages are cut to this many words.
        max_new_tokens: longest generated answer, in tokens.
        length_normalize: divide log-likelihoods by the answer length in tokens.
        prompt: renders the prompt text from the question and passages; None for the built-in one
            (which cuts passages to ``max_passage_words``).
        unit: the generator's adapter on ``model`` (needed when the model is shared with the selector); by
            default the model's active adapter.
        encode: prompt text -> ids; None for :func:`dro_plugins.modeling.tokenization.encode_prompt`.

    Raises:
        ModelLoadError: the tokenizer's chat template fails, or an answer could not end (no template, no eos).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_passage_words: int,
        max_new_tokens: int = 32,
        length_normalize: bool = False,
        prompt: PromptRenderer | None = None,
        unit: AdapterUnit | None = None,
        encode: PromptEncoder | None = None,
    ):
        self.model = model
        self.encode = encode or (lambda text: encode_prompt(tokenizer, text))
        self.chat = chat_format(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, self.chat)
        self._targets: dict[tuple, list[int]] = {}
        if unit is None and hasattr(model, "peft_config"):
            unit = AdapterUnit(model, model.active_adapter)
        self.unit = unit
        self.tokenizer = tokenizer
        self.max_passage_words = max_passage_words
        self.max_new_tokens = max_new_tokens
        self.length_normalize = length_normalize
        self.prompt = prompt or (lambda question, passages: render(tokenizer, generator_prompt(question, passages, max_passage_words)))

    def shape(self, example: Example, permutations: Sequence[Sequence[int]]) -> Shape:
        """Tokens one question needs when scored with these permutations: one row per distinct permutation.

        The length is measured on the first permutation (others order the same passages, so their prompts differ
        by a few tokens at most); it sizes micro-batches, it does not change any result.
        """
        distinct = {tuple(p) for p in permutations}
        length = len(self.prompt_ids(example, permutations[0])) + len(self.answer_ids(example.target))
        return Shape(len(distinct), length)

    def prompt_ids(self, example: Example, permutation: Sequence[int]) -> list[int]:
        """Token ids of the generator prompt for one question and one permutation."""
        return self.encode(self.prompt_text(example, permutation))

    def prompt_text(self, example: Example, permutation: Sequence[int]) -> str:
        """The prompt text for one question and one permutation (passages in the permutation's order)."""
        return self.prompt(example.question, [example.candidates[i] for i in permutation])

    def answer_ids(self, answer: str) -> list[int]:
        """Target tokens of an answer as the chat format writes it, end of turn included, so the model learns to stop.

        These are the trained ids whenever the prompt's ids are a prefix of the prompt and answer encoded together
        (checked by :meth:`sequence` through :func:`dro_plugins.modeling.tokenization.encode_with_target`).
        """
        return self.tokenizer.encode(self.chat.target_text(answer), add_special_tokens=False)

    def sequence(self, example: Example, permutation: Sequence[int]) -> tuple[list[int], list[int]]:
        """Prompt ids and target ids of one scored sequence, prompt and answer encoded together.

        How the target joins the prompt depends only on the prompt's last characters, the same for every permutation
        of a question; the joint encoding is therefore done once per (prompt ending, target) and cached.
        """
        prompt_text, target_text = self.prompt_text(example, permutation), self.chat.target_text(example.target)
        key = (self.encode, prompt_text[-JOIN_CONTEXT:], target_text)
        if key not in self._targets:
            prompt, self._targets[key] = encode_with_target(self.encode, self.tokenizer, prompt_text, target_text)
            return prompt, self._targets[key]
        return self.encode(prompt_text), self._targets[key]

    def log_likelihood(self, batch: Sequence[Example], permutations: torch.Tensor) -> torch.Tensor:
        """Differentiable log p_G(y | x, d_z): the sum of answer-token log-probs, prompt tokens masked.

        Args:
            batch: B questions; y is each question's first answer.
            permutations: ``[B, m, k]`` long, 0-based candidate indices.

        Returns:
            ``[B, m]`` float32 log-likelihoods (nats) on the model's device, divided by the answer length when
            length-normalised.
        """
        self.activate()
        batch_size, num_samples, _ = permutations.shape
        # identical permutations of one question share one forward pass (a peaked selector repeats itself)
        rows: dict[tuple, int] = {}
        index, sequences, targets = [], [], []
        for b, example in enumerate(batch):
            for permutation in permutations[b].tolist():
                key = (b, tuple(permutation))
                if key not in rows:
                    rows[key] = len(sequences)
                    prompt, target = self.sequence(example, permutation)
                    sequences.append(prompt + target)
                    targets.append(target)
                index.append(rows[key])
        # rows of similar length share a forward (padding at most MAX_PADDING of it: attention grows as length^2);
        # in lockstep (FSDP2) one forward, so that every process runs as many as the others
        lengths = [Shape(1, len(sequence)) for sequence in sequences]
        groups = [list(range(len(sequences)))] if self.sync.active else plan_microbatches(lengths, sum(s.tokens for s in lengths), MAX_PADDING)
        totals = [None] * len(sequences)
        for group in groups:
            for r, total in zip(group, self._answer_log_probs([sequences[r] for r in group], [targets[r] for r in group])):
                totals[r] = total
        total = torch.stack(totals)
        return total[torch.tensor(index, device=total.device)].view(batch_size, num_samples)

    def _answer_log_probs(self, sequences: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """``[R]`` summed (or length-normalised) log-probs of each row's target, the rows in one padded forward."""
        longest = max(len(t) for t in targets)
        model = self.model if self.unit is None else self.unit.scoring_model()
        logits = tail_logits(model, sequences, longest + 1, self.tokenizer.pad_token_id, self.device)[:, :-1]
        # right-align the targets with the kept logits: row r's answer fills the last len(answer) slots
        target_ids = torch.zeros(len(targets), longest, dtype=torch.long)
        is_answer = torch.zeros(len(targets), longest, dtype=torch.bool)
        for r, target in enumerate(targets):
            target_ids[r, longest - len(target) :] = torch.tensor(target)
            is_answer[r, longest - len(target) :] = True
        target_ids, is_answer = target_ids.to(logits.device), is_answer.to(logits.device)
        token_log_probs = logits.log_softmax(-1).gather(2, target_ids[:, :, None]).squeeze(2)
        total = (token_log_probs * is_answer).sum(-1)
        return total / is_answer.sum(-1) if self.length_normalize else total

    def generate(self, batch: Sequence[Example], permutations: Sequence[Sequence[int]]) -> list[str]:
        """Greedy answers, one per question, from the passages of its permutation.

        Args:
            batch: B questions.
            permutations: B permutations (0-based candidate indices).
        """
        self.activate()
        prompts = [self.prompt_ids(ex, perm) for ex, perm in zip(batch, permutations)]
        texts = greedy_generate(self.model, self.tokenizer, prompts, self.max_new_tokens, self.stop_ids, self.sync)
        return [self.chat.strip(text) for text in texts]
