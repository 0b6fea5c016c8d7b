"""Saving and restoring training state so that an interrupted ``dro optimize`` resumes where it stopped.

A checkpoint folder holds both roles' trainable units (LoRA adapters or a query tower, as each unit saves itself), those
of the best iteration so far (``best/``), the optimizer and RNG states (``optimizers.pt``, read back with ``weights_only=True``), the loop position
with the metrics history (``state.json``) and, written last, ``COMPLETE``: the sha256 of every other file.

Writing: a new checkpoint is built in ``checkpoint.tmp/``; the current one is renamed to ``checkpoint.old/`` and the new
one into place, then the old one is removed. A kill at any moment leaves either ``checkpoint/`` or ``checkpoint.old/``
complete, and :func:`find_checkpoint` takes whichever is. A checkpoint whose files do not match their checksums is
reported, never used silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dro_plugins.errors import DROError
from dro_plugins.faults import crash_point
from dro_plugins.files import atomic_write_bytes, atomic_write_text
from dro_plugins.distributed.fsdp import gathered, shard_optimizer_state

MARKER = "COMPLETE"


class CorruptCheckpoint(DROError):
    """A checkpoint's files are missing or do not match their checksums."""


@dataclass
class LoopState:
    """Where the EM loop stands.

    Attributes:
        iteration: the EM iteration in progress (0 = warm-up and the validation before DRO; 1..N); N + 1 when finished.
        phase: "warmup", "e_step", "m_step" or "validate" within that iteration.
        batches_done: M-step batches already applied in this iteration.
        losses: this iteration's M-step losses per role, one per optimizer step (for the metrics line).
        best: the best iteration's (dro.metric_for_best, answer log-likelihood) so far; best_iteration: where.
        stale_iterations: iterations since the best one (early stopping).
        history: the metrics lines written so far.
        nan_batches: batches skipped for a non-finite loss, in total.
        throughput: this iteration's :class:`dro_plugins.reporting.throughput.WorkMeter` per phase so far, as dicts.
    """

    iteration: int = 0
    phase: str = "warmup"
    batches_done: int = 0
    losses: dict[str, list[float]] = field(default_factory=dict)
    best: list[float] = field(default_factory=lambda: [float("-inf"), float("-inf")])
    best_iteration: int = 0
    stale_iterations: int = 0
    history: list[dict] = field(default_factory=list)
    nan_batches: int = 0
    throughput: dict[str, dict] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: Path, state: LoopState, units: dict, optimizers: dict, new_best: bool, write: bool = True) -> None:
    """Write adapters, best adapters, optimizer and RNG states and the loop state to ``folder``, crash-safely.

    Every process calls it: with sharded weights (FSDP2) the full adapters and optimizer states are gathered from all
    of them. Only the process with ``write`` writes.

    Args:
        units: role -> trainable unit (:class:`dro_plugins.selectors.base.TrainableUnit`).
        new_best: the current adapters are the best so far (copied to ``best/``); otherwise ``best/`` is carried over
            from the previous checkpoint.
        write: False for the processes that only take part in gathering.
    """
    optimizer_states = {k: _gathered_state(o) for k, o in optimizers.items()}
    if not write:
        for unit in units.values():
            unit.save(None)
        return
    staging = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    previous = find_checkpoint(folder)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for role, unit in units.items():
        unit.save(staging / role)
        if new_best:
            shutil.copytree(staging / role, staging / "best" / role)
    if not new_best and previous is not None and (previous / "best").is_dir():
        shutil.copytree(previous / "best", staging / "best")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    buffer = io.BytesIO()
    torch.save({"optimizers": optimizer_states, "rng": rng}, buffer)
    atomic_write_bytes(staging / "optimizers.pt", buffer.getvalue())
    atomic_write_text(staging / "state.json", json.dumps(asdict(state), indent=1))
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    atomic_write_text(staging / MARKER, json.dumps({name: _sha256(staging / name) for name in files}, indent=1))
    crash_point("checkpoint-written")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    crash_point("checkpoint-swap")
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def _gathered_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with full tensors (sharded ones gathered), as one process would have it."""
    saved = optimizer.state_dict()
    return {**saved, "state": {i: {k: gathered(v) for k, v in s.items()} for i, s in saved["state"].items()}}


def verify(folder: Path) -> None:
    """Check a checkpoint's files against its ``COMPLETE`` checksums.

    Raises:
        CorruptCheckpoint: the marker is missing (the write did not finish) or a file is missing or changed.
    """
    marker = folder / MARKER
    if not marker.is_file():
        raise CorruptCheckpoint(f"{folder}: incomplete checkpoint (no {MARKER} marker)")
    try:
        expected = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"{folder}: unreadable {MARKER} marker") from exc
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise CorruptCheckpoint(f"{folder}: {name} is missing or damaged (checksum mismatch)")


def find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint to resume from: ``folder`` if it is complete, else a complete ``folder.old`` (a save was cut
    between its two renames), else None when neither exists.

    Raises:
        CorruptCheckpoint: a checkpoint exists but none is complete and intact; the message says what to do.
    """
    old = folder.with_name(folder.name + ".old")
    candidates = [c for c in (folder, old) if c.is_dir()]
    if not candidates:
        return None
    problems = []
    for candidate in candidates:
        try:
            verify(candidate)
            return candidate
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
    raise CorruptCheckpoint(
        f"{'; '.join(problems)}. Nothing to resume from: pass --restart to start the run over "
        "(the run folder's metrics and adapters are replaced)"
    )


def load_checkpoint(folder: Path, units: dict, optimizers: dict) -> LoopState:
    """Restore adapters, optimizers and RNG from a verified checkpoint ``folder``; return the loop state.

    A checkpoint written on another device (CUDA or CPU) loads: tensors are read on the CPU and copied to where the
    adapters and optimizer states live.
    """
    for role, unit in units.items():
        unit.load(folder / role)
    saved = torch.load(folder / "optimizers.pt", weights_only=True, map_location="cpu")
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][key])
        shard_optimizer_state(optimizer)
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return LoopState(**json.loads((folder / "state.json").read_text()))
