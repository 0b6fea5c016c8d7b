"""Micro-batches bounded by padded token count, used by the warm-up, E-step, M-step and validation.

An optimizer step still covers ``dro.batch_size`` questions; its questions are split into micro-batches whose
padded size (rows x longest row) stays within ``dro.max_tokens_per_microbatch``, and gradients accumulate
over them. Losses are per question and the trainer divides their sum by the step's question count, so the
update does not depend on how the step was split (as torchtune's ``scale_grads`` and TRL's
``num_items_in_batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """What one question adds to a micro-batch: ``rows`` sequences, the longest ``length`` tokens."""

    rows: int
    length: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


MAX_PADDING = 0.05  # share of padding tokens allowed in a micro-batch of several questions (plan_microbatches)


def padded_tokens(shapes: Sequence[Shape]) -> int:
    """Padded size of a micro-batch: all its rows padded to the longest, in tokens."""
    return sum(s.rows for s in shapes) * max((s.length for s in shapes), default=0)


def plan_microbatches(shapes: Sequence[Shape], token_budget: int | None, max_padding: float | None = None) -> list[list[int]]:
    """Split items into micro-batches of at most ``token_budget`` padded tokens.

    Items are taken longest first, so each micro-batch pads to its first item's length; an item is added while
    the padded size stays within the budget and, with ``max_padding``, while padding stays at most that share of
    the micro-batch's padded tokens. (Attention over a padded row costs the square of its length, so 5% padding
    costs ~10% more attention; :data:`MAX_PADDING` is what training uses.) An item over the budget on its own gets
    a micro-batch of its own (see :func:`oversized`).

    Args:
        shapes: one :class:`Shape` per item (question).
        token_budget: padded tokens per micro-batch; None puts everything in one micro-batch.
        max_padding: largest share of padding tokens in a micro-batch of several items; None = no limit.

    Returns:
        Lists of item indices; every index appears exactly once.
    """
    if token_budget is None or not shapes:
        return [list(range(len(shapes)))] if shapes else []
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i].length, i))
    plan: list[list[int]] = []
    rows = width = real = 0
    for index in order:
        shape = shapes[index]
        padded = (rows + shape.rows) * max(width, shape.length)
        fits = padded <= token_budget and (max_padding is None or padded - real - shape.tokens <= max_padding * padded)
        if plan and fits:
            plan[-1].append(index)
            rows, width, real = rows + shape.rows, max(width, shape.length), real + shape.tokens
        else:
            plan.append([index])
            rows, width, real = shape.rows, shape.length, shape.tokens
    return plan


def oversized(shapes: Sequence[Shape], token_budget: int | None) -> list[int]:
    """Indices of items that alone exceed the budget (they still run, one per micro-batch)."""
    if token_budget is None:
        return []
    return [i for i, s in enumerate(shapes) if s.tokens > token_budget]


def run_in_microbatches(shapes: Sequence[Shape], token_budget: int | None, run, lockstep: Callable | None = None) -> list:
    """Call ``run(indices)`` once per micro-batch and return its per-item results in item order.

    Args:
        shapes: one :class:`Shape` per item.
        token_budget: as :func:`plan_microbatches` (with at most :data:`MAX_PADDING` padding).
        run: ``run(indices) -> sequence`` with one result per index, in the order given.
        lockstep: ``Runtime.lockstep_plan``, when processes must all run as many forwards (FSDP2): the calls past
            this process's plan repeat its last micro-batch, and their results are dropped. None: once per micro-batch.

    Returns:
        ``len(shapes)`` results, ``results[i]`` for item ``i``.
    """
    results: list = [None] * len(shapes)
    plan = plan_microbatches(shapes, token_budget, MAX_PADDING)
    steps = lockstep(plan, plan[-1] if plan else []) if lockstep else [(micro, False) for micro in plan]
    for micro, padding in steps:
        output = run(micro)
        if not padding:
            for index, result in zip(micro, output):
                results[index] = result
    return results
