"""Shared-prefix packing: one prompt and its m continuations in ONE row, ``[prompt][z_1][z_2]...[z_m]``.

The prompt is computed once and keeps one copy of its activations; no key/value cache is needed, so the
same row works under gradient checkpointing. A 4-D attention mask lets each continuation see
the prompt and its own earlier tokens only, and position ids restart at the prompt's length for each
continuation, so every continuation is scored exactly as if it followed the prompt alone (equal to separate
scoring up to float rounding; checked in ``tests/test_packing.py``).

Rows are left-padded so that every row's continuations end at the last column; the LM head then only needs
the last ``keep`` positions (``logits_to_keep``). The same masks serve constrained decoding, where the m
samples of a question extend one shared prompt cache (:func:`decode_step_mask`).

Pattern after torchtune's ``packed_block_causal_mask`` and verl's "prefix grouper", with a shared prefix block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedRows:
    """Packed rows, ready for ``model(input_ids=..., attention_mask=..., position_ids=..., logits_to_keep=keep)``.

    Attributes:
        input_ids: ``[R, T]`` long, left-padded with ``pad_id``.
        position_ids: ``[R, T]`` long; each continuation restarts at its prompt's length.
        allowed: ``[R, T, T]`` bool, True where query position (dim 1) may attend to key position (dim 2).
        prompt_ends: per row, the column of the prompt's last token.
        block_starts: per row, the column where each continuation's block starts.
        keep: how many trailing positions hold every prediction a continuation needs (``logits_to_keep``).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    prompt_ends: list[int]
    block_starts: list[list[int]]
    keep: int

    def predicting_column(self, row: int, continuation: int, offset: int) -> int:
        """Column (among the last ``keep``) whose logits predict token ``offset`` of a continuation.

        Token 0 is predicted at the prompt's last position, token ``o > 0`` at the block's token ``o - 1``.
        """
        column = self.prompt_ends[row] if offset == 0 else self.block_starts[row][continuation] + offset - 1
        return column - (self.input_ids.shape[1] - self.keep)


def shared_prefix_allowed(prompt_length: int, block_lengths: Sequence[int]) -> torch.Tensor:
    """The attention pattern of one unpadded packed row: causal prompt, each block sees the prompt and itself.

    Args:
        prompt_length: P tokens.
        block_lengths: lengths of the m continuation blocks, in row order.

    Returns:
        ``[L, L]`` bool with ``L = P + sum(block_lengths)``; True where query (row) may attend to key (column).
    """
    length = prompt_length + sum(block_lengths)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:prompt_length, :prompt_length] = torch.ones(prompt_length, prompt_length, dtype=torch.bool).tril()
    start = prompt_length
    for size in block_lengths:
        allowed[start : start + size, :prompt_length] = True
        allowed[start : start + size, start : start + size] = torch.ones(size, size, dtype=torch.bool).tril()
        start += size
    return allowed


def pack_shared_prefix(prompts: Sequence[Sequence[int]], blocks: Sequence[Sequence[Sequence[int]]], pad_id: int) -> PackedRows:
    """Pack each prompt with its continuation blocks into one row, left-padded to a common width.

    Args:
        prompts: R prompts (token ids).
        blocks: per row, the m token blocks that follow the prompt (each sees only the prompt and itself).
        pad_id: padding token id (padding positions attend to themselves only, so no softmax row is empty).

    Returns:
        :class:`PackedRows`.
    """
    lengths = [len(p) + sum(len(b) for b in bs) for p, bs in zip(prompts, blocks)]
    width = max(lengths)
    rows = len(prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)
    starts: list[list[int]] = []
    keep = 1
    for r, (prompt, row_blocks) in enumerate(zip(prompts, blocks)):
        pad = width - lengths[r]
        tokens = list(prompt) + [t for block in row_blocks for t in block]
        ids[r, pad:] = torch.tensor(tokens, dtype=torch.long)
        row_positions = list(range(len(prompt)))
        row_starts, column = [], pad + len(prompt)
        for block in row_blocks:
            row_starts.append(column)
            row_positions += range(len(prompt), len(prompt) + len(block))
            column += len(block)
        positions[r, pad:] = torch.tensor(row_positions, dtype=torch.long)
        allowed[r, pad:, pad:] = shared_prefix_allowed(len(prompt), [len(b) for b in row_blocks])
        starts.append(row_starts)
        keep = max(keep, lengths[r] - len(prompt) + 1)  # the blocks plus the prompt's last position
    ends = [width - lengths[r] + len(p) - 1 for r, p in enumerate(prompts)]
    return PackedRows(ids, positions, allowed, ends, starts, keep)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``[..., Q, K]`` pattern as the float mask transformers adds to attention scores.

    Returns:
        ``[R, 1, Q, K]`` (a head dimension inserted) of ``dtype``: 0 where allowed, the dtype's lowest value elsewhere.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def decode_step_mask(prompt_mask: torch.Tensor, num_samples: int, step: int) -> torch.Tensor:
    """Attention pattern of one constrained-decoding step in which m samples extend one shared prompt cache.

    The cache holds the (left-padded) prompt, then one token per sample for each earlier step, in sample order.
    At step ``t`` sample ``i``'s new token sees the prompt's real tokens and its own tokens of steps ``0..t``.

    Args:
        prompt_mask: ``[B, W]`` 1 on real prompt tokens (the prefill's 2-D mask).
        num_samples: m.
        step: t, counted from 0 (the first token fed after the prompt).

    Returns:
        ``[B, m, W + (t + 1) * m]`` bool.
    """
    batch = prompt_mask.shape[0]
    own = torch.eye(num_samples, dtype=torch.bool, device=prompt_mask.device).repeat(1, step + 1)  # [m, (t+1) m]
    prompt = prompt_mask.bool()[:, None, :].expand(batch, num_samples, -1)
    return torch.cat([prompt, own.expand(batch, -1, -1)], dim=-1)
