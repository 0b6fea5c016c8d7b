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
from collections.abc import Sequence
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


# Accelerate engines not supported (set in the environment by `accelerate launch --config_file ...`)
UNSUPPORTED_ENGINES = ("DEEPSPEED", "MEGATRON_LM")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def shard_range(count: int, rank: int, world_size: int) -> range:
    """Process ``rank``'s contiguous share of ``count`` items: sizes differ by at most one, earlier ranks larger, so
    concatenating the shares in rank order gives the items in order."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def fsdp_root(model):
    """The module that FSDP2 shards as its root: the causal LM inside a peft model, else the model.

    Not the ``PeftModel`` itself: peft's ``generate`` calls the inner model, which would then run outside the root's
    hooks (its parameters still sharded). The inner model holds every parameter, adapters included.
    """
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model) -> bool:
    """True when ``model``'s weights are sharded over processes (FSDP2): each of its forwards needs every process."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(fsdp_root(model), FSDPModule)


def reshard(model) -> None:
    """Put a sharded model's parameters back to their shards (a no-op for shards and for a model not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in fsdp_root(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_done(model, done: bool) -> bool:
    """Whether every process is done with a decoding loop: ``done`` itself unless ``model`` is sharded, in which case
    a process that is done must keep taking part in forwards until all are (one all-reduce per step, as
    transformers' ``generate(synced_gpus=True)``)."""
    if not is_sharded(model):
        return done
    import torch.distributed as dist

    flag = torch.tensor([0.0 if done else 1.0], device=next(model.parameters()).device)
    dist.all_reduce(flag)
    return flag.item() == 0.0


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A full tensor from a sharded one (``DTensor``; collective: every process calls it in the same order); any
    other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of full (one-process) optimizer state into an optimizer of sharded parameters: each
    state tensor shaped like its parameter is sharded like it (every process holds the full tensor, so this is local)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def _fully_shard(model, plugin) -> None:
    """FSDP2 on ``model``, in place: each transformer block (the accelerate config's ``fsdp_transformer_layer_cls_to_wrap``,
    else the model's ``_no_split_modules``) is one unit, the rest is the root (:func:`fsdp_root`).

    Parameters keep their dtype (bfloat16 base, float32 adapters, DESIGN.md §8); the config's resharding and
    CPU offloading apply.

    Raises:
        DROError: the model is not a causal LM with adapters (a retriever's query tower), has no block to shard, or
            has trainable parameters in two dtypes (FSDP reduces all of a unit's gradients in one).
    """
    from torch.distributed.fsdp import fully_shard

    if not hasattr(model, "get_base_model"):
        raise DROError(
            f"FSDP shards causal LMs with LoRA adapters, not a {type(model).__name__} (the retriever selector's query "
            "tower): run it with a DDP accelerate config (distributed_type: MULTI_GPU) or torchrun"
        )
    root = fsdp_root(model)
    names = set(plugin.transformer_cls_names_to_wrap or getattr(root, "_no_split_modules", None) or [])
    blocks = [module for module in list(root.modules())[1:] if type(module).__name__ in names]
    if not blocks:
        raise DROError(
            f"FSDP found no transformer block to shard in {type(root).__name__} (looked for {sorted(names) or 'its _no_split_modules'}): "
            "set fsdp_config.fsdp_transformer_layer_cls_to_wrap in the accelerate config to the model's decoder layer class"
        )
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in root.parameters() if p.requires_grad})
    if len(dtypes) > 1:
        raise DROError(
            f"FSDP needs every trained parameter in one dtype, and these are {' and '.join(dtypes)} (lora.modules_to_save "
            "copies run in the base's dtype, adapters in float32): drop lora.modules_to_save, or use DDP"
        )
    options = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload}
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(root, offload_policy=plugin.cpu_offload)


class Runtime:
    """What differs between one process and several (``accelerate launch``, ``torchrun``): the trainer's only view of it.

    With one process every method is the identity or a no-op. Under a launcher (``WORLD_SIZE`` > 1) it holds an
    ``accelerate.Accelerator``: a process group (NCCL on GPUs, gloo on CPU), models prepared as DDP (with
    ``find_unused_parameters``, since each optimizer step uses one of two adapters on a shared base), and collective
    helpers. Work is split into contiguous shards in process order, so gathering restores the one-process order.

    With an accelerate config for FSDP (``fsdp_version: 2``) the weights are sharded instead (:meth:`prepare`), and
    every forward of a model needs every process: the processes then run in lockstep (:attr:`lockstep`), each
    padding its work to the same number of forwards (:meth:`share`, :meth:`calls`, :func:`all_done`).

    Args:
        accelerator: None for one process.
        fsdp: the accelerate FSDP2 plugin (its settings from the accelerate config), or None for DDP.
    """

    def __init__(self, accelerator=None, fsdp=None):
        self.accelerator = accelerator
        self.fsdp = fsdp

    @classmethod
    def from_environment(cls, device_name: str, timeout_s: int = 600) -> Runtime:
        """One process, or an Accelerator when launched with ``WORLD_SIZE`` > 1.

        ``timeout_s`` bounds how long a process waits in a collective for the others (a dead peer then ends the run
        with an error instead of a hang).
        """
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        engines = [name for name in UNSUPPORTED_ENGINES if _flag(f"ACCELERATE_USE_{name}")]
        if engines:
            raise DROError(
                f"the accelerate config asks for {engines[0].replace('_', '-')}, which dro optimize does not run: use "
                "distributed_type: MULTI_GPU (DDP) or FSDP with fsdp_version: 2"
            )
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

        fsdp = None
        if _flag("ACCELERATE_USE_FSDP"):
            fsdp = FullyShardedDataParallelPlugin()  # reads the accelerate config's fsdp_* settings
            if fsdp.fsdp_version != 2:
                raise DROError("the accelerate config asks for FSDP version 1; dro optimize runs FSDP2: set fsdp_config.fsdp_version: 2")

        handlers = [
            # broadcast_buffers off: processes run different numbers of forwards (their shares differ), and a
            # buffer broadcast in each forward would then wait forever
            DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
        ]
        return cls(Accelerator(cpu=device_name == "cpu", kwargs_handlers=handlers), fsdp)

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def lockstep(self) -> bool:
        """True when the weights are sharded (FSDP2): every process must run every forward, in the same order."""
        return self.fsdp is not None

    @property
    def load_device(self) -> str | None:
        """Where base weights are read before :meth:`prepare`: the CPU in lockstep, since FSDP2 then moves each
        process's shard to its GPU (a base that does not fit one GPU never lands on one whole); None otherwise (the
        config's device)."""
        return "cpu" if self.lockstep else None

    def device_name(self, configured: str) -> str:
        """The config's ``device`` for this process: under a launcher with GPUs, this process's own GPU."""
        if self.accelerator is None or configured == "cpu" or self.accelerator.device.type != "cuda":
            return configured
        return str(self.accelerator.device)

    def shard(self, count: int) -> range:
        """This process's share of ``count`` items (:func:`shard_range`)."""
        return shard_range(count, self.rank, self.world_size)

    def share(self, items: Sequence) -> tuple[list, int]:
        """This process's share of ``items`` and how many of them are its own.

        In lockstep every share is padded to the largest with copies of the last item (as torch's
        ``DistributedSampler`` pads), so every process runs as many batches; the padding's results are dropped.
        """
        mine = [items[i] for i in self.shard(len(items))]
        if not self.lockstep or not items:
            return mine, len(mine)
        largest = -(-len(items) // self.world_size)  # the first process's share (shard_range)
        return mine + [items[-1]] * (largest - len(mine)), len(mine)

    def calls(self, count: int) -> int:
        """How many times to run a step that this process needs ``count`` times: the most any process needs, in
        lockstep (one all-reduce), so that all run it equally often; ``count`` otherwise."""
        if not self.lockstep:
            return count
        import torch.distributed as dist

        value = torch.tensor([count], device=self.accelerator.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

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
        """The model to train through: DDP-wrapped under a launcher, sharded in place with FSDP2 (the model itself
        is returned), the model itself with one process."""
        if self.accelerator is None:
            return model
        if self.lockstep:
            _fully_shard(model, self.fsdp)
            return model
        return self.accelerator.prepare_model(model)

    @contextlib.contextmanager
    def no_sync(self, model):
        """Accumulate gradients locally in the enclosed backward passes (no all-reduce or reduce-scatter)."""
        if self.accelerator is None:
            yield
        elif self.lockstep:
            root = fsdp_root(model)
            root.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                root.set_requires_gradient_sync(True)
        else:
            with self.accelerator.no_sync(model):
                yield
