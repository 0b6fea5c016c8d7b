"""The E-step (paper §4.2, Eq. 7 and 19): draw m permutations per question from the selector, score each by the
generator's log-likelihood of the gold answer, weigh them; and the samples file that carries them to the M-step,
``samples/iteration_NNN.jsonl``, written and read here only.

One line per training question, in train order::

    {"id", "permutations": [m][k] candidate indices, "selector_log_probs": [m], "log_likelihoods": [m],
     "weights": [m], "candidates": [...] (only when the selector re-retrieved the question's pool)}
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dro_plugins.data.examples import Example, Passage
from dro_plugins.data.labels import passage_has_answer
from dro_plugins.errors import Interrupted
from dro_plugins.evaluation.predictions import batches
from dro_plugins.faults import crash_point
from dro_plugins.files import atomic_write_text
from dro_plugins.selectors.base import question_seed
from dro_plugins.training.objective import effective_sample_size, evidence, importance_weights, uniform_weights, weight_entropy
from dro_plugins.training.session import Session


@dataclass(frozen=True)
class Samples:
    """One E-step's samples, in train order.

    Attributes:
        permutations: ``[N, m, k]`` candidate indices.
        weights: ``[N, m]`` importance weights (Eq. 7; each row sums to 1).
        log_likelihoods: ``[N, m]`` log p_G(y | x, d_z).
        questions: the N training questions with the pools they were sampled from.
    """

    permutations: torch.Tensor
    weights: torch.Tensor
    log_likelihoods: torch.Tensor
    questions: list[Example]


def write_samples(path: Path, lines: list[dict]) -> None:
    """Write the samples file (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))


def read_lines(path: Path) -> list[dict]:
    """The samples file's lines as dicts (format: the module docstring)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_samples(path: Path, train: Sequence[Example]) -> Samples:
    """The samples file as tensors, with each question's pool (a re-retrieved pool is read from the file)."""
    lines = read_lines(path)
    questions = [
        replace(ex, candidates=tuple(Passage(**p) for p in line["candidates"])) if "candidates" in line else ex
        for ex, line in zip(train, lines)
    ]
    return Samples(
        torch.tensor([line["permutations"] for line in lines]),
        torch.tensor([line["weights"] for line in lines]),
        torch.tensor([line["log_likelihoods"] for line in lines]),
        questions,
    )


def draw(session: Session, batch: Sequence[Example], seed: int, counted: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """m permutations per question ``[B, m, k]`` and their selector log-probs ``[B, m]``, by micro-batch.

    The sampling meter counts ``counted`` of the questions (the rest pad a lockstep share; None: all).
    """
    dro = session.config.dro

    def sample(micro: list[int]):
        drawn = session.selector.sample([batch[i] for i in micro], dro.num_samples, dro.temperature, seed)
        return list(zip(drawn.permutations, drawn.log_probs))

    shapes = [session.selector.shape(ex, dro.num_samples) for ex in batch]
    with session.measure("sampling", len(batch) if counted is None else counted), session.adapters_in_compute_dtype():
        drawn = session.in_microbatches("selector", batch, shapes, sample)
    return torch.stack([p for p, _ in drawn]), torch.stack([lp for _, lp in drawn])


@torch.no_grad()
def score(session: Session, batch: Sequence[Example], permutations: torch.Tensor, counted: int | None = None) -> torch.Tensor:
    """log p_G(y | x, d_z) ``[B, m]`` of each sampled permutation (CPU), by micro-batch; the scoring meter counts
    ``counted`` of the questions."""
    generator = session.generator
    with session.measure("scoring", len(batch) if counted is None else counted), session.adapters_in_compute_dtype():
        rows = session.in_microbatches(
            "generator", batch, session.shapes("generator", batch, permutations),
            lambda micro: generator.log_likelihood([batch[i] for i in micro], permutations[micro]).cpu(),
        )
    return torch.stack(rows)


def e_step(session: Session, train: Sequence[Example], iteration: int, path: Path) -> None:
    """Sample, score and weigh every training question (Eq. 7, or uniform weights) and write the samples file.

    Each process takes its share of the questions; the main process writes the gathered lines, in train order.

    Raises:
        Interrupted: stop requested; the E-step restarts on resume.
    """
    dro = session.config.dro
    seed = question_seed(session.config.seed, f"e-step {iteration}")  # each question's draws: (seed, iteration, id)
    weigh = importance_weights if dro.weighting == "importance" else uniform_weights
    session.activity = f"E-step of iteration {iteration}"
    lines, started = [], time.perf_counter()
    share, own = session.runtime.share(train)  # contiguous: gathered in order; padded in lockstep
    for given in session.track(batches(share, dro.batch_size), f"E-step {iteration}", len(share), size=len):
        batch = session.selector.candidates(given)  # a trainable retriever re-retrieves its pools
        counted = min(len(batch), own - len(lines))  # the meters count no padding
        permutations, log_probs = draw(session, batch, seed, counted)
        log_likelihoods = score(session, batch, permutations, counted)
        weights = weigh(log_likelihoods)
        for b, example in enumerate(batch):
            lines.append(
                {
                    "id": example.id,
                    "permutations": permutations[b].tolist(),
                    "selector_log_probs": log_probs[b].tolist(),
                    "log_likelihoods": log_likelihoods[b].tolist(),
                    "weights": weights[b].tolist(),
                }
                | ({"candidates": [asdict(p) for p in example.candidates]} if example is not given[b] else {})
            )
        crash_point("e-step")
        if session.stop_requested:  # each process on its own: E-step batches differ in number, and nothing is saved
            raise Interrupted(f"interrupted in E-step {iteration}; it restarts on resume")
    lines = session.runtime.gather(lines[:own])
    if session.runtime.is_main:
        write_samples(path, lines)
    session.runtime.wait()
    crash_point("samples-written")
    session.log(f"E-step {iteration}: {len(lines)} questions x {dro.num_samples} samples in {time.perf_counter() - started:.1f}s")


def diagnostics(samples: Samples) -> dict:
    """Means over questions of the E-step's effective sample size, weight entropy, evidence (log-mean-exp of the
    log-likelihoods), sample recall (a sampled selection holds an answer) and distinct samples."""
    has_answer = torch.tensor(
        [
            [[passage_has_answer(ex.candidates[i], ex.answers) for i in perm] for perm in perms]
            for ex, perms in zip(samples.questions, samples.permutations.tolist())
        ]
    )
    distinct = [len({tuple(p) for p in perms}) for perms in samples.permutations.tolist()]
    return {
        "ess": effective_sample_size(samples.weights).mean().item(),
        "weight_entropy": weight_entropy(samples.weights).mean().item(),
        "evidence": evidence(samples.log_likelihoods).mean().item(),
        "sample_recall": has_answer.any(-1).float().mean().item(),
        "distinct_samples": sum(distinct) / len(distinct),
    }
