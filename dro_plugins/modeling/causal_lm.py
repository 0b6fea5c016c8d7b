"""Causal-LM plumbing shared by the selector and the generator: left padding, tail logits, greedy decoding.

Sequences are left-padded so that every row's continuation (selection or answer) ends at the last
position; the LM head then runs only on the last few positions (``logits_to_keep``), which keeps the
vocabulary projection cheap for long prompts and large vocabularies. Every score goes through the model's
own ``forward``, which peft, DDP and FSDP wrap. Shared prompts are packed by :mod:`dro_plugins.modeling.packing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dro_plugins.distributed.runtime import NO_SYNC, Sync


def compute_dtype(model) -> torch.dtype:
    """The dtype the base weights compute in (adapters may be float32 on a bfloat16 base)."""
    return next(p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point())


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
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] | None = None,
    sync: Sync = NO_SYNC,
) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded without special tokens and stripped.

    Args:
        prompts: N prompt token-id lists.
        max_new_tokens: longest continuation, in tokens.
        stop_ids: token ids that end a continuation; ``tokenizer.eos_token_id`` when None.
        sync: lockstep (``Runtime.sync``): each process keeps decoding until every one is done.
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
        eos_token_id=list(stop_ids) if stop_ids else tokenizer.eos_token_id,
        **sync.generate_options,
    )
    model.train(was_training)
    return [text.strip() for text in tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)]
