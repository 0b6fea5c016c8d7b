"""The library entry points: what ``dro optimize`` and ``dro evaluate`` do, callable from Python (a notebook, a
script, the tests and the benchmarks)::

    import dro_plugins

    report = dro_plugins.optimize("examples/nq/config.yaml")          # trains, resumes, writes the run folder
    result = dro_plugins.evaluate("runs/nq", "../shared/data/nq/test.jsonl")
    config, selector, generator = dro_plugins.load_trained("runs/nq")

The assembly, in order: config → processes → questions → pipeline (resolved into the config once) → run folder
→ candidates → models → :class:`~dro_plugins.training.trainer.DROTrainer` → export to the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from dro_plugins.build import build_models, load_trained, refuse_run_code, saved_config
from dro_plugins.config import RunConfig, load_config
from dro_plugins.data.examples import load_examples, load_run_data
from dro_plugins.distributed.runtime import Runtime
from dro_plugins.errors import DROError
from dro_plugins.evaluation.metrics import exact_match, f1_score, selection_recall
from dro_plugins.evaluation.predictions import evaluate as score
from dro_plugins.files import atomic_write_text
from dro_plugins.pipeline import attach_candidates, dense_index, fingerprint, open_pipeline, resolved_config, use_pipeline_prompts
from dro_plugins.reporting.progress import Track, no_progress
from dro_plugins.training import run_folder
from dro_plugins.training.run_folder import RunPaths
from dro_plugins.training.trainer import DROTrainer

__all__ = ["evaluate", "load_trained", "optimize"]


def optimize(
    config: RunConfig | str | Path,
    *,
    overrides: Sequence[str] = (),
    config_path: str | Path | None = None,
    restart: bool = False,
    resume_anyway: bool = False,
    runtime: Runtime | None = None,
    log: Callable[[str], None] | None = None,
    progress: Track | None = None,
) -> dict:
    """Fine-tune a config's selector and generator with DRO and write its run folder; resume an interrupted run.

    Args:
        config: a run config, or the path of its YAML (``overrides`` as ``dro optimize --set`` takes them).
        config_path: the YAML a given :class:`RunConfig` was loaded from (``output_dir`` may not hold it).
        restart: start over in ``output_dir``, deleting what an earlier run wrote there (other files are kept).
        resume_anyway: resume although the pipeline (graph, prompt template, generator or retrieval settings) or its
            documents changed since the run started; without it such a resume is refused.
        runtime: the processes; by default one, or those of ``accelerate launch``/``torchrun``.
        log: receives one human-readable line per event (silent by default).
        progress: wraps long loops for a progress display (:class:`dro_plugins.reporting.progress.Track`).

    Returns:
        the report written to ``report.json`` (:func:`dro_plugins.training.records.report`).

    Raises:
        DROError: a problem the user fixes (bad config or data, a refused output folder, a different config or
            pipeline in it).
        Interrupted: Ctrl-C or SIGTERM; a checkpoint was saved and calling again resumes.
    """
    log = log or (lambda _line: None)
    track = progress or no_progress
    config_path = Path(config_path) if config_path is not None else None
    if not isinstance(config, RunConfig):
        config_path, config = Path(config), load_config(config, list(overrides))
    runtime = runtime or Runtime.from_environment(config.device)
    train, validation = load_run_data(config)
    pipeline = open_pipeline(config, track=track) if config.pipeline is not None else None
    config = resolved_config(config, pipeline)  # computed once; never rewritten, and holds nothing per process
    held = run_folder.opened(config, config_path, restart, log, fingerprint(config, pipeline), resume_anyway)
    with held if runtime.is_main else nullcontext():
        runtime.wait()
        return _train(config, runtime, pipeline, train, validation, log, track)


def _train(config: RunConfig, runtime: Runtime, pipeline, train, validation, log, track) -> dict:
    """The part of :func:`optimize` after the run folder is held: candidates, models, training, export."""
    if pipeline is not None:
        train, validation = (attach_candidates(part, pipeline, config.data.num_candidates, config.selector.top_k, track) for part in (train, validation))
    log(f"{len(train)} training and {len(validation)} validation questions; loading models")
    local = config.model_copy(update={"device": runtime.device_name(config.device)})  # this process's GPU
    with runtime.main_first():  # a tiny base model is written into the run folder once
        selector, generator = build_models(local, config.output_dir, index=dense_index(config, pipeline), load_device=runtime.load_device)
    if pipeline is not None:
        use_pipeline_prompts(pipeline, generator)
    trainer = DROTrainer(config, selector, generator, train, validation, config.output_dir, track=track, log=log, runtime=runtime)
    report = trainer.fit()
    if pipeline is not None and runtime.is_main:
        log(f"{pipeline.exported}: {pipeline.export(config.output_dir)}")
        for note in pipeline.export_notes:
            log(f"  {note}")
    return report


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    *,
    max_examples: int | None = None,
    device: str | None = None,
    progress: Track | None = None,
    trust_run_code: bool = False,
    served: bool = False,
) -> dict:
    """Score a run's best selector and generator on a question file and write ``evaluation_<name>.json`` beside it;
    with ``served``, the user's pipeline and the exported one as the framework serves them (:func:`_evaluate_served`).

    Args:
        run_dir: a run folder written by :func:`optimize`.
        data: questions in the ``../shared/data`` format (with candidates, unless the run has a pipeline).
        device: override the run's device, e.g. "cpu".
        trust_run_code: let the run's config run code (a LlamaIndex factory, ``trust_remote_code``); off, a run
            folder that asks for it is refused (:func:`dro_plugins.build.refuse_run_code`).

    Returns:
        ``{"data", "em", "f1", "recall", "attribution", "predictions", ...}``
        (:func:`dro_plugins.evaluation.predictions.evaluate`), plus ``"questions"`` and ``"path"`` (the file written).

    Raises:
        DROError: not a run folder, or the question file is unusable.
    """
    track = progress or no_progress
    config = saved_config(run_dir, device)
    refuse_run_code(config, run_dir, trust_run_code)  # before the pipeline is opened: a factory is code
    if served:
        return _evaluate_served(config, Path(run_dir), data, max_examples, track)
    pipeline = open_pipeline(config, track=track) if config.pipeline is not None else None
    config = resolved_config(config, pipeline)
    _, selector, generator = load_trained(run_dir, device, index=dense_index(config, pipeline), trust_run_code=trust_run_code)
    examples = load_examples(data, config.data.num_candidates, config.selector.top_k, max_examples, pipeline is None)
    if pipeline is not None:
        examples = attach_candidates(examples, pipeline, config.data.num_candidates, config.selector.top_k, track)
        use_pipeline_prompts(pipeline, generator)
    result = {"data": str(data), **score(selector, generator, examples, config.eval_batch_size, track)}
    out = RunPaths(Path(run_dir)).evaluation(Path(data).stem)
    atomic_write_text(out, json.dumps(result, indent=1))
    return result | {"questions": len(examples), "path": str(out)}


def _evaluate_served(config: RunConfig, run_dir: Path, data: str | Path, max_examples: int | None, track: Track) -> dict:
    """Run the user's pipeline and the exported (optimized) one, as the framework serves them (Haystack
    ``Pipeline.run``, LlamaIndex ``query_engine.query``), on a question file; score both and write
    ``evaluation_served_<name>.json`` into the run folder.

    This is the check that serving matches training: the optimized pipeline's answers equal those of
    :func:`evaluate` on the same questions (tests/test_haystack.py and tests/test_llama_index.py compare them).

    Returns:
        ``{"data", "questions", "path", "original": {...}, "optimized": {...}}``, each side ``{"em", "f1", "recall",
        "framework", "predictions"}``: means over questions in [0, 1] (recall: a passage given to the generator contains
        an answer, i.e. recall@k), the framework's own evaluators (``TrainablePipeline.framework_scores``), and per
        question ``{"id", "prediction", "passages", "em", "f1", "recall"}``.

    Raises:
        DROError: the run has no pipeline, or the question file is unusable.
    """
    if config.pipeline is None:
        raise DROError(f"{run_dir}: --served runs the pipeline a run was trained from, and this run has none (no pipeline: in its config)")
    pipeline = open_pipeline(config, track=track)
    examples = load_examples(data, config.data.num_candidates, config.selector.top_k, max_examples, False)
    result = {"data": str(data), "questions": len(examples)}
    for name, answer in pipeline.served(run_dir).items():
        predictions, given = [], []
        for example in track(examples, f"serve {name}", len(examples)):
            text, passages = answer(example.question)
            given.append(passages)
            predictions.append({
                "id": example.id, "prediction": text, "passages": [p.id for p in passages],
                "em": exact_match(text, example.answers), "f1": f1_score(text, example.answers),
                "recall": selection_recall(passages, example.answers),
            })
        means = {key: sum(p[key] for p in predictions) / len(predictions) for key in ("em", "f1", "recall")}
        framework = pipeline.framework_scores([p["prediction"] for p in predictions], [list(e.answers) for e in examples], given)
        result[name] = {**means, "framework": framework, "predictions": predictions}
    out = RunPaths(run_dir).evaluation(f"served_{Path(data).stem}")
    atomic_write_text(out, json.dumps(result, indent=1))
    return result | {"path": str(out)}

