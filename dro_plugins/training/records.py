"""What a run records in its folder: the metrics lines (``metrics.jsonl``), the attribution files, the best units
(``selector/``, ``generator/``) and the report (``report.json``). Written here only, always atomically or by an
fsynced append.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from dro_plugins.config import DROConfig
from dro_plugins.errors import DROError
from dro_plugins.evaluation.attribution import question_ids
from dro_plugins.faults import crash_point
from dro_plugins.files import atomic_write_bytes, atomic_write_text
from dro_plugins.training.checkpoint import LoopState
from dro_plugins.training.run_folder import RunPaths

METRIC_KEYS = ("em", "f1", "recall", "answer_log_likelihood")


def metrics_line(result: dict, iteration: int, stage: str, state: LoopState, e_step: dict, throughput: dict) -> dict:
    """One ``metrics.jsonl`` line: validation scores, the E-step's diagnostics and the M-step's losses (after
    iteration 0), skipped batches and throughput.

    Args:
        result: :func:`dro_plugins.evaluation.predictions.summarize` of the validation predictions.
        stage: "dro", or "before_warmup" for iteration 0 measured before the warm-up.
        e_step: :func:`dro_plugins.training.estep.diagnostics` of the iteration ({} for iteration 0).
        throughput: summary per workload.
    """
    line = {"iteration": iteration, "stage": stage, **{k: result[k] for k in METRIC_KEYS}, "pool_recall": result["pool_recall"]}
    line["attribution"] = result["attribution"]
    if iteration > 0:
        line.update(e_step)
        line.update({f"{role}_loss": sum(v) / len(v) for role, v in state.losses.items() if v})
        line.update({f"{role}_losses": v for role, v in state.losses.items() if v})  # one per optimizer step
        line["nan_batches"] = state.nan_batches
    line["throughput"] = throughput
    return line


def write_records(paths: RunPaths, line: dict, predictions: list[dict]) -> None:
    """The iteration's attribution file (question ids per failure class) and its metrics line (appended, fsynced)."""
    attribution = paths.attribution(line["iteration"], line["stage"])
    attribution.parent.mkdir(exist_ok=True)
    atomic_write_text(attribution, json.dumps(question_ids(predictions), indent=1))
    with paths.metrics.open("a") as out:
        out.write(json.dumps(line) + "\n")
        out.flush()
        os.fsync(out.fileno())
    crash_point("metrics-appended")


def read_metrics(run_dir: Path) -> list[dict]:
    """The metrics lines of a run folder. A torn last line (a run killed mid-append, or one appending now) is left
    out: it is rewritten from the checkpoint on resume.

    Raises:
        DROError: the folder has no ``metrics.jsonl``, or a line before the last is damaged.
    """
    path = RunPaths(Path(run_dir)).metrics
    if not path.is_file():
        raise DROError(f"{run_dir}: no metrics.jsonl; pass the output_dir of a dro optimize run")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DROError(f"{path}:{number}: damaged line; run dro optimize again on the run's config to rewrite it from its checkpoint") from None
    return parsed


def read_report(run_dir: Path) -> dict | None:
    """``report.json`` of a finished run; None while the run has none (or is writing it)."""
    path = RunPaths(Path(run_dir)).report
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def rewrite_metrics(paths: RunPaths, history: list[dict]) -> None:
    """``metrics.jsonl`` as a checkpoint's history (on resume: lines past the checkpoint are dropped)."""
    atomic_write_text(paths.metrics, "".join(json.dumps(line) + "\n" for line in history))


def update_best(state: LoopState, line: dict, metric: str) -> bool:
    """Whether ``line`` is a new best (``metric``, ties broken by the answer log-likelihood); updates the state's
    best and stale counts (early stopping: ``dro.patience``)."""
    score = [line[metric], line["answer_log_likelihood"]]
    if score > state.best:  # lexicographic: the metric, then the answer log-likelihood
        state.best, state.best_iteration, state.stale_iterations = score, line["iteration"], 0
        return True
    state.stale_iterations += 1
    return False


def publish_best(paths: RunPaths, checkpoint: Path, tokenizers: dict) -> None:
    """Copy the checkpoint's best units, with their tokenizer, to the run folder's ``selector/`` and
    ``generator/``, file by file, so each folder loads on its own (an adapter with ``AutoPeftModelForCausalLM``,
    a query tower with ``SentenceTransformer``)."""
    for role, tokenizer in tokenizers.items():
        source = checkpoint / "best" / role
        if not source.is_dir():
            continue
        target = paths.adapter(role)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as written:
            tokenizer.save_pretrained(written)
            for folder in (Path(written), source):
                for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                    (target / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(target / file.relative_to(folder), file.read_bytes())
        crash_point("best-published")


def _scores(line: dict) -> dict:
    """A metrics line's validation scores (``pool_recall`` where recorded: runs before it was added lack it)."""
    return {k: line[k] for k in (*METRIC_KEYS, "pool_recall") if k in line}


def report(state: LoopState, dro: DROConfig) -> dict:
    """``report.json``: the best iteration's validation scores, iteration 0's, why the run stopped, the history."""
    dro_lines = [line for line in state.history if line["stage"] == "dro"]
    best = next(line for line in dro_lines if line["iteration"] == state.best_iteration)
    early = state.stale_iterations >= dro.patience
    return {
        "validation": _scores(best) | {"iteration": best["iteration"]},
        "baseline": _scores(dro_lines[0]),
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


def write_report(paths: RunPaths, content: dict) -> None:
    atomic_write_text(paths.report, json.dumps(content, indent=1))
