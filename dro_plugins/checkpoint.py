"""Saving and restoring training state so that an interrupted ``dro optimize`` resumes where it stopped.

A checkpoint folder holds the LoRA adapters of both models (safetensors), the optimizer states and RNG
state (``optimizers.pt``, read back with ``weights_only=True``) and the loop position (``state.json``).
It is written to a temporary folder and renamed, so a crash while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class LoopState:
    """Where the EM loop stands.

    Attributes:
        iteration: the EM iteration in progress (1..N); N + 1 when finished.
        phase: "e_step", "m_step" or "validate" within that iteration.
        batches_done: M-step batches already applied in this iteration.
        best_f1: best validation F1 so far; best_iteration: where it was reached.
        stale_iterations: iterations since the best one (early stopping).
        history: the metrics lines written so far.
        nan_batches: batches skipped for a non-finite loss, in total.
    """

    iteration: int = 1
    phase: str = "e_step"
    batches_done: int = 0
    best_f1: float = -1.0
    best_iteration: int = 0
    stale_iterations: int = 0
    history: list[dict] = field(default_factory=list)
    nan_batches: int = 0


def save_checkpoint(folder: Path, state: LoopState, units: dict, optimizers: dict) -> None:
    """Write adapters, optimizer and RNG states and the loop state atomically to ``folder``.

    Args:
        units: role -> :class:`dro_plugins.units.AdapterUnit`.
    """
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for role, unit in units.items():
        unit.save(staging / role)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "rng": rng}, staging / "optimizers.pt")
    (staging / "state.json").write_text(json.dumps(asdict(state), indent=1))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, units: dict, optimizers: dict) -> LoopState:
    """Restore adapters, optimizers and RNG from ``folder`` into the given objects; return the loop state.

    A checkpoint written on another device (CUDA or CPU) loads: tensors are read on the CPU and copied to where the
    adapters and optimizer states live.
    """
    for role, unit in units.items():
        unit.load_state_dict(load_file(folder / role / "adapter_model.safetensors"))
    saved = torch.load(folder / "optimizers.pt", weights_only=True, map_location="cpu")
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][key])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return LoopState(**json.loads((folder / "state.json").read_text()))
