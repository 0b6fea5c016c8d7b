"""The warm-up (paper §6.4): supervised steps on labelled positives before EM. The generator reads the labelled
passages (shuffled, so their position carries no signal); the selector learns to rank them first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from dro_plugins.data.examples import Example
from dro_plugins.data.supervision import positive_candidates, supervised_permutation
from dro_plugins.errors import Interrupted
from dro_plugins.faults import crash_point
from dro_plugins.training import mstep
from dro_plugins.training.session import ROLES, Session


def warm_up(session: Session, train: Sequence[Example]) -> None:
    """``warmup.generator_steps`` then ``warmup.selector_steps`` optimizer steps, weight 1, on labelled questions.

    Raises:
        Interrupted: stop requested during the warm-up (nothing is saved; a new run starts over).
    """
    config = session.config
    k = config.selector.top_k
    labelled = [ex for ex in train if positive_candidates(ex)]
    if not labelled:
        session.log("warm-up skipped: no training question has a passage labelled has_answer/is_gold")
        return
    warm = config.warmup
    session.runtime.reshard(*(unit.model for unit in session.units.values()))
    # a role with its own learning rate (a pretrained retriever's query tower) keeps it in the warm-up too
    optimizers = {role: mstep.adamw(session.units[role], getattr(config, role).learning_rate or warm.learning_rate) for role in ROLES}
    session.activity = "warm-up"
    for offset, (role, steps) in enumerate((("generator", warm.generator_steps), ("selector", warm.selector_steps))):
        rng = random.Random(config.seed * 7919 + offset)
        if not steps:
            continue
        for _ in session.track(range(steps), f"warm-up {role}", steps):
            batch = rng.sample(labelled, min(warm.batch_size, len(labelled)))
            targets = [supervised_permutation(ex, k, rng) for ex in batch]
            if role == "generator":  # shuffled so the answer's position carries no signal
                permutations = torch.tensor([rng.sample(perm, len(perm)) for perm in targets])[:, None]
            else:
                permutations = torch.tensor(targets)[:, None]
            mstep.optimizer_step(session, role, batch, permutations, torch.ones(len(batch), 1), optimizers[role])
            crash_point("warmup")
            if session.stop_agreed():
                raise Interrupted("interrupted during warm-up; nothing saved yet, run again to start over")
