"""Processes and devices: the :class:`~.runtime.Runtime` facade (one process, DDP or FSDP2, and the lockstep rule),
FSDP2 itself (:mod:`.fsdp`), and device and dtype policy (:mod:`.device`).

The names below are also what ``dro_plugins.runtime`` (the module before the layout of folders) offered.
"""

from dro_plugins.distributed.device import gradient_checkpointing_default, is_out_of_memory, resolve_device
from dro_plugins.distributed.fsdp import fsdp_root, gathered, is_sharded, reshard, shard_optimizer_state
from dro_plugins.distributed.runtime import NO_SYNC, Runtime, Sync, shard_range

__all__ = [
    "NO_SYNC", "Runtime", "Sync", "fsdp_root", "gathered", "gradient_checkpointing_default", "is_out_of_memory", "is_sharded",
    "reshard", "resolve_device", "shard_optimizer_state", "shard_range",
]
