"""The DRO loop (paper Algorithm 1): warm-up, then N iterations of E-step, M-step and validation, as a resumable
state machine over :class:`~dro_plugins.training.checkpoint.LoopState`.

The steps themselves live beside it: :mod:`.estep` (sampling, scoring, weights, the samples file), :mod:`.mstep`
(weighted optimizer steps, micro-batches, the NaN policy), :mod:`.warmup`, :mod:`.records` (metrics, attribution,
best units, report); the math in :mod:`.objective`; every path in :mod:`.run_folder`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dro_plugins.config import RunConfig, dump_config
from dro_plugins.data.examples import Example
from dro_plugins.distributed.device import is_out_of_memory
from dro_plugins.distributed.runtime import Runtime
from dro_plugins.errors import Interrupted, TrainingError
from dro_plugins.evaluation.predictions import predict, summarize
from dro_plugins.faults import crash_point
from dro_plugins.files import atomic_write_text
from dro_plugins.modeling.generator import LMGenerator
from dro_plugins.reporting.progress import Track, no_progress
from dro_plugins.reporting.throughput import WORKLOADS, WorkMeter, combine_meters
from dro_plugins.reporting.trackers import NoReporter, Reporter, open_reporter, optimizer_steps
from dro_plugins.selectors.base import Selector
from dro_plugins.training import estep, mstep, records
from dro_plugins.training.checkpoint import LoopState, find_checkpoint, load_checkpoint, save_checkpoint
from dro_plugins.training.run_folder import RunPaths
from dro_plugins.training.session import Session, memory_advice
from dro_plugins.training.signals import stop_on_signals
from dro_plugins.training.warmup import warm_up

__all__ = ["DROTrainer", "Interrupted"]


class DROTrainer:
    """Runs one DRO optimisation and writes its run folder.

    Args:
        config: the resolved run config (written to the run folder as it is).
        selector, generator: the two roles, each with a trainable unit (``.unit``): any selector kind
            (:class:`dro_plugins.selectors.base.Selector`) and an LM generator with its LoRA adapter. An LM selector
            holding a retriever (``selector.retriever``, ``retriever.train``) brings the third unit.
        train, validation: questions.
        run_dir: the run folder.
        track: progress wrapper ``track(iterable, description, total)``; silent by default.
        log: receives one human-readable line per event.
        runtime: the processes (one by default).
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
        self.session = Session(config, selector, generator, runtime or Runtime(), log, track)
        self.runtime, self.selector, self.generator = self.session.runtime, selector, generator
        self.train_set, self.validation = list(train), list(validation)
        self.paths = RunPaths(Path(run_dir))
        self.units = self.session.units
        self._prepare()
        self.runtime.reshard(*(unit.model for unit in self.units.values()))
        self.optimizers = mstep.optimizers(self.session)  # after _prepare: sharding (FSDP2) replaces the parameters
        self.reporter: Reporter = NoReporter()  # fit() opens config.report_to

    def _prepare(self) -> None:
        """Wrap each distinct model for training in several processes (DDP, or FSDP2 in place; nothing with one),
        and hand each unit the lockstep hook (``Runtime.sync``).

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
            unit.prepared, unit.sync = wrapped[id(unit.model)], self.runtime.sync

    def step(self, role: str, batch, permutations, weights, optimizer, state: LoopState | None = None) -> float | None:
        """One optimizer step of ``role`` (:func:`dro_plugins.training.mstep.optimizer_step`)."""
        return mstep.optimizer_step(self.session, role, batch, permutations, weights, optimizer, state)

    def warm_up(self) -> None:
        """The supervised warm-up (:func:`dro_plugins.training.warmup.warm_up`)."""
        warm_up(self.session, self.train_set)

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train (or resume) to the end and return the report (:func:`dro_plugins.training.records.report`).

        Raises:
            Interrupted: Ctrl-C or SIGTERM; a checkpoint was saved and ``dro optimize`` resumes from it.
            TrainingError: losses stayed NaN, or the GPU ran out of memory (the message says what to lower).
        """
        if self.runtime.is_main:
            self.reporter = open_reporter(self.config.report_to, self.paths.root, self.config.model_dump(mode="json"))
        try:
            return self._fit()
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            raise TrainingError(f"out of GPU memory in the {self.session.activity}; {memory_advice(self.config)}") from None
        finally:
            self.reporter.close()

    def _fit(self) -> dict:
        with stop_on_signals(self.session):
            state = self._start_or_resume()
            while not self._finished(state):
                if state.phase == "warmup":
                    self._warm_up_phase(state)
                elif state.phase == "e_step":
                    estep.e_step(self.session, self.train_set, state.iteration, self.paths.samples_file(state.iteration))
                    state.phase, state.batches_done, state.losses = "m_step", 0, {}
                    self._checkpoint(state)
                elif state.phase == "m_step":
                    self._m_step(state)
                    state.phase = "validate"
                    self._checkpoint(state)
                else:
                    new_best = self._record(state, state.iteration)
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
            mstep.set_learning_rates(self.session, self.optimizers)  # a resume may lower them (after a NaN stop)
            self.session.meters = {name: WorkMeter.from_dict(saved) for name, saved in state.throughput.items()}
            if self.runtime.is_main:
                atomic_write_text(self.paths.config, dump_config(self.config))  # a resume may change some keys
                records.rewrite_metrics(self.paths, state.history)
                self.reporter.replay(state.history)
                records.publish_best(self.paths, found, self._tokenizers())
            self.session.log(f"resuming at iteration {state.iteration}, phase {state.phase.replace('_', '-')}")
            self.runtime.wait()
            return state
        if self.runtime.is_main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.paths.config, dump_config(self.config))
            self.paths.metrics.unlink(missing_ok=True)
            self.reporter.replay([])  # a run killed before its first checkpoint may have logged events
        torch.manual_seed(self.config.seed)
        self.runtime.wait()
        return LoopState()

    def _warm_up_phase(self, state: LoopState) -> None:
        """Iteration 0: validation before the warm-up (when there is one), the warm-up, then a checkpoint."""
        warm = self.config.warmup
        if warm.generator_steps or warm.selector_steps:
            self._record(state, 0, stage="before_warmup")
            self.warm_up()
            mstep.check_finite(self.session, "the warm-up", "warmup.learning_rate")
        state.phase = "validate"
        self._checkpoint(state)

    def _m_step(self, state: LoopState) -> None:
        samples = estep.read_samples(self.paths.samples_file(state.iteration), self.train_set)
        try:
            mstep.m_step(self.session, samples, self.optimizers, state.iteration, state)
        except Interrupted:
            self._checkpoint(state)  # the batches applied so far are kept
            raise
        mstep.check_finite(self.session, f"M-step {state.iteration}", "dro.learning_rate", state)

    def validate(self) -> dict:
        """Greedy selection and answers on the validation set (each process its share), summarized over all."""
        self.session.activity = "validation"
        share, own = self.runtime.share(self.validation)
        with self.session.measure("validation", own), self.session.adapters_in_compute_dtype():
            predictions = predict(
                self.session.selector, self.session.generator, share, self.config.eval_batch_size, self.session.track,
                self.session.budget, self.runtime.lockstep_plan,
            )
        crash_point("validation")
        return summarize(self.runtime.gather(predictions[:own]))

    def _record(self, state: LoopState, iteration: int, stage: str = "dro") -> bool:
        """Validate, then record the iteration (history, metrics.jsonl, attribution, trackers); True when it is a new
        best (stage "dro" only)."""
        result = self.validate()
        e_step = estep.diagnostics(estep.read_samples(self.paths.samples_file(iteration), self.train_set)) if iteration else {}
        meters = combine_meters(self.runtime.gather([self.session.meters]))  # all processes' work, as one figure
        self.session.meters = {}
        throughput = {name: meters[name].summary() for name in WORKLOADS if name in meters}
        line = records.metrics_line(result, iteration, stage, state, e_step, throughput)
        if any(math.isnan(line[key]) for key in records.METRIC_KEYS):  # never recorded, published or reported
            raise TrainingError(f"validation after iteration {iteration} scored NaN; lower dro.learning_rate and run again (it resumes)")
        state.history.append(line)
        if self.runtime.is_main:
            records.write_records(self.paths, line, result["predictions"])
            self.reporter.log(line, first_step=sum(optimizer_steps(earlier) for earlier in state.history[:-1]))
        self.session.log(
            f"iteration {iteration} ({stage}): EM {line['em']:.3f}  F1 {line['f1']:.3f}  recall {line['recall']:.3f}"
            + (f"  pool recall {line['pool_recall']:.3f}" if self.config.retriever_role else "")
            + (f"  ESS {line['ess']:.2f}/{self.config.dro.num_samples}" if "ess" in line else "")
        )
        return stage == "dro" and records.update_best(state, line, self.config.dro.metric_for_best)

    def _tokenizers(self) -> dict:
        """Each unit's tokenizer, saved beside its best weights (by role)."""
        retriever = {"retriever": self.session.retriever.tokenizer} if self.session.retriever is not None else {}
        return {"selector": self.session.selector.tokenizer, "generator": self.session.generator.tokenizer} | retriever

    def _checkpoint(self, state: LoopState, new_best: bool = False) -> None:
        """Save the loop state; with a new best iteration, its adapters go into the checkpoint, then the run folder."""
        state.throughput = {name: meter.to_dict() for name, meter in self.session.meters.items()}
        self.runtime.reshard(*(unit.model for unit in self.units.values()))
        # every process takes part (sharded weights are gathered); the main one writes
        save_checkpoint(self.paths.checkpoint, state, self.units, self.optimizers, new_best, write=self.runtime.is_main)
        if new_best and self.runtime.is_main:
            records.publish_best(self.paths, self.paths.checkpoint, self._tokenizers())
        self.runtime.wait()

    def _write_report(self, state: LoopState) -> dict:
        report = records.report(state, self.config.dro)
        crash_point("report")
        if self.runtime.is_main:
            records.write_report(self.paths, report)
        return report
