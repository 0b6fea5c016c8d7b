"""The run folder written by ``dro optimize``, and the models of a run.

Layout::

    config.yaml          the resolved run config
    metrics.jsonl        one line per EM iteration (iteration 0 = before DRO)
    report.json          best validation metrics and the per-iteration history
    selector/ generator/ best LoRA adapters (adapter_model.safetensors)
    base/                tiny base models and tokenizers, when the config uses a built-in tiny model
    checkpoint/          latest training state, for resuming
    samples/             E-step samples and importance weights per iteration
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dro_plugins.config import RunConfig, load_config
from dro_plugins.generator import LMGenerator
from dro_plugins.models import add_lora, load_base_model, load_lora, resolve_device
from dro_plugins.selector import LMSelector


@dataclass(frozen=True)
class RunPaths:
    """Paths inside a run folder."""

    root: Path

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

    def adapter(self, role: str) -> Path:
        """Best adapter folder of ``role`` ("selector" or "generator")."""
        return self.root / role

    def tiny_base(self, role: str) -> Path:
        return self.root / "base" / role


def build_models(config: RunConfig, run_dir: Path, adapters: Path | None = None, trainable: bool = True):
    """The selector and generator of a run, on the config's device.

    Args:
        config: the run config.
        run_dir: run folder (tiny base models are written to and read from it).
        adapters: a folder holding ``selector/`` and ``generator/`` LoRA adapters to load; fresh adapters when None.
        trainable: whether loaded adapters are trainable.

    Returns:
        ``(LMSelector, LMGenerator)``.

    Raises:
        ModelLoadError: a base model cannot be loaded.
    """
    paths = RunPaths(run_dir)
    device, dtype = resolve_device(config.device)
    models = {}
    for offset, (role, section) in enumerate((("selector", config.selector), ("generator", config.generator))):
        base, tokenizer = load_base_model(section, f"{role}.model", paths.tiny_base(role), config.seed + offset)
        base.to(device=device, dtype=dtype)
        if adapters is None:
            torch.manual_seed(config.seed + offset)  # LoRA's initialisation draws from the global RNG
            model = add_lora(base, section.lora)
        else:
            model = load_lora(base, adapters / role, trainable=trainable)
        models[role] = (model, tokenizer)
    selector = LMSelector(*models["selector"], top_k=config.selector.top_k, max_passage_words=config.selector.max_passage_words)
    generator = LMGenerator(
        *models["generator"],
        max_passage_words=config.generator.max_passage_words,
        max_new_tokens=config.generator.max_new_tokens,
        length_normalize=config.generator.length_normalize,
    )
    return selector, generator


def load_trained(run_dir: str | Path, device: str | None = None):
    """The best selector and generator of a finished (or interrupted) run, for inference.

    Returns:
        ``(RunConfig, LMSelector, LMGenerator)``.
    """
    paths = RunPaths(Path(run_dir))
    config = load_config(paths.config)
    if device is not None:
        config.device = device
    selector, generator = build_models(config, paths.root, adapters=paths.root, trainable=False)
    return config, selector, generator
