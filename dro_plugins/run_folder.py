"""Which folder a run may write, and what ``--restart`` may delete there: never a file the user wrote.

A run claims its ``output_dir`` by writing a marker file, ``.dro-run``. From then on the folder is a run folder:
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

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from dro_plugins.errors import DROError
from dro_plugins.files import atomic_write_text

MARKER = ".dro-run"
# every name a run writes directly under its folder (atomic writes add a ".partial" twin while they write)
RUN_ENTRIES = frozenset(
    {
        MARKER, "config.yaml", "metrics.jsonl", "report.json", "dro-error.log", "pipeline.yaml",
        "selector", "generator", "generator-model", "base", "index", "samples", "attribution", "plots",
        "checkpoint", "checkpoint.tmp", "checkpoint.old", "tensorboard", "wandb",
    }
)


def is_run_entry(name: str) -> bool:
    """Whether a name directly under a run folder is one a run writes (or its half-written ``.partial`` twin)."""
    return name.removesuffix(".partial") in RUN_ENTRIES


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
    if (root / MARKER).is_file():
        return True
    return (root / "config.yaml").is_file() and not foreign_entries(root)


def claim(root: Path, inputs: Iterable[Path], restart: bool) -> None:
    """Make ``root`` this run's folder: check it may be written, clear it on ``restart``, write the marker.

    ``restart`` deletes the entries a run wrote (:data:`RUN_ENTRIES`; a symbolic link is unlinked, never followed)
    and keeps every other file.

    Raises:
        DROError: ``root`` is refused (see the module docstring) or is a file.
    """
    root = Path(root)
    check_output_dir(root, inputs)
    if root.exists() and not root.is_dir():
        raise DROError(f"output_dir {root} is a file, not a folder; set output_dir to a new folder")
    blocking = next((p for p in root.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DROError(f"output_dir {root} is below {blocking}, which is a file, not a folder; set output_dir to a new folder")
    if root.is_dir() and any(root.iterdir()) and not is_run_folder(root):
        names = foreign_entries(root)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DROError(
            f"output_dir {root} is not empty and holds files no dro run wrote ({shown}); set output_dir to a new or "
            "empty folder"
        )
    if restart and root.is_dir():
        for entry in root.iterdir():
            if not is_run_entry(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).is_file():
        atomic_write_text(root / MARKER, json.dumps({"created": time.time(), "pid": os.getpid()}) + "\n")


def config_inputs(config, config_path: Path | None) -> list[Path]:
    """Every file or folder a run config reads: the config file, question files, corpus, pipeline files, local models.

    Args:
        config: a loaded :class:`~dro_plugins.config.RunConfig` (its paths already absolute).
        config_path: the YAML file it was loaded from, or None when built in Python.
    """
    paths = [config_path, config.data.train, config.data.validation, config.documents]
    for section in (config.selector, config.generator):
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
