"""The run folder written by ``dro optimize``, and the models of a run.

Layout::

    config.yaml          the resolved run config
    metrics.jsonl        one line per EM iteration (iteration 0 = before DRO)
    report.json          best validation metrics and the per-iteration history
    selector/ generator/ best LoRA adapters (adapter_model.safetensors)
    generator-model/     the best generator merged into its base model (pipeline runs; see export_generator)
    base/                tiny base models and tokenizers, when the config uses a built-in tiny model (one shared
                         base lives in base/selector)
    checkpoint/          latest training state, for resuming
    samples/             E-step samples and importance weights per iteration
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dro_plugins.config import RunConfig, load_config
from dro_plugins.errors import DROError
from dro_plugins.generator import LMGenerator
from dro_plugins.models import add_lora, enable_gradient_checkpointing, load_base_model, load_lora
from dro_plugins.runtime import gradient_checkpointing_default, resolve_device
from dro_plugins.selector import LMSelector
from dro_plugins.units import AdapterUnit


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


ROLES = ("selector", "generator")


def shares_base(config: RunConfig, run_dir: Path) -> bool:
    """Whether the selector and the generator use one base model (loaded once, with two adapters).

    True when both name the same model with the same loading settings. A run written before bases were shared
    keeps its two tiny bases (``base/generator`` exists) and is loaded as it was trained.
    """
    selector, generator = config.selector, config.generator
    same = (selector.model, selector.trust_remote_code, selector.tiny) == (generator.model, generator.trust_remote_code, generator.tiny)
    return same and not (RunPaths(Path(run_dir)).tiny_base("generator") / "config.json").is_file()


def _load_base(config: RunConfig, role: str, run_dir: Path):
    """``role``'s base model and tokenizer; a shared base is the selector's (its tiny folder and seed)."""
    owner = "selector" if shares_base(config, run_dir) else role
    device, dtype = resolve_device(config.device)
    seed = config.seed + ROLES.index(owner)
    return load_base_model(getattr(config, owner), f"{role}.model", RunPaths(run_dir).tiny_base(owner), seed, device, dtype)


def _with_adapter(config: RunConfig, role: str, model, adapters: Path | None, trainable: bool):
    """``model`` with ``role``'s adapter: fresh (seeded) when ``adapters`` is None, else loaded from ``adapters/role``."""
    if adapters is None:
        torch.manual_seed(config.seed + ROLES.index(role))  # LoRA's initialisation draws from the global RNG
        return add_lora(model, getattr(config, role).lora, name=role, field=f"{role}.lora")
    return load_lora(model, Path(adapters) / role, name=role, trainable=trainable)


def load_model(config: RunConfig, role: str, run_dir: Path, adapters: Path | None = None, trainable: bool = True):
    """One role's base model with its LoRA adapter (named after the role), on the config's device.

    Args:
        config: the run config.
        role: "selector" or "generator".
        run_dir: run folder (tiny base models are written to and read from it).
        adapters: a folder holding ``<role>/`` LoRA adapters to load; fresh adapters when None.
        trainable: whether loaded adapters are trainable.

    Returns:
        ``(AdapterUnit, tokenizer)``.

    Raises:
        ModelLoadError: the base model cannot be loaded.
    """
    base, tokenizer = _load_base(config, role, Path(run_dir))
    model = _with_adapter(config, role, base, adapters, trainable)
    _set_checkpointing(config, model, [role])
    return AdapterUnit(model, role, trainable), tokenizer


def _set_checkpointing(config: RunConfig, model, roles: list[str]) -> None:
    device, _ = resolve_device(config.device)
    wanted = [getattr(config, role).gradient_checkpointing for role in roles]
    if any(gradient_checkpointing_default(device) if w is None else w for w in wanted):
        enable_gradient_checkpointing(model)


def make_selector(config: RunConfig, unit: AdapterUnit, tokenizer) -> LMSelector:
    """An :class:`LMSelector` with the config's k and passage length."""
    return LMSelector(unit.model, tokenizer, top_k=config.selector.top_k, max_passage_words=config.selector.max_passage_words, unit=unit)


def make_generator(config: RunConfig, unit: AdapterUnit, tokenizer) -> LMGenerator:
    """An :class:`LMGenerator` with the config's settings and the built-in prompt.

    A framework adapter sets ``generator.prompt`` to its pipeline's renderer afterwards (it needs the tokenizer).
    """
    section = config.generator
    return LMGenerator(
        unit.model,
        tokenizer,
        max_passage_words=section.max_passage_words,
        max_new_tokens=section.max_new_tokens,
        length_normalize=section.length_normalize,
        unit=unit,
    )


def build_models(config: RunConfig, run_dir: Path, adapters: Path | None = None, trainable: bool = True):
    """The selector and generator of a run (see :func:`load_model` for the arguments).

    When both name the same model (:func:`shares_base`), it is loaded once and carries both adapters.

    Returns:
        ``(LMSelector, LMGenerator)``.

    Raises:
        ModelLoadError: a base model cannot be loaded.
    """
    run_dir = Path(run_dir)
    if not shares_base(config, run_dir):
        selector = make_selector(config, *load_model(config, "selector", run_dir, adapters, trainable))
        return selector, make_generator(config, *load_model(config, "generator", run_dir, adapters, trainable))
    model, tokenizer = _load_base(config, "selector", run_dir)
    for role in ROLES:
        model = _with_adapter(config, role, model, adapters, trainable)
    _set_checkpointing(config, model, list(ROLES))
    units = {role: AdapterUnit(model, role, trainable) for role in ROLES}
    return make_selector(config, units["selector"], tokenizer), make_generator(config, units["generator"], tokenizer)


def saved_config(run_dir: str | Path, device: str | None = None) -> RunConfig:
    """The run config saved in a run folder, with ``device`` overridden when given.

    Raises:
        DROError: ``run_dir`` is not a run folder (no config.yaml).
    """
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise DROError(f"{run_dir}: not a run folder (no config.yaml); pass the output_dir of dro optimize")
    config = load_config(paths.config)
    if device is not None:
        config.device = device
    return config


def load_trained(run_dir: str | Path, device: str | None = None):
    """The best selector and generator of a finished (or interrupted) run, for inference.

    Returns:
        ``(RunConfig, LMSelector, LMGenerator)``.

    Raises:
        DROError: ``run_dir`` is not a run folder. ModelLoadError: a base model cannot be loaded.
    """
    config = saved_config(run_dir, device)
    selector, generator = build_models(config, Path(run_dir), adapters=Path(run_dir), trainable=False)
    return config, selector, generator


def load_trained_selector(run_dir: str | Path, device: str | None = None) -> LMSelector:
    """The best selector of a run, for inference (the generator is not loaded).

    Raises:
        DROError: ``run_dir`` is not a run folder. ModelLoadError: the base model cannot be loaded.
    """
    config = saved_config(run_dir, device)
    return make_selector(config, *load_model(config, "selector", Path(run_dir), adapters=Path(run_dir), trainable=False))


def export_generator(run_dir: str | Path, folder: str | Path) -> Path:
    """Merge the run's best generator adapter into its base model and save a plain Hugging Face folder.

    The folder (safetensors weights, tokenizer, chat template) loads with ``AutoModelForCausalLM`` without
    peft, so a pipeline's generator component can point at it. Written on CPU in float32.

    Raises:
        DROError: ``run_dir`` is not a run folder. ModelLoadError: the base model cannot be loaded.
    """
    config = saved_config(run_dir, "cpu")
    unit, tokenizer = load_model(config, "generator", Path(run_dir), adapters=Path(run_dir), trainable=False)
    unit.model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)
