"""The run folder: where every file of a run lives (:class:`RunPaths`), which folder a run may write, and what
``--restart`` may delete there (never a file the user wrote).

Layout::

    .dro-run             marker: this folder is a run folder (written when a run claims it)
    .dro-lock            held (flock) by the dro optimize that writes the folder: one run per folder
    config.yaml          the resolved run config
    metrics.jsonl        one line per EM iteration (iteration 0 = before DRO)
    report.json          best validation metrics and the per-iteration history
    selector/ generator/ best LoRA adapters (adapter_model.safetensors)
    generator-model/     the best generator merged into its base model (pipeline runs; see build.export_generator)
    pipeline.yaml        the fine-tuned Haystack pipeline (Haystack runs)
    document-embedder.yaml  a Haystack pipeline embedding documents as the run's store was (dense Haystack runs)
    pipeline-fingerprint.json  digests of the pipeline parts and documents the run trained against (pipeline runs)
    evaluation_NAME.json predictions and scores of dro evaluate on NAME.jsonl (evaluation_served_NAME.json: --served)
    base/                tiny base models and tokenizers, when the config uses a built-in tiny model (one shared
                         base lives in base/selector)
    checkpoint/          latest training state, for resuming (checkpoint.tmp/ and checkpoint.old/ while it is saved)
    samples/             E-step samples and importance weights per iteration (format: training.estep)
    attribution/         per iteration, the validation questions each model failed
    plots/               PNG plots of metrics.jsonl (dro report)
    tensorboard/ wandb/  experiment-tracker logs (report_to)
    dro-error.log        the traceback of an internal error

With ``selector.kind: retriever``, ``selector/`` is the best query tower as a sentence-transformers folder, and
``index/`` keeps the document tower's embeddings of ``selector.corpus`` (computed once per run); with
``retriever.train`` the best query tower is ``retriever/`` (and ``index/`` holds ``retriever.corpus``'s embeddings).

A run claims its ``output_dir`` by writing the marker. From then on the folder is a run folder:
``--restart`` removes the entries a run writes (:data:`RUN_ENTRIES`) and keeps every other file (a user's notes
beside the run survive). A folder is refused as ``output_dir`` when
- it is the current folder, or holds it (a run there would write among, and ``--restart`` would delete, the user's
  working files);
- it is, or holds, the folder of an input: the run config, a question file, a corpus, a pipeline file, a local model
  or tokenizer folder;
- it is not empty and not a run folder (no marker, and not a run folder written before markers existed: every
  entry one a run writes, ``config.yaml`` among them).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dro_plugins.errors import DROError
from dro_plugins.files import atomic_write_text

MARKER = ".dro-run"
LOCK = ".dro-lock"
EVALUATION_PREFIX = "evaluation_"


@dataclass(frozen=True)
class RunPaths:
    """Every path inside a run folder: the only place that joins a run-folder file name."""

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def samples_file(self, iteration: int) -> Path:
        """E-step samples of one EM iteration (:mod:`dro_plugins.training.estep` writes and reads it)."""
        return self.samples / f"iteration_{iteration:03d}.jsonl"

    def attribution(self, iteration: int, stage: str = "dro") -> Path:
        """Failed validation question ids of one iteration (``stage`` "before_warmup" gets its own file)."""
        suffix = "" if stage == "dro" else f"_{stage}"
        return self.root / "attribution" / f"iteration_{iteration:03d}{suffix}.json"

    def adapter(self, role: str) -> Path:
        """Best unit folder of ``role``: "selector", "generator" (LoRA adapters, or a query tower for a retriever
        selector) or "retriever" (the third unit's query tower, ``retriever.train``)."""
        return self.root / role

    def tiny_base(self, role: str) -> Path:
        return self.root / "base" / role

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def generator_model(self) -> Path:
        return self.root / "generator-model"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline.yaml"

    @property
    def document_embedder(self) -> Path:
        """A Haystack pipeline embedding documents as the run's document store was (dense Haystack runs)."""
        return self.root / "document-embedder.yaml"

    @property
    def fingerprint(self) -> Path:
        """Digests of the pipeline's parts and of the documents the run trained against (:func:`prepare`)."""
        return self.root / "pipeline-fingerprint.json"

    def evaluation(self, data_name: str) -> Path:
        """Predictions and scores of ``dro evaluate`` on a question file (named after its stem)."""
        return self.root / f"{EVALUATION_PREFIX}{data_name}.json"

    @property
    def error_log(self) -> Path:
        return self.root / "dro-error.log"

    @property
    def entries(self) -> frozenset[str]:
        """Names a run writes directly under its folder."""
        top = [self.marker, self.lock, self.config, self.metrics, self.report, self.checkpoint, self.samples, self.index,
               self.plots, self.tensorboard, self.wandb, self.generator_model, self.pipeline, self.document_embedder, self.fingerprint, self.error_log,
               self.attribution(0).parent, self.tiny_base("selector").parent, self.adapter("selector"), self.adapter("generator"),
               self.adapter("retriever")]
        names = {path.relative_to(self.root).parts[0] for path in top}
        return frozenset(names | {self.checkpoint.name + ".tmp", self.checkpoint.name + ".old"})


# every name a run writes directly under its folder (atomic writes add a ".partial" twin while they write)
RUN_ENTRIES = RunPaths(Path(".")).entries


def is_run_entry(name: str) -> bool:
    """Whether a name directly under a run folder is one a run writes (or its half-written ``.partial`` twin)."""
    name = name.removesuffix(".partial")
    return name in RUN_ENTRIES or (name.startswith(EVALUATION_PREFIX) and name.endswith(".json"))


def _resolved(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before Python 3.13, OSError(ELOOP) after
        raise DROError(f"{path}: cannot resolve the path ({exc}); fix the symbolic link or pick another folder") from None


def _contains(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def check_output_dir(root: Path, inputs: Iterable[Path]) -> None:
    """Refuse ``root`` as a run folder when it is, or holds, the current folder or the folder of an input.

    Args:
        root: the run's ``output_dir``.
        inputs: files and folders the run reads (config file, question files, corpus, pipeline files, local models).

    Raises:
        DROError: naming the input ``root`` would hold, and the fix.
    """
    folder = _resolved(root)
    protected = [("the current folder", Path.cwd())]
    for item in inputs:
        path = _resolved(item)
        protected.append((str(item), path if path.is_dir() else path.parent))
    for what, path in protected:
        if _contains(folder, path):
            where = what if what == "the current folder" else f"the folder of {what}"
            raise DROError(
                f"output_dir {root} is or holds {where}; a run writes there and --restart deletes there, so set "
                "output_dir to a folder of its own (e.g. runs/my-run)"
            )


def foreign_entries(root: Path) -> list[str]:
    """Names under ``root`` that a run does not write, sorted (what ``--restart`` keeps)."""
    return sorted(entry.name for entry in Path(root).iterdir() if not is_run_entry(entry.name))


def is_run_folder(root: Path) -> bool:
    """Whether ``root`` holds a run: it has the marker, or (written before markers) only run entries and a config."""
    root = Path(root)
    paths = RunPaths(root)
    if paths.marker.is_file():
        return True
    return paths.config.is_file() and not foreign_entries(root)


def check(root: Path, inputs: Iterable[Path]) -> None:
    """Refuse ``root`` as a run folder (see the module docstring) without writing anything.

    Raises:
        DROError: naming the reason and the fix.
    """
    root = Path(root)
    check_output_dir(root, inputs)
    if root.exists() and not root.is_dir():
        raise DROError(f"output_dir {root} is a file, not a folder; set output_dir to a new folder")
    blocking = next((p for p in root.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DROError(f"output_dir {root} is below {blocking}, which is a file, not a folder; set output_dir to a new folder")
    if root.is_dir() and any(entry.name != LOCK for entry in root.iterdir()) and not is_run_folder(root):
        names = foreign_entries(root)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DROError(
            f"output_dir {root} is not empty and holds files no dro run wrote ({shown}); set output_dir to a new or "
            "empty folder"
        )


def claim(root: Path, inputs: Iterable[Path], restart: bool) -> None:
    """Make ``root`` this run's folder: check it may be written, clear it on ``restart``, write the marker.

    ``restart`` deletes the entries a run wrote (:data:`RUN_ENTRIES`; a symbolic link is unlinked, never followed)
    and keeps every other file.

    Raises:
        DROError: ``root`` is refused (see the module docstring) or is a file.
    """
    root = Path(root)
    check(root, inputs)
    if restart and root.is_dir():
        for entry in root.iterdir():
            if not is_run_entry(entry.name) or entry.name == LOCK:  # the lock stays: this run holds it
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    root.mkdir(parents=True, exist_ok=True)
    if not RunPaths(root).marker.is_file():
        atomic_write_text(RunPaths(root).marker, json.dumps({"created": time.time(), "pid": os.getpid()}) + "\n")


def config_inputs(config, config_path: Path | None) -> list[Path]:
    """Every file or folder a run config reads: the config file, question files, corpus, pipeline files, local models.

    Args:
        config: a loaded :class:`~dro_plugins.config.RunConfig` (its paths already absolute).
        config_path: the YAML file it was loaded from, or None when built in Python.
    """
    paths = [config_path, config.data.train, config.data.validation, config.documents]
    for section in (config.selector, config.generator, config.retriever):
        for field in ("model", "document_model"):
            value = getattr(section, field, None)
            if value is not None and Path(value).is_absolute():
                paths.append(Path(value))
        tiny = getattr(section, "tiny", None)
        paths += [getattr(tiny, "tokenizer", None), getattr(section, "corpus", None)]
    if config.pipeline is not None:
        paths.append(config.pipeline.haystack)
        if config.pipeline.llama_index is not None:
            paths.append(Path(config.pipeline.llama_index.rpartition(":")[0] or config.pipeline.llama_index))
    return [Path(p) for p in paths if p is not None]


# config keys a resume may change: more iterations, other learning rates (after a NaN stop), how work is split into
# micro-batches and how patient early stopping is; the resumed run reads them from the new config
RESUMABLE_CHANGES = (
    "dro.iterations", "dro.learning_rate", "selector.learning_rate", "generator.learning_rate", "warmup.learning_rate",
    "dro.max_nan_batches", "dro.max_tokens_per_microbatch", "dro.patience", "eval_batch_size", "report_to",
)


def changed_keys(wanted: dict, saved: dict) -> list[str]:
    """Dotted keys whose values differ between two dumped configs (``model_dump(mode="json")``), by section."""
    changed = [f"{s}.{k}" for s in wanted if isinstance(wanted[s], dict) for k in wanted[s] if wanted[s][k] != (saved.get(s) or {}).get(k)]
    return changed + [s for s in wanted if not isinstance(wanted[s], dict) and wanted[s] != saved.get(s)]


@contextmanager
def opened(
    config, config_path: Path | None, restart: bool, log, fingerprint: dict[str, str] | None = None, resume_anyway: bool = False
) -> Iterator[None]:
    """Hold ``config.output_dir`` for a run: refuse it (:func:`check`, nothing written), take its lock
    (:func:`locked`), then claim it (:func:`prepare`); the lock is held until the block ends.

    Raises:
        DROError: as :func:`check`, :func:`locked` and :func:`prepare`.
    """
    check(Path(config.output_dir), config_inputs(config, config_path))
    with locked(Path(config.output_dir)):
        for line in prepare(config, config_path, restart, fingerprint, resume_anyway):
            log(line)
        yield


def prepare(
    config, config_path: Path | None, restart: bool, fingerprint: dict[str, str] | None = None, resume_anyway: bool = False
) -> list[str]:
    """Claim ``config.output_dir`` for this run (:func:`claim`) and say whether the run starts, starts over or resumes.

    Args:
        config: the resolved run config.
        config_path: the YAML it came from (an input the run folder must not hold), or None.
        restart: start over, deleting what an earlier run wrote there.
        fingerprint: digests of the pipeline's parts and documents (:func:`dro_plugins.pipeline.fingerprint`); a
            resume must find those the run saved, unless ``resume_anyway``.
        resume_anyway: resume although the pipeline or documents changed (the new ones are used from now on).

    Returns:
        lines for the log (none for a new run).

    Raises:
        DROError: the folder is refused, or holds a run with a different config (beyond :data:`RESUMABLE_CHANGES`),
            or one trained against another pipeline or documents (without ``resume_anyway``).
    """
    from dro_plugins.config import load_config
    from dro_plugins.training.checkpoint import find_checkpoint

    paths = RunPaths(Path(config.output_dir))
    inputs = config_inputs(config, config_path)
    fingerprint = fingerprint or {}
    if restart or not paths.config.is_file():
        claim(paths.root, inputs, restart=True)  # only what a run wrote is deleted; a user's files are refused or kept
        atomic_write_text(paths.fingerprint, json.dumps(fingerprint, indent=1) + "\n")
        return []
    claim(paths.root, inputs, restart=False)  # refused before the saved config is read: it may be the user's own
    saved = load_config(paths.config).model_dump(mode="json")
    changed = [key for key in changed_keys(config.model_dump(mode="json"), saved) if key not in RESUMABLE_CHANGES]
    if changed:
        raise DROError(
            f"output_dir {paths.root} holds a run with a different config ({', '.join(changed)}); "
            "pass --restart to start over there, or set output_dir to a new folder"
        )
    lines = _compare_fingerprints(paths, fingerprint, resume_anyway)
    if find_checkpoint(paths.checkpoint) is not None:
        return lines + [f"resuming the run in {paths.root}"]
    return lines + [f"starting over in {paths.root}: the run there stopped before its first checkpoint"]


def _compare_fingerprints(paths: RunPaths, fingerprint: dict[str, str], resume_anyway: bool) -> list[str]:
    """Refuse a resume whose pipeline parts or documents differ from those the run saved; with ``resume_anyway``
    keep the new ones and say what changed. A run folder from before fingerprints gets this run's."""
    try:
        saved = json.loads(paths.fingerprint.read_text(encoding="utf-8")) if paths.fingerprint.is_file() else fingerprint
    except (OSError, ValueError):
        saved = {}
    changed = sorted(part for part in set(saved) | set(fingerprint) if saved.get(part) != fingerprint.get(part))
    if changed and not resume_anyway:
        raise DROError(
            f"output_dir {paths.root} holds a run trained against another pipeline ({', '.join(changed)} changed); pass "
            "--restart to start over, or --resume-anyway to go on training with the new one"
        )
    atomic_write_text(paths.fingerprint, json.dumps(fingerprint, indent=1) + "\n")
    return [f"resuming with the changed pipeline ({', '.join(changed)}), as --resume-anyway asked"] if changed else []


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock (``fcntl.flock`` on ``.dro-lock``) for the enclosed block.

    The kernel releases it when the process ends, however it ends, so a killed run never leaves a stale lock.

    Raises:
        DROError: another process holds it (the message names its pid and host).
    """
    path = RunPaths(Path(root)).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 200).decode("utf-8", "replace").strip() or "unknown"
            raise DROError(
                f"output_dir {root} is in use by another dro optimize ({holder}); wait for it to finish, stop it, or "
                "set output_dir to another folder"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(descriptor)
