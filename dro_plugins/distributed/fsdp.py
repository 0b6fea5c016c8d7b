"""FSDP2: sharding a causal LM with adapters, gathering and resharding its weights, and decoding in lockstep.

Every function here is a collective or a no-op for a model that is not sharded; nothing outside
:mod:`dro_plugins.distributed` asks whether a model is sharded.
"""

from __future__ import annotations

import torch

from dro_plugins.errors import DROError


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


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (``DTensor``; no communication); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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


def fully_shard(model, plugin) -> None:
    """FSDP2 on ``model``, in place: each transformer block (the accelerate config's ``fsdp_transformer_layer_cls_to_wrap``,
    else the model's ``_no_split_modules``) is one unit, the rest is the root (:func:`fsdp_root`).

    Parameters keep their dtype (bfloat16 base, float32 adapters: :mod:`dro_plugins.distributed.device`); the config's resharding and
    CPU offloading apply.

    Raises:
        DROError: the model is not a causal LM with adapters (a retriever's query tower), has no block to shard, or
            has trainable parameters in two dtypes (FSDP reduces all of a unit's gradients in one).
    """
    from torch.distributed.fsdp import fully_shard as shard

    if not hasattr(model, "get_base_model"):
        raise DROError(
            f"FSDP shards causal LMs with LoRA adapters, not {type(model).__name__} (a retriever's query tower, "
            "selector.kind retriever or retriever.train): run it with a DDP accelerate config (distributed_type: MULTI_GPU) or torchrun"
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
        shard(block, **options)
    shard(root, offload_policy=plugin.cpu_offload)
