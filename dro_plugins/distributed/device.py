"""Where tensors live and in which dtype: device resolution, the dtype policy, checkpointing defaults, OOM detection.

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

import torch

from dro_plugins.errors import ModelLoadError

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
