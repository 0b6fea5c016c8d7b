"""Causal-LM plumbing shared by the selector and the generator: left padding, tail logits, shared prompts.

Sequences are left-padded so that every row's continuation (selection or answer) ends at the last
position; the LM head then runs only on the last few positions (``logits_to_keep``), which keeps the
vocabulary projection cheap for long prompts and large vocabularies. When m continuations share one
prompt (the selector's m samples), the prompt runs once and its key/value cache is repeated m times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Stack token sequences, padded on the left.

    Returns:
        input_ids ``[N, T]``, attention_mask ``[N, T]`` (1 on real tokens), position_ids ``[N, T]``
        (0 at each row's first real token, so padding does not shift positions).
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def tail_logits(model, sequences: Sequence[Sequence[int]], keep: int, pad_id: int, device: torch.device) -> torch.Tensor:
    """Logits of the last ``keep`` positions of each left-padded sequence.

    Index ``q`` of the result is the prediction made at position ``T - keep + q``, i.e. for the token at
    ``T - keep + q + 1``.

    Returns:
        float32 tensor ``[N, keep, V]``.
    """
    ids, mask, positions = left_pad(sequences, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False)
    return out.logits[:, -keep:].float()


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded without special tokens and stripped.

    Args:
        prompts: N prompt token-id lists.
        max_new_tokens: longest continuation, in tokens; decoding also stops at ``tokenizer.eos_token_id``.
    """
    was_training = model.training
    model.eval()
    ids, mask, _ = left_pad(prompts, tokenizer.pad_token_id, next(model.parameters()).device)
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return [text.strip() for text in tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)]


@dataclass
class SharedPrompt:
    """The state after running B prompts once, repeated for ``m`` continuations each (rows ``b * m + i``).

    Attributes:
        hidden: ``[B * m, H]`` final hidden state after each prompt (differentiable when grads are on).
        cache: the key/value cache, batch ``B * m``.
        attention_mask: ``[B * m, T]`` mask of the prompt tokens.
        next_position: ``[B * m, 1]`` position id of the first continuation token.
    """

    hidden: torch.Tensor
    cache: object
    attention_mask: torch.Tensor
    next_position: torch.Tensor


def run_shared_prompt(model, prompts: Sequence[Sequence[int]], m: int, pad_id: int, device: torch.device) -> SharedPrompt:
    """Run each of B prompts once through the decoder body (no LM head) and repeat the result m times."""
    ids, mask, positions = left_pad(prompts, pad_id, device)
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    out.past_key_values.batch_repeat_interleave(m)
    return SharedPrompt(
        hidden=out.last_hidden_state[:, -1].repeat_interleave(m, 0),
        cache=out.past_key_values,
        attention_mask=mask.repeat_interleave(m, 0),
        next_position=positions[:, -1:].repeat_interleave(m, 0) + 1,
    )


def extend(model, shared: SharedPrompt, tokens: torch.Tensor, use_cache: bool = True) -> tuple[torch.Tensor, SharedPrompt]:
    """Feed ``tokens`` ``[B * m, L]`` after the shared prompts (and anything fed before).

    Returns:
        the final hidden states ``[B * m, L, H]``, and the state after the new tokens (its cache is only
        usable when ``use_cache``).
    """
    device = shared.attention_mask.device
    mask = torch.cat([shared.attention_mask, torch.ones_like(tokens, device=device)], dim=1)
    positions = shared.next_position + torch.arange(tokens.shape[1], device=device)
    out = model.get_decoder()(
        input_ids=tokens.to(device), attention_mask=mask, position_ids=positions, past_key_values=shared.cache, use_cache=use_cache
    )
    hidden = out.last_hidden_state
    return hidden, SharedPrompt(hidden[:, -1], out.past_key_values, mask, positions[:, -1:] + 1)


def continuation_hidden(model, shared: SharedPrompt, continuations: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Hidden states that predict each continuation token, given its shared prompt (teacher forcing).

    Args:
        shared: from :func:`run_shared_prompt`, one row per continuation.
        continuations: ``B * m`` token lists (right-padded here; padding sits after the real tokens, so
            causal attention keeps it from affecting them).

    Returns:
        ``[B * m, L, H]`` where index ``o`` predicts continuation token ``o`` (L = longest continuation).
    """
    longest = max(len(c) for c in continuations)
    if longest <= 1:
        return shared.hidden[:, None]
    ids = torch.full((len(continuations), longest - 1), pad_id, dtype=torch.long)
    for row, tokens in enumerate(continuations):
        ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1], dtype=torch.long)
    hidden, _ = extend(model, shared, ids, use_cache=False)
    return torch.cat([shared.hidden[:, None], hidden], dim=1)


def token_logits(model, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a few tokens only: ``hidden · W[token_ids] (+ bias)`` with the LM head's weights.

    Projecting on the handful of allowed label tokens instead of the whole vocabulary makes constrained
    scoring cheap. It equals the model's own logits for linear LM heads (Llama, Qwen2, Mistral, ...); models
    that rescale or soft-cap logits (Gemma 2, Cohere) get unscaled scores, consistently in sampling and scoring.

    Args:
        hidden: ``[..., H]`` final hidden states.
        token_ids: ``[..., W]`` token ids to score at each position.

    Returns:
        float32 ``[..., W]``.
    """
    head = model.get_output_embeddings()
    weight = head.weight[token_ids.to(hidden.device)]  # [..., W, H]
    scores = (weight @ hidden.unsqueeze(-1)).squeeze(-1)
    if getattr(head, "bias", None) is not None:
        scores = scores + head.bias[token_ids.to(hidden.device)]
    return scores.float()
