"""The process facade: what differs between one process and several (``accelerate launch``, ``torchrun``), and the
one lockstep rule (every process runs as many forwards as the busiest one) that the E-step, M-step and validation
share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from dro_plugins.distributed.fsdp import fsdp_root, fully_shard, reshard
from dro_plugins.errors import DROError

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


@dataclass(frozen=True)
class Sync:
    """Lockstep as model code sees it: whether processes run in lockstep (FSDP2: every forward needs every
    process), and whether all of them are done with a decoding loop.

    Model code (a selector's constrained decoding, a generator's greedy decoding and row grouping) reads this and
    never asks whether its model is sharded; :attr:`Runtime.sync` hands it out.
    """

    active: bool = False
    device: torch.device | None = None

    @property
    def generate_options(self) -> dict:
        """Keyword arguments for transformers' ``generate``: in lockstep each process decodes until all are done."""
        return {"synced_gpus": self.active}

    def all_done(self, done: bool) -> bool:
        """``done`` itself with one process or without lockstep; in lockstep, whether every process is done (one
        all-reduce per decoding step, as transformers' ``generate(synced_gpus=True)``): a process that is done keeps
        taking part in forwards until all are."""
        if not self.active:
            return done
        import torch.distributed as dist

        flag = torch.tensor([0.0 if done else 1.0], device=self.device)
        dist.all_reduce(flag)
        return flag.item() == 0.0


NO_SYNC = Sync()


class Runtime:
    """What differs between one process and several (``accelerate launch``, ``torchrun``): the trainer's only view of it.

    With one process every method is the identity or a no-op. Under a launcher (``WORLD_SIZE`` > 1) it holds an
    ``accelerate.Accelerator``: a process group (NCCL on GPUs, gloo on CPU), models prepared as DDP (with
    ``find_unused_parameters``, since each optimizer step uses one of two adapters on a shared base), and collective
    helpers. Work is split into contiguous shards in process order, so gathering restores the one-process order.

    With an accelerate config for FSDP (``fsdp_version: 2``) the weights are sharded instead (:meth:`prepare`), and
    every forward of a model needs every process: the processes then run in lockstep (:attr:`lockstep`), each
    padding its work to the same number of forwards (:meth:`share`, :meth:`lockstep_plan`, :class:`Sync`).

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
    def sync(self) -> Sync:
        """What model code needs of lockstep (:class:`Sync`); set on each trainable unit when it is prepared."""
        return Sync(self.lockstep, self.accelerator.device if self.lockstep else None)

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

    def lockstep_plan(self, micro_batches: list, filler) -> list[tuple[object, bool]]:
        """The one lockstep rule: ``(micro_batch, False)`` for each of this process's micro-batches, then
        ``(filler, True)`` until it runs as many as the busiest process (:meth:`calls`). A padding call's result is
        dropped (no gradient: its loss is multiplied by zero). At least one call, so a process with no work still
        joins a step's gradient all-reduce.

        Args:
            micro_batches: this process's micro-batches (lists of indices).
            filler: what a padding call runs (e.g. the last micro-batch).
        """
        calls = self.calls(max(len(micro_batches), 1))  # before any forward: a collective in lockstep
        return [(micro, False) for micro in micro_batches] + [(filler, True)] * (calls - len(micro_batches))

    def reshard(self, *models) -> None:
        """Put sharded (FSDP2) weights back to their shards, e.g. before an optimizer is built over them or a
        gradient is clipped; after an inference forward they may be the gathered copies. A no-op otherwise."""
        if self.lockstep:
            for model in models:
                reshard(model)

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

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (one all-reduce; every process must call it at the same point)."""
        if self.accelerator is None:
            return flag
        return self.sum(float(flag)) > 0

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
            fully_shard(model, self.fsdp)
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
