"""The ``dro`` command line: optimize, validate and evaluate DRO runs."""

from __future__ import annotations

import errno
import os
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from dro_plugins.evaluation.attribution import CLASSES
from dro_plugins.config import RunConfig, config_keys, load_config
from dro_plugins.data.examples import load_run_data
from dro_plugins.errors import DROError
from dro_plugins.reporting.progress import no_progress
from dro_plugins.reporting.throughput import WORKLOADS
from dro_plugins.training.run_folder import RunPaths

app = typer.Typer(
    help="Fine-tune a RAG pipeline's selector and generator end to end with DRO (arXiv 2505.03075).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set dro.num_samples=4 (repeatable)."),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-run-code",
        help="Let the run folder's config run code (a LlamaIndex factory, trust_remote_code). Off: a run folder that asks for it is refused; only pass it for a run you or someone you trust wrote.",
    ),
]


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def _fail(message: str, code: int = 2):
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


DEBUG = {"on": False}
# errors of the file system a user fixes (permissions, a full disk, a file where a folder should be)
USER_OS_ERRORS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
    errno.ENAMETOOLONG, errno.ELOOP,
}
OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space, then run again (it resumes)",
    errno.EDQUOT: "free disk space, then run again (it resumes)",
    errno.ENAMETOOLONG: "use a shorter file or folder name",
    errno.ELOOP: "fix the symbolic link (it points to itself)",
    errno.ENOTDIR: "a file stands where a folder is needed; pick another path",
}


@contextmanager
def _reported(log_folder: Path | None = None):
    """Every failure as one line: exit 2 for a problem the user fixes, 1 for an internal error (traceback to a log).

    ``--debug`` shows the full traceback of internal errors instead.
    """
    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except DROError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS or DEBUG["on"]:
            raise
        where = str(exc.filename or "the run folder")[:200]
        fix = OS_ERROR_FIXES.get(exc.errno, "fix the folder's permissions, then run again (it resumes)")
        _fail(f"cannot use {where}: {exc.strerror}; {fix}")
    except Exception as exc:  # noqa: BLE001 - anything else is our bug: one line, traceback in a log file
        if DEBUG["on"]:
            raise
        message = " ".join(str(exc).split())[:200]
        log = _write_error_log(log_folder, traceback.format_exc())
        where = f"the traceback is in {log}" if log else "rerun with --debug for the traceback"
        _fail(f"internal error ({type(exc).__name__}: {message}); {where}; please report it", code=1)


def _write_error_log(folder: Path | None, text: str) -> Path | None:
    """The traceback into the run folder (else the temp folder), never through a symbolic link or into a folder
    standing at its name; None when it cannot be written."""
    folder = folder if folder is not None and folder.is_dir() and not folder.is_symlink() else Path(tempfile.gettempdir())
    log = RunPaths(folder).error_log
    try:
        descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    return log


def _version(value: bool) -> None:
    if value:
        console.print(f"dro-plugins {package_version('dro-plugins')}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks of internal errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """Fine-tune a RAG pipeline's selector and generator end to end with DRO (arXiv 2505.03075)."""
    DEBUG["on"] = debug


class _RateColumn(ProgressColumn):
    """Items per second of a task, in the task's unit ("questions" for E-step, M-step and validation)."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:.1f} {unit}/s" if task.speed else "", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _tracker(progress: Progress):
    """Progress bars that stay on screen when done; without a terminal, one line per finished phase with its rate.

    ``track(iterable, description, total, size=None)``: with ``size`` (item -> questions in it), ``total`` counts
    questions and the bar shows questions/s; otherwise it counts items.
    """

    def track(iterable, description: str, total: int, size=None):
        unit = "it" if size is None else "q"
        task = progress.add_task(description, total=total, unit=unit)
        started = time.perf_counter()
        for item in iterable:
            yield item
            progress.advance(task, 1 if size is None else size(item))
        if not progress.console.is_terminal:
            seconds = time.perf_counter() - started
            line = f"{description}: {total} {'questions' if size else 'steps'} in {seconds:.1f}s ({total / max(seconds, 1e-9):.1f}/s)"
            progress.console.print(line, highlight=False)

    return track


def _history_table(history: list[dict], num_samples: int) -> Table:
    """Validation per EM iteration; narrow enough for an 80-column terminal."""
    three_units = any("retriever_loss" in line for line in history)  # retriever.train: its pool and loss too
    table = Table(title="validation per EM iteration (log-lik: answer log-likelihood, nats)", padding=(0, 0) if three_units else (0, 1))
    for column in ("it.", "stage", "EM", "F1", "recall", *(("pool",) if three_units else ()), "log-lik", "ESS", "S loss", "G loss"):  # noqa: E501
        table.add_column(column, justify="right")
    if three_units:
        table.add_column("R loss", justify="right")
    for line in history:
        digits = "{:.2f}" if three_units else "{:.3f}"  # (two more columns in 80)
        cell = lambda key, fmt=digits: fmt.format(line[key]) if key in line else "-"  # noqa: E731
        retriever = [cell("retriever_loss", "{:.2f}")] if three_units else []
        table.add_row(
            str(line["iteration"]),
            "before" if line["stage"] == "before_warmup" else "",
            cell("em"),
            cell("f1"),
            cell("recall"),
            *([cell("pool_recall", "{:.2f}")] if three_units else []),
            cell("answer_log_likelihood", "{:.1f}" if three_units else "{:.2f}"),
            cell("ess", "{:.1f}/" + str(num_samples)),
            cell("selector_loss", "{:.2f}"),
            cell("generator_loss", "{:.2f}"),
            *retriever,
        )
    return table


def _throughput_table(history: list[dict]) -> Table | None:
    """Per-phase throughput summed over the DRO iterations of this history; None when there is none."""
    totals: dict[str, dict] = {}
    for line in history:
        if line["stage"] != "dro":
            continue
        for phase, figures in line.get("throughput", {}).items():
            total = totals.setdefault(phase, {"seconds": 0.0, "questions": 0.0, "tokens": 0.0, "peak": None})
            total["seconds"] += figures["seconds"]
            total["questions"] += figures["questions_per_s"] * figures["seconds"]
            total["tokens"] += (figures["tokens_per_s"] or 0) * figures["seconds"]
            if figures["peak_memory_gib"] is not None:
                total["peak"] = max(total["peak"] or 0.0, figures["peak_memory_gib"])
    if not totals:
        return None
    table = Table(title="throughput per phase, all DRO iterations")
    for column in ("phase", "seconds", "questions/s", "tokens/s", "peak GPU GiB"):
        table.add_column(column, justify="right")
    for phase, total in sorted(totals.items(), key=lambda item: WORKLOADS.index(item[0])):
        rate = 1 / total["seconds"] if total["seconds"] > 0 else 0.0
        table.add_row(
            phase.replace("_", "-"), f"{total['seconds']:.1f}", f"{total['questions'] * rate:.2f}",
            f"{total['tokens'] * rate:,.0f}" if total["tokens"] else "-", "-" if total["peak"] is None else f"{total['peak']:.1f}",
        )
    return table


def _attribution_table(history: list[dict]) -> Table:
    """Share of validation questions per failure class (dro_plugins.evaluation.attribution), iteration 0 against the last."""
    lines = [line for line in history if line["stage"] == "dro" and "attribution" in line]
    first, last = lines[0], lines[-1]
    table = Table(title="where validation answers fail (share of questions)")
    for column in ("class", f"iteration {first['iteration']}", f"iteration {last['iteration']}", "change"):
        table.add_column(column, justify="right")
    for name in CLASSES:
        before, after = first["attribution"][name], last["attribution"][name]
        table.add_row(name.replace("_", " "), f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}")
    return table


def _draw_plots(run_dir: Path) -> None:
    from dro_plugins.reporting.plots import draw

    try:
        written = draw(run_dir)
    except DROError as exc:
        console.print(str(exc), highlight=False)
        return
    console.print(f"plots ({', '.join(p.stem.replace('_', '-') for p in written)}): {written[0].parent}")


def _summary_table(report: dict, top_k: int) -> Table:
    """Iteration 0 (after any warm-up, before DRO) against the best iteration."""
    best, start = report["validation"], report["baseline"]
    table = Table(title=f"before DRO vs the best iteration ({best['iteration']})")
    for column in ("validation", "iteration 0", f"iteration {best['iteration']}", "change"):
        table.add_column(column, justify="right")
    names = {"em": "EM", "f1": "F1", "recall": f"recall@{top_k}", "answer_log_likelihood": "answer log-lik"}
    for key, name in names.items():
        table.add_row(name, f"{start[key]:.3f}", f"{best[key]:.3f}", f"{best[key] - start[key]:+.3f}")
    return table


@app.command()
def optimize(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Run config YAML (see examples/nq/config.yaml).")],
    overrides: SetOption = None,
    restart: Annotated[bool, typer.Option("--restart", help="Delete what an earlier run wrote in output_dir and start over instead of resuming (other files are kept).")] = False,
    resume_anyway: Annotated[bool, typer.Option("--resume-anyway", help="Resume although the pipeline (graph, prompt template, generator or retrieval settings) or its documents changed since the run started; refused without it.")] = False,
):
    """Train the selector and generator with DRO and write a run folder.

    Re-running the same command resumes an interrupted run from its last checkpoint. Ctrl-C stops after the
    current batch and saves; a second Ctrl-C aborts at once. `dro config` lists every config key with its default.
    """
    _quiet_libraries()
    from dro_plugins.api import optimize as run_optimize
    from dro_plugins.distributed.runtime import Runtime
    from dro_plugins.errors import Interrupted

    config = None
    try:
        config = load_config(config_path, overrides or [])
        runtime = Runtime.from_environment(config.device)
        console.quiet = not runtime.is_main  # one process speaks: logs, progress bars, tables
        with _progress() as progress:
            report = run_optimize(
                config, config_path=config_path, restart=restart, resume_anyway=resume_anyway, runtime=runtime,
                log=lambda line: progress.console.print(line, highlight=False),
                progress=_tracker(progress) if runtime.is_main else no_progress,
            )
    except Interrupted as exc:
        console.print(f"[yellow]{exc}[/]\nresume with: dro optimize {config_path}")
        raise typer.Exit(130)
    except Exception:  # noqa: BLE001 - reported as one line by _reported
        with _reported(config.output_dir if config is not None else None):
            raise
    console.print(_history_table(report["history"], config.dro.num_samples))
    throughput = _throughput_table(report["history"])
    if throughput is not None:
        console.print(throughput)
    console.print(_attribution_table(report["history"]))
    if runtime.is_main:
        _draw_plots(config.output_dir)
    console.print(_summary_table(report, config.selector.top_k))
    console.print(f"{report['stop_reason']}; best by {report['metric_for_best']}: iteration {report['validation']['iteration']}")
    console.print(f"run folder: {config.output_dir}")


@app.command()
def validate(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Run config YAML.")],
    overrides: SetOption = None,
):
    """Check a run config and its data files; exit 0 when usable, 2 with every problem listed otherwise.

    With a pipeline, it is loaded and the graph DRO will train is listed (candidate source, the selector's slot,
    prompt builder, generator); no document is indexed and
    no model weights are loaded where the framework allows it (a LlamaIndex factory runs as written: persist its
    index, as examples/llama_index_nq does, and validation takes seconds).
    """
    try:
        config = load_config(config_path, overrides or [])
        train, validation = load_run_data(config)
        components = []
        if config.pipeline is not None:
            _quiet_libraries()
            from dro_plugins.pipeline import open_pipeline, resolved_config

            pipeline = open_pipeline(config, index_documents=False)
            resolved_config(config, pipeline)  # refuses a generator.model other than the pipeline's
            components = pipeline.components()
    except Exception:  # noqa: BLE001 - reported as one line by _reported
        with _reported():
            raise
    console.print(f"[green]ok[/]: {config_path} ({len(train)} training, {len(validation)} validation questions)")
    for line in components:
        console.print(f"  pipeline {line}", highlight=False, soft_wrap=True)


def _served_table(result: dict, top_k: int) -> Table:
    """The user's pipeline against the optimized one, as served: our metrics, then the framework's evaluators."""
    table = Table(title=f"{result['data']} ({result['questions']} questions, served by the framework)")
    for column in ("metric", "original", "optimized", "change"):
        table.add_column(column, justify="right")
    rows = {"EM": "em", "F1": "f1", f"recall@{top_k}": "recall"}
    for name, key in rows.items():
        before, after = result["original"][key], result["optimized"][key]
        table.add_row(name, f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}")
    for key in result["original"]["framework"]:
        before, after = result["original"]["framework"][key], result["optimized"]["framework"][key]
        table.add_row(key, f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}")
    return table


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by dro optimize.")],
    data: Annotated[Path, typer.Option("--data", help="Question file to score, in the ../shared/data format.")],
    max_examples: Annotated[int | None, typer.Option(help="Score at most this many questions.", min=1)] = None,
    device: Annotated[str | None, typer.Option(help="Override the run's device, e.g. cpu.")] = None,
    served: Annotated[bool, typer.Option("--served", help="Run your pipeline and the exported optimized one as the framework serves them (Pipeline.run / query_engine.query) and compare them side by side.")] = False,
    trust_run_code: TrustOption = False,
):
    """Score a trained run's best selector and generator on another question file (EM, F1, recall@k).

    With --served, the pipeline the run was trained from and the exported one answer through the framework itself:
    how a user sees that DRO improved their pipeline, and a check that serving matches training.
    """
    _quiet_libraries()
    from dro_plugins.api import evaluate as run_evaluate
    from dro_plugins.build import saved_config

    try:
        config = saved_config(run_dir, device)
        with _progress() as progress:
            result = run_evaluate(
                run_dir, data, max_examples=max_examples, device=device, progress=_tracker(progress), trust_run_code=trust_run_code,
                served=served,
            )
    except Exception:  # noqa: BLE001 - reported as one line by _reported
        with _reported(Path(run_dir)):
            raise
    if served:
        console.print(_served_table(result, config.selector.top_k))
        console.print(f"answers: {result['path']}")
        return
    table = Table(title=f"{data} ({result['questions']} questions)")
    for column in ("EM", "F1", f"recall@{config.selector.top_k}", *(c.replace("_", " ") for c in CLASSES[1:])):
        table.add_column(column, justify="right")
    shares = [f"{result['attribution'][c]:.3f}" for c in CLASSES[1:]]
    table.add_row(f"{result['em']:.3f}", f"{result['f1']:.3f}", f"{result['recall']:.3f}", *shares)
    console.print(table)
    console.print(f"predictions: {result['path']}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder written by dro optimize.")]):
    """Re-draw a run's plots/ from its metrics.jsonl and print the best iteration against iteration 0."""
    from dro_plugins.training.records import read_metrics, read_report
    from dro_plugins.build import saved_config

    try:
        config = saved_config(run_dir)
        history = read_metrics(run_dir)
        finished = read_report(run_dir)
    except Exception:  # noqa: BLE001 - reported as one line by _reported
        with _reported():
            raise
    console.print(_history_table(history, config.dro.num_samples))
    if finished is None:
        console.print(f"{run_dir}: no report.json yet (the run has not finished); the table shows what it has done")
    else:
        console.print(_summary_table(finished, config.selector.top_k))
        console.print(f"{finished['stop_reason']}; best by {finished['metric_for_best']}: iteration {finished['validation']['iteration']}")
    if any(line["stage"] == "dro" and "attribution" in line for line in history):
        console.print(_attribution_table(history))
    _draw_plots(Path(run_dir))


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder written by dro optimize.")],
    question: Annotated[str, typer.Option("--question", help="A question id of the run's training or validation file.")],
    iteration: Annotated[int | None, typer.Option(help="E-step iteration to show. Default: the best iteration.")] = None,
    device: Annotated[str | None, typer.Option(help="Override the run's device, e.g. cpu.")] = None,
    trust_run_code: TrustOption = False,
):
    """One question through every stage: its candidates (which hold the answer), the m permutations sampled at an
    iteration with their importance weights and generator log-likelihoods, the best iteration's greedy selection,
    and the generator's answer."""
    _quiet_libraries()
    from dro_plugins.build import load_trained, refuse_run_code, saved_config
    from dro_plugins.cli.inspection import find_question, pick_iteration, samples_of, view
    from dro_plugins.pipeline import attach_candidates, dense_index, open_pipeline, resolved_config, use_pipeline_prompts

    try:
        run_dir = Path(run_dir)
        example, split = find_question(saved_config(run_dir), question)  # before loading models: fail fast
        shown = pick_iteration(run_dir, iteration)
        config = saved_config(run_dir, device)
        refuse_run_code(config, run_dir, trust_run_code)  # before the pipeline is opened: a factory is code
        pipeline = open_pipeline(config) if config.pipeline is not None else None
        config = resolved_config(config, pipeline)
        _, selector, generator = load_trained(run_dir, device, index=dense_index(config, pipeline), trust_run_code=trust_run_code)
        if pipeline is not None:
            example = attach_candidates([example], pipeline, config.data.num_candidates, config.selector.top_k)[0]
            use_pipeline_prompts(pipeline, generator)
        example = selector.candidates([example])[0]  # a trained retriever's own pool
        samples = samples_of(run_dir, shown, question) if shown is not None and split == "train" else None
        selected = selector.select([example])[0]
        answer = generator.generate([example], [selected])[0]
    except Exception:  # noqa: BLE001 - reported as one line by _reported
        with _reported():
            raise
    console.print(view(example, split, shown, samples, selected, answer))


@app.command("config")
def config_help():
    """Print every run-config key with its default and what it does (from the config schema)."""
    table = Table(title="run config keys (set them in the YAML or with --set KEY=VALUE)")
    for column in ("key", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for key, default, description in config_keys():
        table.add_row(key, default, description)
    Console(width=max(120, console.width)).print(table)


@app.command("tiny-model")
def tiny_model(
    folder: Annotated[Path, typer.Argument(help="Folder to write (created; must be empty or missing).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights (0 to 2^32-1).", min=0, max=2**32 - 1)] = 0,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="A real tokenizer's folder (e.g. Llama 3's): use its vocabulary, special tokens and chat template."),
    ] = None,
):
    """Write a tiny random causal LM (Llama layout) with tokenizer and chat template to FOLDER, offline.

    The folder loads like any Hugging Face model path (AutoModelForCausalLM / AutoTokenizer), so a pipeline can point its generator at it in tests and examples where no model can be downloaded.
    """
    _quiet_libraries()
    from dro_plugins.modeling.loading import write_tiny_model

    if folder.exists() and any(folder.iterdir()):
        _fail(f"{folder}: folder is not empty; pass a new folder")
    try:
        write_tiny_model(folder, seed=seed, tokenizer_dir=tokenizer)
    except Exception:  # noqa: BLE001 - reported as one line by _reported
        with _reported():
            raise
    console.print(f"tiny model written to {folder}")


if __name__ == "__main__":
    app()
