"""The M-step (paper §4.3, Eq. 10 and 11): importance-weighted optimizer steps of the selector and the generator
over one E-step's samples, split into micro-batches under the token budget, with the NaN policy. With a retriever
unit (``retriever.train``) its query tower and tau take a third step on the same weighted lists,
``L_R = - sum_i w_i log p_R(z_i | x)`` (Plackett-Luce over the pool; README "Three trainable units").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from dro_plugins.data.examples import Example
from dro_plugins.distributed.fsdp import local
from dro_plugins.errors import Interrupted, TrainingError
from dro_plugins.faults import crash_point
from dro_plugins.training.checkpoint import LoopState
from dro_plugins.training.estep import Samples
from dro_plugins.training.objective import generator_loss, selector_loss
from dro_plugins.training.session import Session


def rng(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts``, so each iteration's batch order is the same on resume."""
    return torch.Generator().manual_seed(hash(parts) % (2**63))  # int tuples hash the same in every process


def adamw(unit, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over one unit's parameter groups (an adapter by name: with a shared base, never the other role's)."""
    return torch.optim.AdamW(unit.parameter_groups(lr), lr=lr, weight_decay=weight_decay)


def learning_rate(session: Session, role: str) -> float:
    """``role``'s M-step learning rate: its own (``selector.learning_rate``...) or ``dro.learning_rate``."""
    return getattr(session.config, role).learning_rate or session.config.dro.learning_rate


def optimizers(session: Session) -> dict[str, torch.optim.AdamW]:
    """The M-step's AdamW of each role (build them after the models are prepared: FSDP2 replaces the parameters)."""
    return {role: adamw(unit, learning_rate(session, role), session.config.dro.weight_decay) for role, unit in session.units.items()}


def set_learning_rates(session: Session, optimizers: dict) -> None:
    """Put the config's learning rates into optimizers whose state a checkpoint restored (with the old rates)."""
    for role, optimizer in optimizers.items():
        for group, configured in zip(optimizer.param_groups, session.units[role].parameter_groups(learning_rate(session, role))):
            group["lr"] = configured["lr"]


def optimizer_step(
    session: Session,
    role: str,
    batch: Sequence[Example],
    permutations: torch.Tensor,
    weights: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    state: LoopState | None = None,
) -> float | None:
    """One optimizer step of ``role`` on ``batch``: Eq. 10 (selector), Eq. 11 (generator), or the retriever's
    ``L_R = - sum_i w_i log p_R(z_i | x)`` (the same weighted objective as Eq. 10, scored by the retriever's
    Plackett-Luce distribution over the question's pool).

    ``batch`` is the step's global batch. With several processes each takes its contiguous share; its share is
    split into micro-batches of at most ``dro.max_tokens_per_microbatch`` padded tokens, each backpropagating
    ``sum(per-question losses) x P / len(batch)`` with gradient sync deferred to its last micro-batch, where
    DDP (or FSDP2's reduce-scatter) averages over the P processes: the update equals the one-process one. The
    lockstep rule (``Runtime.lockstep_plan``) pads with zero-loss calls: a process without a question in the step
    still joins the all-reduce, and in lockstep (FSDP2) every process runs as many micro-batches. A non-finite loss
    skips the whole step on every process (and aborts if it keeps happening: :func:`skip_non_finite`).

    Args:
        permutations: ``[B, m, k]``; weights: ``[B, m]`` importance weights (ones for the warm-up).
        state: the loop state, to count skipped batches (None in the warm-up).

    Returns:
        the step's loss (mean over the batch's questions), or None when the step was skipped.

    Raises:
        TrainingError: ``dro.max_nan_batches`` non-finite steps in a row.
    """
    model = {"selector": session.selector, "generator": session.generator, "retriever": session.retriever}[role]
    score = model.log_likelihood if role == "generator" else model.log_prob
    objective = generator_loss if role == "generator" else selector_loss
    runtime, unit = session.runtime, session.units[role]
    mine = list(runtime.shard(len(batch)))
    part, part_permutations, part_weights = [batch[i] for i in mine], permutations[mine], weights[mine]
    plan = session.plan(role, part, session.shapes(role, part, part_permutations)) if part else []
    scale = runtime.world_size / len(batch)
    calls = runtime.lockstep_plan(plan, plan[-1] if plan else None)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for n, (micro, padding) in enumerate(calls):
        synced = n == len(calls) - 1
        with nullcontext() if synced else runtime.no_sync(unit.prepared):
            if micro is None:  # no question here: the global batch's first, at zero weight
                loss = objective(weights[:1], score(batch[:1], permutations[:1])).sum() * 0.0
            else:
                loss = objective(part_weights[micro], score([part[i] for i in micro], part_permutations[micro])).sum()
                loss = loss * (0.0 if padding else scale)
            loss.backward()
        total = total.to(loss.device) + loss.detach()
    # the step's one host sync (and one all-reduce): a non-finite part anywhere makes the sum non-finite
    total = runtime.sum(total.item()) / runtime.world_size
    if not math.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        skip_non_finite(session, role, state)
        return None
    session.consecutive_nan = 0
    runtime.reshard(unit.model)  # clip and update the shards, never gathered copies
    torch.nn.utils.clip_grad_norm_(unit.parameters(), session.config.dro.max_grad_norm)
    optimizer.step()
    return total


def check_finite(session: Session, after: str, key: str, state: LoopState | None = None) -> None:
    """Stop before a broken model is validated, checkpointed or published: a trained role whose steps were all
    skipped as non-finite (``state.losses`` empty), or whose adapter holds a non-finite weight, on any process.

    Raises:
        TrainingError: naming the role, what came before, and the key to lower (a resume accepts the change).
    """
    roles = session.trained_roles()
    broken = [role for role in roles if state is not None and not state.losses.get(role)]
    broken += [role for role in roles if not all(bool(torch.isfinite(local(p)).all()) for p in session.units[role].parameters())]
    broken = sorted(set(session.runtime.gather(broken)))
    if broken:
        raise TrainingError(
            f"{' and '.join(broken)}: non-finite losses or weights after {after}; nothing was published. Lower {key} "
            "and run the same command again: it resumes from the last checkpoint with the new value"
        )


def skip_non_finite(session: Session, role: str, state: LoopState | None) -> None:
    """Count a skipped non-finite step; abort after ``dro.max_nan_batches`` in a row.

    Raises:
        TrainingError: the limit is reached.
    """
    session.consecutive_nan += 1
    if state is not None:
        state.nan_batches += 1
    session.log(f"{role}: non-finite loss, batch skipped ({session.consecutive_nan} in a row)")
    if session.consecutive_nan >= session.config.dro.max_nan_batches:
        raise TrainingError(
            f"{role} loss was NaN/inf for {session.consecutive_nan} batches in a row; "
            "lower dro.learning_rate (running the same command again resumes with it) or check the data "
            "(dro.max_nan_batches sets this limit)"
        )


def m_step(session: Session, samples: Samples, optimizers: dict, iteration: int, state: LoopState) -> None:
    """Importance-weighted maximisation of both models (Eq. 10 and 11), and of the retriever when it is a unit,
    over one E-step's samples.

    ``dro.m_step_epochs`` passes over the questions in a seeded order, ``dro.batch_size`` per optimizer step; a
    resumed M-step skips the ``state.batches_done`` it applied before.

    Raises:
        Interrupted: stop requested; a checkpoint of the batches done is due (the caller saves it).
    """
    dro = session.config.dro
    size = len(samples.questions)
    order = torch.cat([torch.randperm(size, generator=rng(session.config.seed, iteration, e)) for e in range(dro.m_step_epochs)])
    steps = [order[i : i + dro.batch_size] for i in range(0, len(order), dro.batch_size)]
    for unit in session.units.values():
        unit.model.train()
    session.activity = f"M-step of iteration {iteration}"
    for done, index in enumerate(session.track(steps, f"M-step {iteration}", len(order), size=len), start=1):
        if done <= state.batches_done:  # resumed: these batches were applied before the interrupt
            continue
        batch = [samples.questions[i] for i in index.tolist()]
        permutations, weights = samples.permutations[index], samples.weights[index]
        with session.measure("m_step", len(session.runtime.shard(len(batch)))):
            for role in session.trained_roles():
                loss = optimizer_step(session, role, batch, permutations, weights, optimizers[role], state)
                if loss is not None:
                    state.losses.setdefault(role, []).append(loss)
                crash_point(f"m-step-{role}")
        state.batches_done = done
        crash_point("m-step")
        if session.stop_agreed():
            raise Interrupted(f"interrupted in M-step {iteration} after {done}/{len(steps)} batches; checkpoint saved")
