"""Trainable units (:class:`dro_plugins.selectors.base.TrainableUnit`): a LoRA adapter, or a retriever's query tower.

:class:`AdapterUnit` is one role's LoRA adapter on a (possibly shared) peft model.

When the selector and the generator name the same base model, it is loaded once and carries two adapters,
``selector`` and ``generator`` (peft multi-adapter, as TRL's ``add_adapter("ref")`` on one base). A unit is then
(model, adapter name): :meth:`AdapterUnit.activate` switches the model to its adapter before a forward, and its
parameters, state dict and saved folder hold that adapter only. With separate bases each model carries one
adapter, named after its role, and nothing else changes. Parameters are found by adapter name, not by
``requires_grad``: peft's ``set_adapter`` flips ``requires_grad`` of the adapters it deactivates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save
from torch.distributed.tensor.experimental import implicit_replication

from dro_plugins.files import atomic_write_bytes, atomic_write_text
from dro_plugins.distributed.fsdp import gathered
from dro_plugins.distributed.runtime import NO_SYNC, Sync


class AdapterUnit:
    """One named LoRA adapter of a peft model.

    Args:
        model: a ``PeftModel`` that holds an adapter called ``name``.
        name: the adapter's name ("selector" or "generator").
        trainable: False for inference (``activate`` then keeps the adapter frozen).
    """

    def __init__(self, model, name: str, trainable: bool = True):
        if name not in model.peft_config:
            raise ValueError(f"the model has no adapter named '{name}' (it has {', '.join(model.peft_config)})")
        self.model = model
        self.name = name
        self.trainable = trainable
        self.prepared = model  # the data-parallel wrapper training runs through (Runtime.prepare), else the model
        self.sync = NO_SYNC  # lockstep as model code sees it (Runtime.sync, set when the trainer prepares the model)

    def scoring_model(self):
        """The model a score runs through: the prepared (DDP) wrapper when gradients flow, so its hooks see every
        differentiable forward; the plain model otherwise (sampling and generation need no gradient sync, and the
        processes run different numbers of them)."""
        return self.prepared if torch.is_grad_enabled() else self.model

    def activate(self) -> None:
        """Make this adapter the active one (a no-op when it already is)."""
        if self.model.active_adapter != self.name:
            self.model.set_adapter(self.name, inference_mode=not self.trainable)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This adapter's own parameters (LoRA matrices and its ``modules_to_save`` copies), by name.

        With sharded weights (FSDP2) call ``Runtime.reshard`` first: after an inference forward these would be the
        gathered copies, which FSDP discards.
        """
        marker = f".{self.name}."
        return [(n, p) for n, p in self.model.named_parameters() if marker in n]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups: the whole adapter at ``lr``."""
        return [{"params": self.parameters(), "lr": lr}]

    @contextmanager
    def computing_in(self, dtype: torch.dtype) -> Iterator[None]:
        """For the enclosed inference, this adapter's weights are ``dtype`` copies; the float32 masters come back after.

        A float32 adapter on a bf16 base makes peft cast every LoRA input up to float32 and run the LoRA matmuls in
        float32 (:mod:`dro_plugins.distributed.device`); sampling, scoring and validation need no gradient, so they can run the adapter in the
        base's dtype. The parameters stay the same objects (only ``.data`` is swapped), so optimizers are unaffected.
        For inference only: a gradient taken inside would be in ``dtype``. Sharded weights (FSDP2) are left as they
        are: FSDP gathers them from its own storage, which swapping ``.data`` would not reach.
        """
        if self.sync.active:
            yield
            return
        params = [p for p in self.parameters() if p.is_floating_point() and p.dtype != dtype]
        masters = [p.data for p in params]
        for param in params:
            param.data = param.data.to(dtype)
        try:
            yield
        finally:
            for param, master in zip(params, masters):
                param.data = master

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's full weights with peft's adapter-free keys (the format of ``adapter_model.safetensors``).

        With sharded weights (FSDP2) the shards are gathered: every process must call it, in the same order.
        """
        return {k: gathered(v) for k, v in get_peft_model_state_dict(self.model, adapter_name=self.name).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved adapter weights (any device or dtype) into this adapter.

        Raises:
            ValueError: the saved weights do not fit this adapter (other base model or LoRA settings).
        """
        with implicit_replication():  # sharded (FSDP2) parameters take their shard of each full tensor
            result = set_peft_model_state_dict(self.model, state, adapter_name=self.name)
        missing = [k for k in result.missing_keys if f".{self.name}." in k]
        if missing:
            raise ValueError(f"saved adapter weights lack {len(missing)} tensors of adapter '{self.name}', e.g. {missing[0]}")

    def load(self, folder: Path) -> None:
        """Load ``adapter_model.safetensors`` of a folder :meth:`save` wrote (see :meth:`load_state_dict`)."""
        self.load_state_dict(load_file(Path(folder) / "adapter_model.safetensors"))

    def save(self, folder: Path | None) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``, each file atomically.

        The folder loads with ``PeftModel.from_pretrained(base, folder)`` like any peft adapter folder, and with
        ``AutoPeftModelForCausalLM.from_pretrained(folder)`` from any working directory: a local base model is
        recorded by its absolute path, a hub id as it is. ``folder`` None writes nothing: a process that only takes
        part in gathering sharded weights (:meth:`state_dict`) for the one that writes.
        """
        weights = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        if folder is None:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "adapter_model.safetensors", save(weights, metadata={"format": "pt"}))
        config = self.model.peft_config[self.name].to_dict()
        config["target_modules"] = sorted(config["target_modules"]) if isinstance(config.get("target_modules"), (set, list)) else config.get("target_modules")
        config["inference_mode"] = True
        base = config.get("base_model_name_or_path")
        if base and Path(base).is_dir():  # peft resolves a relative folder against the working directory
            config["base_model_name_or_path"] = str(Path(base).resolve())
        atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    return str(value)


class EncoderUnit:
    """The retriever selector's trainable unit: a query tower trained in full, with its temperature.

    Args:
        model: a :class:`dro_plugins.selectors.retriever.BiEncoderScorer` (the sentence-transformers query encoder
            and ``log_temperature``).

    Its saved folder is a complete sentence-transformers model (``SentenceTransformer(folder)``, Haystack's
    ``SentenceTransformersTextEmbedder(model=folder)`` and LlamaIndex's ``HuggingFaceEmbedding(model_name=folder)``
    load it) plus ``temperature.json``.
    """

    TEMPERATURE_FILE = "temperature.json"

    def __init__(self, model):
        self.model = model
        self.prepared = model  # the data-parallel wrapper (Runtime.prepare), else the model

    def scoring_model(self):
        """The prepared wrapper when gradients flow (its hooks must see each differentiable forward), else the model."""
        return self.prepared if torch.is_grad_enabled() else self.model

    def activate(self) -> None:
        """Nothing to switch: the query tower is a model of its own."""

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The query tower's weights and ``log_temperature`` (when it is trained)."""
        return [(n, p) for n, p in self.model.named_parameters() if n != "log_temperature" or self.model.train_temperature]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def parameter_groups(self, lr: float) -> list[dict]:
        """The query tower at ``lr``; ``log_temperature`` (when trained) at its own learning rate, since a rate fit
        for a pretrained encoder would barely move it."""
        groups = [{"params": [p for n, p in self.named_parameters() if n != "log_temperature"], "lr": lr}]
        if self.model.train_temperature:
            groups.append({"params": [self.model.log_temperature], "lr": self.model.temperature_learning_rate})
        return groups

    @contextmanager
    def computing_in(self, dtype: torch.dtype) -> Iterator[None]:
        """The encoder is small and runs in float32 throughout; nothing changes."""
        yield

    def save(self, folder: Path | None) -> None:
        """Write the query tower as a sentence-transformers folder and ``temperature.json`` into ``folder`` (None: nothing
        to do; the query tower is never sharded)."""
        if folder is None:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.encoder.save(str(folder))
        atomic_write_text(folder / self.TEMPERATURE_FILE, json.dumps({"temperature": self.model.temperature}))

    def load(self, folder: Path) -> None:
        """Copy a saved query tower and temperature (any device) into this unit.

        Raises:
            ValueError: the folder holds another architecture's weights.
        """
        folder = Path(folder)
        transformer = self.model.encoder[0].auto_model
        result = transformer.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
        if result.missing_keys:
            raise ValueError(f"{folder}: the saved query encoder lacks {len(result.missing_keys)} weights, e.g. {result.missing_keys[0]}")
        temperature = json.loads((folder / self.TEMPERATURE_FILE).read_text())["temperature"]
        with torch.no_grad():
            self.model.log_temperature.fill_(math.log(temperature))


class AdapterRole:
    """What the LM selector and the generator share as roles on a (possibly shared) peft model: ``self.model`` and
    ``self.unit`` (an :class:`AdapterUnit`, or None for a plain model used as it is)."""

    model: torch.nn.Module
    unit: AdapterUnit | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def activate(self) -> None:
        """Switch a shared base model to this role's adapter (a no-op otherwise)."""
        if self.unit is not None:
            self.unit.activate()

    @property
    def sync(self) -> Sync:
        """Lockstep as this model sees it: its unit's (``Runtime.sync``), or none without a unit."""
        return NO_SYNC if self.unit is None else self.unit.sync
