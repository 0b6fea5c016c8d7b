"""What the parts of one training run share: the config, both models, the processes, the token budget of a
forward, the throughput meters, the log, and the stop flag that Ctrl-C or SIGTERM raise.

The E-step (:mod:`.estep`), M-step (:mod:`.mstep`), warm-up (:mod:`.warmup`) and validation take a
:class:`Session`; the loop (:mod:`.trainer`) owns one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from dro_plugins.config import RunConfig
from dro_plugins.data.examples import Example
from dro_plugins.distributed.runtime import Runtime
from dro_plugins.modeling.batching import MAX_PADDING, Shape, oversized, plan_microbatches, run_in_microbatches
from dro_plugins.modeling.causal_lm import compute_dtype
from dro_plugins.modeling.generator import LMGenerator
from dro_plugins.reporting.progress import Track, no_progress
from dro_plugins.reporting.throughput import WorkMeter, measure
from dro_plugins.selectors.base import Selector

ROLES = ("selector", "generator")


@dataclass
class Session:
    """One run's shared working state.

    Attributes:
        meters: this iteration's :class:`~dro_plugins.reporting.throughput.WorkMeter` per workload.
        tokens_planned: tokens of the forward rows planned so far (``Shape.tokens``), for the meters.
        activity: what runs now, e.g. "E-step of iteration 2" (for the out-of-memory message).
        stop_requested: set by the first Ctrl-C; the loop stops at the next batch boundary.
        consecutive_nan: optimizer steps skipped in a row for a non-finite loss (the NaN policy, :mod:`.mstep`).
    """

    config: RunConfig
    selector: Selector
    generator: LMGenerator
    runtime: Runtime = field(default_factory=Runtime)
    log: Callable[[str], None] = lambda _line: None
    track: Track = no_progress
    meters: dict[str, WorkMeter] = field(default_factory=dict)
    tokens_planned: int = 0
    activity: str = "start"
    stop_requested: bool = False
    consecutive_nan: int = 0
    warned_oversized: set[str] = field(default_factory=set)

    @property
    def retriever(self):
        """The retriever whose pools the LM selector ranks, trained as a third unit (``retriever.train``), or None."""
        return getattr(self.selector, "retriever", None)

    @property
    def units(self) -> dict:
        """The trainable unit of each role (``selector``, ``generator``, and ``retriever`` when there is one)."""
        units = {"selector": self.selector.unit, "generator": self.generator.unit}
        return units | ({"retriever": self.retriever.unit} if self.retriever is not None else {})

    def trained_roles(self) -> list[str]:
        """The roles the M-step updates: those with a unit and ``dro.train_<role>`` on."""
        return [role for role in self.units if getattr(self.config.dro, f"train_{role}")]

    def stop_agreed(self) -> bool:
        """Whether any process was asked to stop (Ctrl-C, or the SIGTERM a launcher sends every process at slightly
        different moments), so that all stop after the same optimizer step. A collective: call it where every
        process has run the same steps (M-step and warm-up batches, which are global)."""
        return self.runtime.any(self.stop_requested)

    @property
    def budget(self) -> int | None:
        """Padded tokens per forward (``dro.max_tokens_per_microbatch``); None: no limit."""
        return self.config.dro.max_tokens_per_microbatch

    def shapes(self, role: str, batch: Sequence[Example], permutations: torch.Tensor) -> list[Shape]:
        """Tokens each question needs in ``role`` with ``permutations`` ``[B, m, k]``."""
        if role in ("selector", "retriever"):
            model = self.selector if role == "selector" else self.retriever
            return [model.shape(ex, permutations.shape[1], permutations.shape[2]) for ex in batch]
        return [self.generator.shape(ex, p.tolist()) for ex, p in zip(batch, permutations)]

    def plan(self, role: str, batch: Sequence[Example], shapes: list[Shape]) -> list[list[int]]:
        """Micro-batches of ``batch`` under the token budget (warning once per question too large for it)."""
        self._warn_oversized(role, batch, shapes)
        self.tokens_planned += sum(shape.tokens for shape in shapes)
        return plan_microbatches(shapes, self.budget, MAX_PADDING)

    def in_microbatches(self, role: str, batch: Sequence[Example], shapes: list[Shape], run) -> list:
        """``run(indices)`` per micro-batch of ``batch``, in lockstep with the other processes; results in batch order."""
        self._warn_oversized(role, batch, shapes)
        self.tokens_planned += sum(shape.tokens for shape in shapes)
        return run_in_microbatches(shapes, self.budget, run, self.runtime.lockstep_plan)

    def _warn_oversized(self, role: str, batch: Sequence[Example], shapes: list[Shape]) -> None:
        for i in oversized(shapes, self.budget):
            key = f"{role}:{batch[i].id}"
            if key not in self.warned_oversized:
                self.warned_oversized.add(key)
                self.log(
                    f"warning: question '{batch[i].id}' needs {shapes[i].tokens} tokens in the {role}, more than "
                    f"dro.max_tokens_per_microbatch ({self.budget}); it runs alone (raise the budget if memory allows)"
                )

    @contextmanager
    def measure(self, workload: str, questions: int):
        """Time the enclosed work into this iteration's meter of ``workload``, with the tokens it planned."""
        planned = self.tokens_planned
        with measure(self.meters.setdefault(workload, WorkMeter()), self.selector.device, questions, 0):
            yield
        self.meters[workload].tokens += self.tokens_planned - planned

    @contextmanager
    def adapters_in_compute_dtype(self):
        """Both adapters as copies in the base's compute dtype, for sampling, scoring and validation (no gradient)."""
        with ExitStack() as stack:
            for unit in self.units.values():
                stack.enter_context(unit.computing_in(compute_dtype(unit.model)))
            yield


def memory_advice(config: RunConfig) -> str:
    """What to lower after an out-of-memory error, naming only keys this config has (a retriever selector has no
    ``gradient_checkpointing`` or ``max_passage_words``)."""
    keys = [f"lower dro.max_tokens_per_microbatch (now {config.dro.max_tokens_per_microbatch})"]
    roles = [role for role in ROLES if hasattr(getattr(config, role), "gradient_checkpointing")]
    keys.append(" and ".join(f"{role}.gradient_checkpointing" for role in roles) + " set to true")
    words = [f"{role}.max_passage_words" for role in ROLES if hasattr(getattr(config, role), "max_passage_words")]
    return ", ".join(keys + [f"or lower data.num_candidates / {' / '.join(words)}"])
