"""Curves of a run, drawn from its ``metrics.jsonl`` into ``<run>/plots/`` (matplotlib, an optional extra).

- ``quality.png``: validation EM, F1 and selection recall@k per EM iteration (iteration 0 = before DRO);
- ``e_step.png``: the E-step's effective sample size, importance-weight entropy and evidence per iteration;
- ``losses.png``: the M-step losses of the selector and the generator per optimizer step;
- ``attribution.png``: the share of validation questions per failure class (:mod:`dro_plugins.evaluation.attribution`),
  stacked, per iteration.
"""

from __future__ import annotations

import io
from pathlib import Path

from dro_plugins.evaluation.attribution import CLASSES
from dro_plugins.errors import DROError
from dro_plugins.faults import crash_point
from dro_plugins.files import atomic_write_bytes
from dro_plugins.training.records import read_metrics
from dro_plugins.training.run_folder import RunPaths

INSTALL_HINT = "pip install 'dro-plugins[report]' (matplotlib) to get them, then: dro report RUN"


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend.

    Raises:
        DROError: matplotlib is not installed (the message says how to get it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DROError(f"no plots: matplotlib is missing; {INSTALL_HINT}") from exc
    return plt


def save_figure(figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (a kill mid-write leaves the old file or none), release it,
    and return the path."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    pyplot().close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
    crash_point("plot-written")
    return path


def draw(run_dir: Path) -> list[Path]:
    """Write the PNGs of ``run_dir/plots/`` from its metrics and return their paths.

    Raises:
        DROError: matplotlib is not installed (the message says how to get it), or there is no metrics file.
    """
    plt = pyplot()
    lines = [line for line in read_metrics(run_dir) if line["stage"] == "dro"]
    folder = RunPaths(Path(run_dir)).plots
    folder.mkdir(exist_ok=True)
    iterations = [line["iteration"] for line in lines]
    written = []

    def save(figure, name: str) -> None:
        written.append(save_figure(figure, folder / name))

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("em", "EM"), ("f1", "F1"), ("recall", "selection recall@k")):
        axis.plot(iterations, [line[key] for line in lines], marker="o", label=label)
    axis.set(xlabel="EM iteration (0 = before DRO)", ylabel="validation", title="answer quality and selection recall")
    axis.set_xticks(iterations)
    axis.legend()
    save(figure, "quality.png")

    figure, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for axis, (key, label) in zip(axes, (("ess", "effective sample size"), ("weight_entropy", "weight entropy (nats)"), ("evidence", "evidence log p(y|x)"))):
        points = [(line["iteration"], line[key]) for line in lines if key in line]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axis.set(xlabel="EM iteration", title=label)
    save(figure, "e_step.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for role in ("selector", "generator", "retriever"):
        losses = [loss for line in lines for loss in line.get(f"{role}_losses", [])]
        if not losses:
            continue
        axis.plot(range(1, len(losses) + 1), losses, label=f"{role} loss")
    axis.set(xlabel="M-step optimizer step", ylabel="importance-weighted loss", title="M-step losses")
    axis.legend()
    save(figure, "losses.png")

    figure, axis = plt.subplots(figsize=(7.5, 4))
    bottom = [0.0] * len(lines)
    for name in CLASSES:
        shares = [line.get("attribution", {}).get(name, 0.0) for line in lines]
        axis.bar(iterations, shares, bottom=bottom, label=name.replace("_", " "))
        bottom = [b + s for b, s in zip(bottom, shares)]
    axis.set(xlabel="EM iteration", ylabel="share of validation questions", title="where answers fail", ylim=(0, 1))
    axis.set_xticks(iterations)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(figure, "attribution.png")
    return written
