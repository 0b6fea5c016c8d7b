"""Where tensors live, in which dtype, and in how many processes: the one place that policy is written down.

Dtype policy (tested in ``tests/test_units.py``):

- **Base weights** are in the compute dtype: bfloat16 on a CUDA GPU that supports it, else float32. They are
  loaded directly in it (``from_pretrained(dtype=..., device_map=...)``), never through a float32 copy.
- **LoRA adapters and their AdamW state** are float32. An M-step update is ~1e-4 of a weight; bfloat16 keeps 8
  bits of mantissa (relative step 2^-8 ≈ 4e-3), so most updates would round to nothing. peft keeps adapters in
  float32 by default (``autocast_adapter_dtype=True``) and casts each adapter layer's input to float32 and its
  output back; that keeps training exact. Where no gradient flows (E-step sampling and scoring, validation) each
  adapter runs as a copy in the compute dtype (``AdapterUnit.computing_in``), which saves the casts and the float32
  LoRA matmuls; the float32 masters are put back unchanged.
- **``modules_to_save`` copies** (e.g. embeddings of tiny random models) stay in the compute dtype: they replace a
  base module inside the forward, so they must run in its dtype.
- **Log-probabilities, importance weights and losses** are float32: logits are cast up before any softmax.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch

from dro_plugins.errors import DROError, ModelLoadError

ADAPTER_DTYPE = torch.float32
LOG_PROB_DTYPE = torch.float32


def resolve_device(name: str) -> tuple[torch.device, torch.dtype]:
    """Map the config's ``device`` to a torch device and the compute dtype of base weights.

    ``auto`` picks CUDA with bfloat16 when a GPU is present (float32 if the GPU lacks bf16), else CPU float32.

    Raises:
        ModelLoadError: a CUDA device is named but no GPU is visible.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device: '{name}' asked for but no CUDA GPU is visible; use device: auto or cpu")
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return device, torch.float32


def gradient_checkpointing_default(device: torch.device) -> bool:
    """Gradient checkpointing when a model's setting is left unset: on for CUDA (memory), off on CPU (speed)."""
    return device.type == "cuda"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# Accelerate engines that shard the weights (set in the environment by `accelerate launch --config_file ...`)
UNSUPPORTED_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def shard_range(count: int, rank: int, world_size: int) -> range:
    """Process ``rank``'s contiguous share of ``count`` items: sizes differ by at most one, earlier ranks larger, so
    concatenating the shares in rank order gives the items in order."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class Runtime:
    """What differs between one process and several (``accelerate launch``, ``torchrun``): the trainer's only view of it.

    With one process every method is the identity or a no-op. Under a launcher (``WORLD_SIZE`` > 1) it holds an
    ``accelerate.Accelerator``: a process group (NCCL on GPUs, gloo on CPU), models prepared as DDP (with
    ``find_unused_parameters``, since each optimizer step uses one of two adapters on a shared base), and collective
    helpers. Work is split into contiguous shards in process order, so gathering restores the one-process order.

    Args:
        accelerator: None for one process.
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator

    @classmethod
    def from_environment(cls, device_name: str, timeout_s: int = 600) -> Runtime:
        """One process, or an Accelerator when launched with ``WORLD_SIZE`` > 1.

        ``timeout_s`` bounds how long a process waits in a collective for the others (a dead peer then ends the run
        with an error instead of a hang).
        """
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        engines = [name for name in UNSUPPORTED_ENGINES if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true")]
        if engines:  # they shard weights, so every forward would need all processes in step: not built (DESIGN.md §8)
            raise DROError(
                f"the accelerate config asks for {engines[0].replace('_', '-')}; dro optimize runs data-parallel (DDP) only "
                "so far: use an accelerate config with distributed_type: MULTI_GPU (or MULTI_CPU), or torchrun"
            )
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        handlers = [
            # broadcast_buffers off: processes run different numbers of forwards (their shares differ), and a
            # buffer broadcast in each forward would then wait forever
            DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
        ]
        return cls(Accelerator(cpu=device_name == "cpu", kwargs_handlers=handlers))

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_name(self, configured: str) -> str:
        """The config's ``device`` for this process: under a launcher with GPUs, this process's own GPU."""
        if self.accelerator is None or configured == "cpu" or self.accelerator.device.type != "cuda":
            return configured
        return str(self.accelerator.device)

    def shard(self, count: int) -> range:
        """This process's share of ``count`` items (:func:`shard_range`)."""
        return shard_range(count, self.rank, self.world_size)

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the enclosed block first (e.g. writing a tiny base model), then the others."""
        if not self.is_main:
            self.wait()
        yield
        if self.is_main:
            self.wait()

    def gather(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in process order, on every process."""
        if self.accelerator is None:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum(self, value: float) -> float:
        """``value`` summed over processes."""
        if self.accelerator is None:
            return value
        return float(self.accelerator.reduce(torch.tensor([value], device=self.accelerator.device), reduction="sum").item())

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def prepare(self, model):
        """The model to train through: DDP-wrapped under a launcher, the model itself otherwise."""
        return model if self.accelerator is None else self.accelerator.prepare_model(model)

    def no_sync(self, model):
        """Accumulate gradients locally in the enclosed backward passes (no all-reduce)."""
        return contextlib.nullcontext() if self.accelerator is None else self.accelerator.no_sync(model)
