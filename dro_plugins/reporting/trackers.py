"""Experiment trackers a run reports to (``report_to``, as in the Hugging Face Trainer): TensorBoard or Weights & Biases.

Each metrics line becomes scalars with the names of ``metrics.jsonl``, nested keys joined by ``/``
(``f1``, ``attribution/selection_miss``, ``throughput/m_step/questions_per_s``) at step = the EM iteration; the
M-step's per-optimizer-step losses become ``m_step/selector_loss`` and ``m_step/generator_loss`` at a step that counts
optimizer steps over the whole run. Lines of the stage before the warm-up are prefixed ``before_warmup/``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Protocol

from dro_plugins.errors import DROError
from dro_plugins.faults import crash_point
from dro_plugins.training.run_folder import RunPaths


class Reporter(Protocol):
    def log(self, line: dict, first_step: int = 0) -> None:
        """Report one metrics line; its per-step M-step losses start at optimizer step ``first_step`` of the run."""

    def replay(self, history: list[dict]) -> None:
        """On resume: the tracker's record made to hold exactly ``history`` (a checkpoint's lines), so every
        (tag, step) is logged once even when the interrupted run logged lines past the checkpoint."""

    def close(self) -> None:
        """Flush and release the tracker."""


def replay_lines(reporter: Reporter, history: list[dict]) -> None:
    """Log ``history`` in order, each line's optimizer steps continuing the previous lines'."""
    for number, line in enumerate(history):
        reporter.log(line, first_step=sum(optimizer_steps(earlier) for earlier in history[:number]))


def scalars(line: dict, prefix: str = "") -> dict[str, float]:
    """The numeric values of a metrics line, nested keys joined by ``/`` (lists and None left out)."""
    found: dict[str, float] = {}
    for key, value in line.items():
        if isinstance(value, dict):
            found.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
            found[f"{prefix}{key}"] = float(value)
    return found


def step_losses(line: dict) -> dict[str, list[float]]:
    """Per-optimizer-step M-step losses of a metrics line, by scalar name."""
    return {f"m_step/{role}_loss": line[f"{role}_losses"] for role in ("selector", "generator", "retriever") if line.get(f"{role}_losses")}


def optimizer_steps(line: dict) -> int:
    """M-step optimizer steps behind a metrics line (the longest of the roles' loss lists)."""
    return max((len(v) for v in step_losses(line).values()), default=0)


class NoReporter:
    def log(self, line: dict, first_step: int = 0) -> None:
        pass

    def replay(self, history: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter:
    """Event files in ``<run>/tensorboard/`` (``tensorboard --logdir <run>/tensorboard``)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(folder))

    def replay(self, history: list[dict]) -> None:
        """Rewrite the event files from ``history``: events past the checkpoint (logged before an interrupt) go, as
        TensorBoard's ``purge_step`` would do for one step axis (here there are two: iterations and optimizer steps)."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        replay_lines(self, history)

    def log(self, line: dict, first_step: int = 0) -> None:
        prefix = "" if line["stage"] == "dro" else f"{line['stage']}/"
        for name, value in scalars(line, prefix).items():
            self.writer.add_scalar(name, value, global_step=line["iteration"])
        for name, values in step_losses(line).items():
            for offset, value in enumerate(values):
                self.writer.add_scalar(name, value, global_step=first_step + offset)
        self.writer.flush()
        crash_point("tensorboard-written")

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A Weights & Biases run in ``<run>/wandb/``; ``WANDB_MODE=offline`` is respected, as wandb itself reads it."""

    def __init__(self, folder: Path, name: str, config: dict):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(folder), name=name, config=config, resume="allow")

    def log(self, line: dict, first_step: int = 0) -> None:
        prefix = "" if line["stage"] == "dro" else f"{line['stage']}/"
        self.run.log({"iteration": line["iteration"], **scalars(line, prefix)})

    def replay(self, history: list[dict]) -> None:
        """W&B cannot take back what it logged; lines past the checkpoint are logged again after a resume."""

    def close(self) -> None:
        self.run.finish()


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def open_reporter(report_to: str, run_dir: Path, config: dict) -> Reporter:
    """The tracker named by ``report_to``: ``auto`` is TensorBoard when installed, else none.

    Raises:
        DROError: the named tracker is not installed.
    """
    if report_to == "auto":
        report_to = "tensorboard" if installed("tensorboard") else "none"
    if report_to == "none":
        return NoReporter()
    if not installed(report_to):  # the tracker and its package share a name
        raise DROError(f"report_to: {report_to} needs the {report_to} package; pip install {report_to}, or set report_to: none")
    if report_to == "tensorboard":
        return TensorBoardReporter(RunPaths(run_dir).tensorboard)
    return WandbReporter(RunPaths(run_dir).wandb, run_dir.name, config)
