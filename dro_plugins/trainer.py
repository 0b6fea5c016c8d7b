"""The DRO training loop (paper Algorithm 1): warm-up, then N iterations of E-step, M-step, validation.

Everything that writes to the run folder or decides when to stop lives here; the math is in
:mod:`dro_plugins.objective`.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dro_plugins.attribution import question_ids
from dro_plugins.batching import MAX_PADDING, Shape, oversized, plan_microbatches, run_in_microbatches
from dro_plugins.checkpoint import LoopState, find_checkpoint, load_checkpoint, save_checkpoint
from dro_plugins.config import RunConfig, dump_config
from dro_plugins.data import Example, Passage
from dro_plugins.errors import DROError, TrainingError
from dro_plugins.evaluation import batches, predict, summarize
from dro_plugins.faults import crash_point
from dro_plugins.files import atomic_write_bytes, atomic_write_text
from dro_plugins.generator import LMGenerator
from dro_plugins.lm import compute_dtype
from dro_plugins.metrics import passage_has_answer
from dro_plugins.objective import (
    effective_sample_size,
    evidence,
    generator_loss,
    importance_weights,
    selector_loss,
    uniform_weights,
    weight_entropy,
)
from dro_plugins.progress import Track, no_progress
from dro_plugins.reporting import NoReporter, Reporter, open_reporter, optimizer_steps
from dro_plugins.run import RunPaths
from dro_plugins.runtime import Runtime, is_out_of_memory
from dro_plugins.selectors.base import Selector, question_seed
from dro_plugins.supervision import positive_candidates, supervised_permutation
from dro_plugins.throughput import PHASES, PhaseMeter, combine_meters, measure


class Interrupted(DROError):
    """Training stopped on request (Ctrl-C) after saving a checkpoint."""


def _rng(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts``, so each phase's randomness is reproducible on resume."""
    return torch.Generator().manual_seed(hash(parts) % (2**63))  # int tuples hash the same in every process


def _adamw(unit, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over one unit's parameter groups (an adapter by name: with a shared base, never the other role's)."""
    return torch.optim.AdamW(unit.parameter_groups(lr), lr=lr, weight_decay=weight_decay)


class DROTrainer:
    """Runs one DRO optimisation and writes its run folder.

    Args:
        config: the run config.
        selector, generator: the two roles, each with a trainable unit (``.unit``): any selector kind
            (:class:`dro_plugins.selectors.base.Selector`) and an LM generator with its LoRA adapter.
        train, validation: questions.
        run_dir: the run folder.
        track: progress wrapper ``track(iterable, description, total)``; silent by default.
        log: receives one human-readable line per event.
    """

    def __init__(
        self,
        config: RunConfig,
        selector: Selector,
        generator: LMGenerator,
        train: Sequence[Example],
        validation: Sequence[Example],
        run_dir: Path,
        track: Track = no_progress,
        log: Callable[[str], None] = lambda _line: None,
        runtime: Runtime | None = None,
    ):
        self.config = config
        self.runtime = runtime or Runtime()
        self.selector = selector
        self.generator = generator
        self.train_set = list(train)
        self.validation = list(validation)
        self.paths = RunPaths(Path(run_dir))
        self.track = track
        self.log = log
        self.stop_requested = False
        self.units = {"selector": selector.unit, "generator": generator.unit}
        self._prepare()
        self.optimizers = {  # after _prepare: sharding (FSDP2) replaces the parameters
            role: _adamw(unit, getattr(config, role).learning_rate or config.dro.learning_rate, config.dro.weight_decay)
            for role, unit in self.units.items()
        }
        self.consecutive_nan = 0
        self.phase = "start"
        self.warned_oversized: set[str] = set()
        self.meters: dict[str, PhaseMeter] = {}  # this iteration's phases (dro_plugins.throughput)
        self.reporter: Reporter = NoReporter()  # fit() opens config.report_to
        self.tokens_planned = 0  # tokens of the questions' forward rows so far (Shape.tokens), for the meters

    def _prepare(self) -> None:
        """Wrap each distinct model for training in several processes (DDP, or FSDP2 in place; nothing with one).

        Both adapters are made trainable first: DDP registers the parameters that require a gradient when it wraps,
        and peft's ``set_adapter`` turns the inactive adapter's off. An optimizer step then leaves the other role's
        adapter unused, which the wrapper is told to expect (``Runtime``).
        """
        wrapped: dict[int, object] = {}
        for unit in self.units.values():
            for param in unit.parameters():
                param.requires_grad_(True)
        for unit in self.units.values():
            if id(unit.model) not in wrapped:
                wrapped[id(unit.model)] = self.runtime.prepare(unit.model)
            unit.prepared = wrapped[id(unit.model)]

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train (or resume) to the end and return the report; see :mod:`dro_plugins.run` for the files.

        Raises:
            Interrupted: Ctrl-C; a checkpoint was saved and ``dro optimize`` resumes from it.
            TrainingError: losses stayed NaN.
        """
        if self.runtime.is_main:
            self.reporter = open_reporter(self.config.report_to, self.paths.root, self.config.model_dump(mode="json"))
        try:
            return self._fit()
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            raise TrainingError(
                f"out of GPU memory in the {self.phase}; lower dro.max_tokens_per_microbatch "
                f"(now {self.config.dro.max_tokens_per_microbatch}), set selector.gradient_checkpointing and "
                "generator.gradient_checkpointing to true, or lower data.num_candidates / max_passage_words"
            ) from None
        finally:
            self.reporter.close()

    def _fit(self) -> dict:
        with self._stop_on_sigint():
            state = self._start_or_resume()
            while not self._finished(state):
                if state.phase == "warmup":
                    self._warm_up_phase(state)
                elif state.phase == "e_step":
                    self._e_step(state.iteration)
                    state.phase, state.batches_done, state.losses = "m_step", 0, {}
                    self._checkpoint(state)
                elif state.phase == "m_step":
                    self._m_step(state.iteration, state)
                    state.phase = "validate"
                    self._checkpoint(state)
                else:
                    new_best = self._record(state, self._validate(), state.iteration)
                    state.iteration, state.phase = state.iteration + 1, "e_step"
                    self._checkpoint(state, new_best)
        return self._write_report(state)

    def _finished(self, state: LoopState) -> bool:
        dro = self.config.dro
        return state.phase == "e_step" and (state.iteration > dro.iterations or state.stale_iterations >= dro.patience)

    def _start_or_resume(self) -> LoopState:
        """The saved loop state (metrics.jsonl and the best adapters made to follow it), or a fresh one.

        Raises:
            CorruptCheckpoint: a checkpoint exists but is damaged (the message offers --restart).
        """
        found = find_checkpoint(self.paths.checkpoint)
        if found is not None:
            state = load_checkpoint(found, self.units, self.optimizers)
            self.meters = {phase: PhaseMeter.from_dict(saved) for phase, saved in state.throughput.items()}
            if self.runtime.is_main:
                atomic_write_text(self.paths.metrics, "".join(json.dumps(line) + "\n" for line in state.history))
                self._publish_best(found)
            self.log(f"resuming at iteration {state.iteration}, phase {state.phase.replace('_', '-')}")
            self.runtime.wait()
            return state
        if self.runtime.is_main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.paths.config, dump_config(self.config))
            self.paths.metrics.unlink(missing_ok=True)
        torch.manual_seed(self.config.seed)
        self.runtime.wait()
        return LoopState()

    def _warm_up_phase(self, state: LoopState) -> None:
        """Iteration 0: validation before the warm-up (when there is one), the warm-up, then a checkpoint."""
        warm = self.config.warmup
        if warm.generator_steps or warm.selector_steps:
            self._record(state, self._validate(), 0, stage="before_warmup")
            self.warm_up()
        state.phase = "validate"
        self._checkpoint(state)

    # ---- warm-up (paper §6.4) -------------------------------------------------------------------

    def warm_up(self) -> None:
        """Supervised steps on labelled positives: the generator reads them, the selector learns to pick them.

        Runs ``warmup.generator_steps`` then ``warmup.selector_steps``; :meth:`fit` calls it on a fresh run.

        Raises:
            Interrupted: Ctrl-C during the warm-up (nothing is saved).
        """
        k = self.config.selector.top_k
        labelled = [ex for ex in self.train_set if positive_candidates(ex)]
        if not labelled:
            self.log("warm-up skipped: no training question has a passage labelled has_answer/is_gold")
            return
        warm = self.config.warmup
        # a role with its own learning rate (a pretrained retriever's query tower) keeps it in the warm-up too
        optimizers = {role: _adamw(unit, getattr(self.config, role).learning_rate or warm.learning_rate) for role, unit in self.units.items()}
        self.phase = "warm-up"
        for offset, (role, steps) in enumerate((("generator", warm.generator_steps), ("selector", warm.selector_steps))):
            rng = random.Random(self.config.seed * 7919 + offset)
            if not steps:
                continue
            for _ in self.track(range(steps), f"warm-up {role}", steps):
                batch = rng.sample(labelled, min(warm.batch_size, len(labelled)))
                targets = [supervised_permutation(ex, k, rng) for ex in batch]
                if role == "generator":  # shuffled so the answer's position carries no signal
                    perms = torch.tensor([rng.sample(perm, len(perm)) for perm in targets])[:, None]
                else:
                    perms = torch.tensor(targets)[:, None]
                self.step(role, batch, perms, torch.ones(len(batch), 1), optimizers[role])
                crash_point("warmup")
                if self.stop_requested:
                    raise Interrupted("interrupted during warm-up; nothing saved yet, run again to start over")

    # ---- E-step ---------------------------------------------------------------------------------

    def _e_step(self, iteration: int) -> None:
        """Sample m permutations per question and weight them by the generator (Eq. 7/19); cache to disk."""
        dro = self.config.dro
        seed = question_seed(self.config.seed, f"e-step {iteration}")  # each question's draws: (seed, iteration, id)
        weigh = importance_weights if dro.weighting == "importance" else uniform_weights
        self.paths.samples.mkdir(parents=True, exist_ok=True)
        self.phase = f"E-step of iteration {iteration}"
        lines, started = [], time.perf_counter()
        share, own = self.runtime.share(self.train_set)  # contiguous: gathered in order; padded in lockstep
        chunks = batches(share, dro.batch_size)
        for given in self.track(chunks, f"E-step {iteration}", len(share), size=len):
            batch = self.selector.candidates(given)  # a trainable retriever re-retrieves its pools
            counted = min(len(batch), own - len(lines))  # the meters count no padding
            permutations, log_probs = self._draw(batch, seed, counted)
            log_likelihoods = self._score(batch, permutations, counted)
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
            if self.stop_requested:
                raise Interrupted(f"interrupted in E-step {iteration}; it restarts on resume")
        lines = self.runtime.gather(lines[:own])
        if self.runtime.is_main:
            atomic_write_text(self._sample_file(iteration), "".join(json.dumps(line) + "\n" for line in lines))
        self.runtime.wait()
        crash_point("samples-written")
        self.log(f"E-step {iteration}: {len(lines)} questions x {dro.num_samples} samples in {time.perf_counter() - started:.1f}s")

    def _draw(self, batch: Sequence[Example], seed: int, counted: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """m permutations per question ``[B, m, k]`` and their selector log-probs ``[B, m]``, by micro-batch; the
        sampling meter counts ``counted`` of the questions (the rest pad a lockstep share; None: all)."""
        dro = self.config.dro

        def sample(micro: list[int]):
            drawn = self.selector.sample([batch[i] for i in micro], dro.num_samples, dro.temperature, seed)
            return list(zip(drawn.permutations, drawn.log_probs))

        with self._measure("sampling", len(batch) if counted is None else counted), self._adapters_in_compute_dtype():
            drawn = self._in_microbatches("selector", batch, [self.selector.shape(ex, dro.num_samples) for ex in batch], sample)
        return torch.stack([p for p, _ in drawn]), torch.stack([lp for _, lp in drawn])

    @torch.no_grad()
    def _score(self, batch: Sequence[Example], permutations: torch.Tensor, counted: int | None = None) -> torch.Tensor:
        """log p_G(y | x, d_z) ``[B, m]`` of each sampled permutation (CPU), by micro-batch; the scoring meter counts
        ``counted`` of the questions."""
        with self._measure("scoring", len(batch) if counted is None else counted), self._adapters_in_compute_dtype():
            rows = self._in_microbatches(
                "generator", batch, self._shapes("generator", batch, permutations),
                lambda micro: self.generator.log_likelihood([batch[i] for i in micro], permutations[micro]).cpu(),
            )
        return torch.stack(rows)

    @contextmanager
    def _adapters_in_compute_dtype(self):
        """Both adapters as copies in the base's compute dtype, for sampling, scoring and validation (no gradient)."""
        with ExitStack() as stack:
            for unit in self.units.values():
                stack.enter_context(unit.computing_in(compute_dtype(unit.model)))
            yield

    @contextmanager
    def _measure(self, phase: str, questions: int):
        """Time the enclosed work into this iteration's meter of ``phase``, with the tokens it planned."""
        planned = self.tokens_planned
        with measure(self.meters.setdefault(phase, PhaseMeter()), self.selector.device, questions, 0):
            yield
        self.meters[phase].tokens += self.tokens_planned - planned

    def _sample_file(self, iteration: int) -> Path:
        return self.paths.samples / f"iteration_{iteration:03d}.jsonl"

    def _load_samples(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Example]]:
        """Cached permutations ``[N, m, k]``, weights ``[N, m]``, log-likelihoods ``[N, m]`` and the training questions
        with the pools they were sampled from (re-retrieved ones are saved with the samples), in train order."""
        lines = [json.loads(line) for line in self._sample_file(iteration).read_text().splitlines()]
        questions = [
            replace(ex, candidates=tuple(Passage(**p) for p in line["candidates"])) if "candidates" in line else ex
            for ex, line in zip(self.train_set, lines)
        ]
        return (
            torch.tensor([line["permutations"] for line in lines]),
            torch.tensor([line["weights"] for line in lines]),
            torch.tensor([line["log_likelihoods"] for line in lines]),
            questions,
        )

    # ---- M-step ---------------------------------------------------------------------------------

    def _m_step(self, iteration: int, state: LoopState) -> None:
        """Importance-weighted maximisation of both models (Eq. 10 and 11) over the cached samples."""
        dro = self.config.dro
        permutations, weights, _, questions = self._load_samples(iteration)
        order = torch.cat([torch.randperm(len(self.train_set), generator=_rng(self.config.seed, iteration, e)) for e in range(dro.m_step_epochs)])
        steps = [order[i : i + dro.batch_size] for i in range(0, len(order), dro.batch_size)]
        for model in (self.selector.model, self.generator.model):
            model.train()
        self.phase = f"M-step of iteration {iteration}"
        done = 0
        for index in self.track(steps, f"M-step {iteration}", len(order), size=len):
            done += 1
            if done <= state.batches_done:  # resumed: these batches were applied before the interrupt
                continue
            batch = [questions[i] for i in index.tolist()]
            perms, w = permutations[index], weights[index]
            with self._measure("m_step", len(self.runtime.shard(len(batch)))):
                for role in ("selector", "generator"):
                    if getattr(dro, f"train_{role}"):
                        loss = self.step(role, batch, perms, w, self.optimizers[role], state)
                        if loss is not None:
                            state.losses.setdefault(role, []).append(loss)
            state.batches_done = done
            crash_point("m-step")
            if self.stop_requested:
                self._checkpoint(state)
                raise Interrupted(f"interrupted in M-step {iteration} after {done}/{len(steps)} batches; checkpoint saved")

    def step(
        self,
        role: str,
        batch: Sequence[Example],
        permutations: torch.Tensor,
        weights: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        state: LoopState | None = None,
    ) -> float | None:
        """One optimizer step of ``role`` on ``batch``: Eq. 10 (selector) or Eq. 11 (generator).

        ``batch`` is the step's global batch. With several processes each takes its contiguous share; its share is
        split into micro-batches of at most ``dro.max_tokens_per_microbatch`` padded tokens, each backpropagating
        ``sum(per-question losses) x P / len(batch)`` with gradient sync deferred to its last micro-batch, where
        DDP (or FSDP2's reduce-scatter) averages over the P processes: the update equals the one-process one. A process
        without a question in the step backpropagates a zero loss, so that every process joins the all-reduce; in
        lockstep (FSDP2) a process with fewer micro-batches than another adds zero-loss ones. A non-finite loss skips
        the whole step on every process (and aborts if it keeps happening).

        Args:
            permutations: ``[B, m, k]``; weights: ``[B, m]`` importance weights (ones for the warm-up).

        Returns:
            the step's loss (mean over the batch's questions), or None when the step was skipped.
        """
        score = self.selector.log_prob if role == "selector" else self.generator.log_likelihood
        objective = selector_loss if role == "selector" else generator_loss
        mine = list(self.runtime.shard(len(batch)))
        part, part_permutations, part_weights = [batch[i] for i in mine], permutations[mine], weights[mine]
        plan = self._plan(role, part, part_permutations) if part else []
        scale = self.runtime.world_size / len(batch)
        model = self.units[role].prepared
        micros = plan + [None] * (self.runtime.calls(max(len(plan), 1)) - len(plan))
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for n, micro in enumerate(micros):
            synced = n == len(micros) - 1
            with nullcontext() if synced else self.runtime.no_sync(model):
                if micro is None:  # nothing (left) here: a zero loss through the model, so this process joins in
                    loss = objective(weights[:1], score(batch[:1], permutations[:1])).sum() * 0.0
                else:
                    loss = objective(part_weights[micro], score([part[i] for i in micro], part_permutations[micro])).sum() * scale
                loss.backward()
            total = total.to(loss.device) + loss.detach()
        # the step's one host sync (and one all-reduce): a non-finite part anywhere makes the sum non-finite
        total = self.runtime.sum(total.item()) / self.runtime.world_size
        if not math.isfinite(total):
            optimizer.zero_grad(set_to_none=True)
            self._skip_nan(role, state)
            return None
        self.consecutive_nan = 0
        torch.nn.utils.clip_grad_norm_(self.units[role].parameters(), self.config.dro.max_grad_norm)
        optimizer.step()
        return total

    def _skip_nan(self, role: str, state: LoopState | None) -> None:
        self.consecutive_nan += 1
        if state is not None:
            state.nan_batches += 1
        self.log(f"{role}: non-finite loss, batch skipped ({self.consecutive_nan} in a row)")
        if self.consecutive_nan >= self.config.dro.max_nan_batches:
            raise TrainingError(
                f"{role} loss was NaN/inf for {self.consecutive_nan} batches in a row; "
                "lower dro.learning_rate or check the data (dro.max_nan_batches sets this limit)"
            )

    def _shapes(self, role: str, batch: Sequence[Example], permutations: torch.Tensor) -> list[Shape]:
        if role == "selector":
            return [self.selector.shape(ex, permutations.shape[1], permutations.shape[2]) for ex in batch]
        return [self.generator.shape(ex, p.tolist()) for ex, p in zip(batch, permutations)]

    def _plan(self, role: str, batch: Sequence[Example], permutations: torch.Tensor) -> list[list[int]]:
        shapes = self._shapes(role, batch, permutations)
        self._warn_oversized(role, batch, shapes)
        self.tokens_planned += sum(shape.tokens for shape in shapes)
        return plan_microbatches(shapes, self.config.dro.max_tokens_per_microbatch, MAX_PADDING)

    def _in_microbatches(self, role: str, batch: Sequence[Example], shapes: list[Shape], run) -> list:
        """``run(indices)`` per micro-batch of ``batch``; the per-question results in batch order."""
        self._warn_oversized(role, batch, shapes)
        self.tokens_planned += sum(shape.tokens for shape in shapes)
        return run_in_microbatches(shapes, self.config.dro.max_tokens_per_microbatch, run, self.runtime.calls)

    def _warn_oversized(self, role: str, batch: Sequence[Example], shapes: list[Shape]) -> None:
        budget = self.config.dro.max_tokens_per_microbatch
        for i in oversized(shapes, budget):
            key = f"{role}:{batch[i].id}"
            if key not in self.warned_oversized:
                self.warned_oversized.add(key)
                self.log(
                    f"warning: question '{batch[i].id}' needs {shapes[i].tokens} tokens in the {role}, more than "
                    f"dro.max_tokens_per_microbatch ({budget}); it runs alone (raise the budget if memory allows)"
                )

    # ---- validation, records, report ------------------------------------------------------------

    def _validate(self) -> dict:
        """Greedy selection and answers on the validation set (each process its share), summarized over all."""
        self.phase = "validation"
        share, own = self.runtime.share(self.validation)
        with self._measure("validation", own), self._adapters_in_compute_dtype():
            predictions = predict(
                self.selector, self.generator, share, self.config.eval_batch_size, self.track,
                self.config.dro.max_tokens_per_microbatch, self.runtime.calls,
            )
        crash_point("validation")
        return summarize(self.runtime.gather(predictions[:own]))

    def _record(self, state: LoopState, result: dict, iteration: int, stage: str = "dro") -> bool:
        """Append a metrics line (to the history and to metrics.jsonl); True when it is a new best F1 (stage "dro")."""
        line = {"iteration": iteration, "stage": stage, **{k: result[k] for k in ("em", "f1", "recall", "answer_log_likelihood")}}
        line["attribution"] = result["attribution"]
        if iteration > 0:
            line.update(self._e_step_diagnostics(iteration))
            line.update({f"{role}_loss": sum(v) / len(v) for role, v in state.losses.items() if v})
            line.update({f"{role}_losses": v for role, v in state.losses.items() if v})  # one per optimizer step
            line["nan_batches"] = state.nan_batches
        meters = combine_meters(self.runtime.gather([self.meters]))  # all processes' work, as one figure
        line["throughput"] = {phase: meters[phase].summary() for phase in PHASES if phase in meters}
        self.meters = {}
        state.history.append(line)
        if self.runtime.is_main:
            suffix = "" if stage == "dro" else f"_{stage}"
            attribution = self.paths.root / "attribution" / f"iteration_{iteration:03d}{suffix}.json"
            attribution.parent.mkdir(exist_ok=True)
            atomic_write_text(attribution, json.dumps(question_ids(result["predictions"]), indent=1))
            with self.paths.metrics.open("a") as out:
                out.write(json.dumps(line) + "\n")
                out.flush()
                os.fsync(out.fileno())
            crash_point("metrics-appended")
            self.reporter.log(line, first_step=sum(optimizer_steps(earlier) for earlier in state.history[:-1]))
        self.log(
            f"iteration {iteration} ({stage}): EM {line['em']:.3f}  F1 {line['f1']:.3f}  recall {line['recall']:.3f}"
            + (f"  ESS {line['ess']:.2f}/{self.config.dro.num_samples}" if "ess" in line else "")
        )
        if stage != "dro":
            return False
        score = [line[self.config.dro.metric_for_best], line["answer_log_likelihood"]]
        if score > state.best:  # lexicographic: the metric, then the answer log-likelihood
            state.best, state.best_iteration, state.stale_iterations = score, iteration, 0
            return True
        state.stale_iterations += 1
        return False

    def _publish_best(self, checkpoint: Path) -> None:
        """Copy the checkpoint's best units, with their tokenizer, to the run folder's ``selector/`` and
        ``generator/``, file by file, so each folder loads on its own (an adapter with ``AutoPeftModelForCausalLM``,
        a query tower with ``SentenceTransformer``)."""
        tokenizers = {"selector": self.selector.tokenizer, "generator": self.generator.tokenizer}
        for role in self.units:
            source = checkpoint / "best" / role
            if not source.is_dir():
                continue
            target = self.paths.adapter(role)
            target.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as written:
                tokenizers[role].save_pretrained(written)
                for folder in (Path(written), source):
                    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                        (target / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                        atomic_write_bytes(target / file.relative_to(folder), file.read_bytes())
            crash_point("best-published")

    def _e_step_diagnostics(self, iteration: int) -> dict:
        """Means over questions of ESS, weight entropy, evidence, sample recall and distinct samples."""
        permutations, weights, log_likelihoods, questions = self._load_samples(iteration)
        has_answer = torch.tensor(
            [
                [[passage_has_answer(ex.candidates[i], ex.answers) for i in perm] for perm in perms]
                for ex, perms in zip(questions, permutations.tolist())
            ]
        )
        distinct = [len({tuple(p) for p in perms}) for perms in permutations.tolist()]
        return {
            "ess": effective_sample_size(weights).mean().item(),
            "weight_entropy": weight_entropy(weights).mean().item(),
            "evidence": evidence(log_likelihoods).mean().item(),
            "sample_recall": has_answer.any(-1).float().mean().item(),
            "distinct_samples": sum(distinct) / len(distinct),
        }

    def _checkpoint(self, state: LoopState, new_best: bool = False) -> None:
        """Save the loop state; with a new best iteration, its adapters go into the checkpoint, then the run folder."""
        state.throughput = {phase: meter.to_dict() for phase, meter in self.meters.items()}
        # every process takes part (sharded weights are gathered); the main one writes
        save_checkpoint(self.paths.checkpoint, state, self.units, self.optimizers, new_best, write=self.runtime.is_main)
        if new_best and self.runtime.is_main:
            self._publish_best(self.paths.checkpoint)
        self.runtime.wait()

    def _write_report(self, state: LoopState) -> dict:
        dro_lines = [line for line in state.history if line["stage"] == "dro"]
        best = next(line for line in dro_lines if line["iteration"] == state.best_iteration)
        dro = self.config.dro
        early = state.stale_iterations >= dro.patience
        keys = ("em", "f1", "recall", "answer_log_likelihood")
        report = {
            "validation": {k: best[k] for k in keys} | {"iteration": best["iteration"]},
            "baseline": {k: dro_lines[0][k] for k in keys},
            "metric_for_best": dro.metric_for_best,
            "stopped": "early" if early else "completed",
            "stop_reason": (
                f"stopped early after iteration {dro_lines[-1]['iteration']}: no better validation {dro.metric_for_best} "
                f"(ties broken by answer log-likelihood) for {dro.patience} iterations (dro.patience)"
                if early
                else f"completed all {dro.iterations} iterations"
            ),
            "nan_batches": state.nan_batches,
            "history": state.history,
        }
        crash_point("report")
        if self.runtime.is_main:
            atomic_write_text(self.paths.report, json.dumps(report, indent=1))
        return report

    @contextmanager
    def _stop_on_sigint(self):
        """First Ctrl-C asks the loop to stop at the next batch boundary (and checkpoint); a second one kills."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(_signum, _frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log("stopping after this batch (Ctrl-C again to abort without saving)")

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

