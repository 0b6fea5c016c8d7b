"""What every selector kind shares: the ``Selector`` protocol, the trainable-unit interface, and seeded draws.

The EM loop (:mod:`dro_plugins.training.trainer`), checkpoints and serving see only these. Two kinds implement them:
:class:`dro_plugins.selectors.lm.LMSelector` (the paper's generative list-wise selector, a causal LM with LoRA)
and :class:`dro_plugins.selectors.retriever.RetrieverSelector` (a bi-encoder retriever with a Plackett-Luce
distribution over its scores). DRO's E- and M-steps need only an exact, differentiable ``log p(z | x)`` and exact
samples from it (paper Eq. 7 and 10), which both give.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dro_plugins.modeling.batching import Shape
from dro_plugins.data.examples import Example


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


class TrainableUnit(Protocol):
    """One role's trainable part, whatever it is (a LoRA adapter on a shared base, a query encoder).

    Attributes:
        model: the ``torch.nn.Module`` whose forward the role's differentiable scores run through.
        prepared: the data-parallel wrapper of ``model`` (``Runtime.prepare``), or ``model`` itself.
    """

    model: torch.nn.Module
    prepared: torch.nn.Module

    def activate(self) -> None:
        """Make this unit's weights the ones the model computes with (switch a shared base's adapter)."""

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The unit's trainable parameters by name; an optimizer holds exactly these."""

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups (``torch.optim`` format), the unit's main weights at ``lr``."""

    def scoring_model(self) -> torch.nn.Module:
        """``prepared`` when a gradient flows (the wrapper's hooks must see it), else ``model``."""

    def computing_in(self, dtype: torch.dtype) -> AbstractContextManager[None]:
        """Inference in ``dtype`` for the enclosed block (a no-op where it does not pay)."""

    def save(self, folder: Path | None) -> None:
        """Write everything needed to restore the unit (and to serve it) into ``folder``. Every process calls it;
        those with ``folder`` None write nothing but take part in gathering sharded (FSDP2) weights."""

    def load(self, folder: Path) -> None:
        """Restore the unit from a folder :meth:`save` wrote (any device or dtype).

        Raises:
            ValueError: the folder does not fit this unit (another base model or settings).
        """


class Selector(Protocol):
    """p_S(z | x) over top-k permutations z of a question's candidates (paper §4).

    Attributes:
        top_k: k, the number of candidates a permutation picks.
        model: the module the selector computes with (put in train or eval mode by the trainer).
        unit: the trainable unit the M-step updates (Eq. 10).
        tokenizer: saved beside the best weights, so the run's selector folder loads on its own.
    """

    top_k: int
    model: torch.nn.Module
    unit: TrainableUnit
    tokenizer: object

    @property
    def device(self) -> torch.device: ...

    def shape(self, example: Example, num_samples: int, top_k: int | None = None) -> Shape:
        """Tokens one question needs when its m permutations are sampled or scored (for micro-batching)."""

    def sample(self, batch: Sequence[Example], num_samples: int, temperature: float = 1.0, rng=None) -> SampleBatch:
        """m exact draws per question, seeded per question; no gradient."""

    def log_prob(self, batch: Sequence[Example], permutations: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``[B, m]`` differentiable log p_S(z | x) of ``permutations`` ``[B, m, k]``."""

    def select(self, batch: Sequence[Example], k: int | None = None) -> list[list[int]]:
        """The most likely top-k per question (greedy), for inference."""

    def candidates(self, batch: Sequence[Example]) -> list[Example]:
        """The questions with the candidate pool this selector ranks now (re-retrieved by a trainable retriever
        with an index; ``batch`` unchanged otherwise)."""


def question_seed(seed: int, question_id: str) -> int:
    """A 63-bit seed from a run-level seed and a question id, the same in every process and platform."""
    digest = hashlib.blake2b(f"{seed}:{question_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_seed(rng: torch.Generator | int | None) -> int:
    """An int seed: ``rng`` itself, one drawn from a CPU generator, or one drawn from the global torch RNG (drawing
    rather than re-seeding, so the caller's seeding stays in effect)."""
    if isinstance(rng, int):
        return rng
    return int(torch.randint(2**62, (), generator=rng).item())


def gumbel_noise(seed: int, *shape: int) -> torch.Tensor:
    """Standard Gumbel noise of ``shape`` (float32) from a CPU generator seeded with ``seed``.

    ``argmax(log p + g)`` over a set of allowed choices is an exact draw from ``p`` (the Gumbel-max trick); the
    top-k of ``log p + g`` is an exact draw without replacement (Gumbel top-k, Kool et al., 2019).
    """
    uniform = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(uniform.clamp(1e-300, 1 - 1e-16))).float()

