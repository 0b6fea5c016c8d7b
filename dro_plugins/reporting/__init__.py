"""What a run shows while and after it runs: experiment trackers (:mod:`.trackers`), per-phase throughput
(:mod:`.throughput`), plots (:mod:`.plots`) and the progress-bar hook (:mod:`.progress`).

``from dro_plugins.reporting import open_reporter`` (and the other names below) keeps working from before the
layout of folders.
"""

from dro_plugins.reporting.trackers import NoReporter, Reporter, TensorBoardReporter, WandbReporter, open_reporter, optimizer_steps

__all__ = ["NoReporter", "Reporter", "TensorBoardReporter", "WandbReporter", "open_reporter", "optimizer_steps"]
