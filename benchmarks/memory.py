"""Activation memory of the M-step at real model shapes, measured without a GPU.

Models are built on PyTorch's ``meta`` device (shapes and dtypes, no data), so a Llama-3-8B layer runs in
milliseconds on a laptop. One forward pass of each scoring path runs under ``saved_tensors_hooks``, which sees
every tensor autograd keeps for the backward pass; tensors that share storage are counted once. That is the
activation memory of a training step, before the backward pass frees it.

Paths compared per question (NQ-like: 20 candidates x 100 words ≈ 3,000 prompt tokens, k = 5, m = 8):

- selector, ``separate``: the m sequences ``[prompt][z_i]`` scored as m rows (the plain Hugging Face way);
- selector, ``repeated cache``: the prompt run once with a KV cache, the cache repeated m times, then the m
  continuations (the path of main at 73436fe);
- selector, ``packed``: ``[prompt][z_1]...[z_m]`` in one row with a 4-D mask (:mod:`dro_plugins.modeling.packing`);
- generator: m sequences of ~800 tokens, without and with gradient checkpointing.

With gradient checkpointing on, autograd keeps only each block's input; the backward pass then recomputes one
block at a time, so the peak adds one block's activations (the per-layer figure without checkpointing).

Two attention kernels: ``math`` (PyTorch's reference sdpa, what a CPU runs: it keeps the ``[heads, T, T]``
probabilities) and ``fused`` (what sdpa's memory-efficient and flash kernels keep on a GPU: q, k, v, the mask,
the output and a log-sum-exp per query), the latter emulated by a stand-in attention function.

Usage: ``python benchmarks/memory.py [--shape llama-3-8b] [--prompt-tokens 3000] [--out benchmarks/results/memory.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dro_plugins.config import LoraConfig  # noqa: E402
from dro_plugins.modeling.loading import add_lora, enable_gradient_checkpointing, is_checkpointing  # noqa: E402
from dro_plugins.modeling.packing import additive_mask, pack_shared_prefix  # noqa: E402

SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, layers=32),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, layers=24),
}
GIB = 2**30


class _FusedKernelMemory(torch.autograd.Function):
    """Attention that keeps for backward what a fused GPU kernel keeps (no ``[heads, T, T]`` matrix)."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, mask, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only the forward's saved tensors are measured
        raise NotImplementedError


def fused_attention(module, query, key, value, attention_mask, **kwargs):
    """Stand-in for sdpa's memory-efficient/flash kernels: same inputs and output shape as transformers' sdpa."""
    return _FusedKernelMemory.apply(query, key, value, attention_mask).transpose(1, 2).contiguous(), None


AttentionInterface.register("fused_memory", fused_attention)
KERNELS = {"math": "sdpa", "fused": "fused_memory"}


def build(shape: str, layers: int, checkpointing: bool, kernel: str = "math"):
    """A bf16 LoRA (rank 8, all linear layers) model of ``shape`` with ``layers`` blocks, on the meta device."""
    spec = dict(SHAPES[shape])
    spec.pop("layers")
    config = LlamaConfig(**spec, num_hidden_layers=layers, max_position_embeddings=8192, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config._attn_implementation = KERNELS[kernel]
    model = add_lora(model, LoraConfig(rank=8, alpha=16), name="selector")
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


def saved_bytes(model, run) -> int:
    """Bytes autograd saves for backward while ``run()`` executes: each storage once, the model's weights not
    counted (they are resident anyway; a linear layer saves its weight for the input gradient)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def causal_mask(rows: int, queries: int, keys: int) -> torch.Tensor:
    """Additive causal mask ``[rows, 1, q, k]`` on the meta device: query i sees keys up to ``k - q + i``.

    Masks are passed in 4-D because transformers' own mask builder reads mask values, which meta tensors lack.
    """
    allowed = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    return additive_mask(allowed[None].to("meta"), torch.bfloat16).expand(rows, -1, -1, -1)


def selector_paths(model, prompt: int, label: int, m: int) -> dict:
    """Saved bytes of one question's selector scoring, per path."""
    meta = {"device": "meta"}
    output = label  # tokens of one permutation's continuation

    def separate():
        ids = torch.zeros(m, prompt + output, dtype=torch.long, **meta)
        model(input_ids=ids, attention_mask=causal_mask(m, prompt + output, prompt + output), logits_to_keep=output + 1, use_cache=False)

    def repeated_cache():
        ids = torch.zeros(1, prompt, dtype=torch.long, **meta)
        out = model(input_ids=ids, attention_mask=causal_mask(1, prompt, prompt), use_cache=True, logits_to_keep=1)
        out.cache.batch_repeat_interleave(m)
        model(
            input_ids=torch.zeros(m, output, dtype=torch.long, **meta), attention_mask=causal_mask(m, output, prompt + output),
            position_ids=torch.arange(prompt, prompt + output, **meta).expand(m, -1), cache=out.cache, use_cache=True,
            logits_to_keep=output,
        )

    def packed():
        rows = pack_shared_prefix([[0] * prompt], [[[0] * (output - 1)] * m], 0)
        model(
            input_ids=rows.input_ids.to("meta"),
            attention_mask=additive_mask(rows.allowed.to("meta"), torch.bfloat16),
            position_ids=rows.position_ids.to("meta"),
            logits_to_keep=rows.keep,
            use_cache=False,
        )

    paths = {"separate": saved_bytes(model, separate), "packed": saved_bytes(model, packed)}
    if not is_checkpointing(model):  # under checkpointing transformers turns the cache off: that path fails
        paths["repeated cache"] = saved_bytes(model, repeated_cache)
    return paths


def generator_path(model, length: int, answer: int, m: int) -> int:
    ids = torch.zeros(m, length, dtype=torch.long, device="meta")
    return saved_bytes(model, lambda: model(input_ids=ids, attention_mask=causal_mask(m, length, length), logits_to_keep=answer + 1, use_cache=False))


def measure(shape: str, prompt: int, label: int, generator_tokens: int, answer: int, m: int) -> dict:
    """Per-question saved bytes of each path at 1 and 2 blocks; per block = the difference, scaled to the full depth."""
    layers = SHAPES[shape]["layers"]
    hidden = SHAPES[shape]["hidden_size"]
    result: dict = {"shape": shape, "layers": layers, "prompt_tokens": prompt, "permutation_tokens": label, "num_samples": m,
                    "generator_tokens": generator_tokens, "answer_tokens": answer}
    rows = {}
    for kernel in KERNELS:
        for checkpointing in (False, True):
            one, two = (build(shape, n, checkpointing, kernel) for n in (1, 2))
            paths = {f"selector {k}": v for k, v in selector_paths(one, prompt, label, m).items()}
            paths_two = {f"selector {k}": v for k, v in selector_paths(two, prompt, label, m).items()}
            paths["generator"] = generator_path(one, generator_tokens, answer, m)
            paths_two["generator"] = generator_path(two, generator_tokens, answer, m)
            for name in paths:
                per_layer = paths_two[name] - paths[name]
                rest = paths[name] - per_layer
                tokens = {"generator": m * generator_tokens}.get(name, prompt + m * label if "packed" in name else m * (prompt + label))
                if checkpointing:  # block inputs are held by the checkpoint itself; autograd saw none of them
                    per_layer += tokens * hidden * 2
                rows[(name, kernel, checkpointing)] = {"per_layer": per_layer, "other": rest, "total": rest + layers * per_layer}
    for (name, kernel, checkpointing), row in rows.items():
        # one block is recomputed at a time under checkpointing
        row["peak"] = row["total"] + (rows[(name, kernel, False)]["per_layer"] if checkpointing else 0)
    result["paths"] = [{"path": name, "kernel": kernel, "gradient_checkpointing": ck, **row} for (name, kernel, ck), row in rows.items()]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--prompt-tokens", type=int, default=3000, help="selector prompt: 20 candidates x 100 words")
    parser.add_argument("--permutation-tokens", type=int, default=14, help="one permutation '[7] > [2] > ...' (k = 5)")
    parser.add_argument("--generator-tokens", type=int, default=800, help="generator prompt + answer: 5 passages")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=8, help="m")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = parser.parse_args(argv)
    result = measure(args.shape, args.prompt_tokens, args.permutation_tokens, args.generator_tokens, args.answer_tokens, args.num_samples)
    table = Table(title=f"activation memory per question, {args.shape} (bf16, LoRA r=8 all-linear), GiB")
    for column in ("path", "attention", "checkpointing", "per layer", "outside layers", "saved total", "peak"):
        table.add_column(column, justify="right")
    for row in result["paths"]:
        table.add_row(row["path"], row["kernel"], "on" if row["gradient_checkpointing"] else "off",
                      *(f"{row[key] / GIB:.3f}" for key in ("per_layer", "other", "total", "peak")))
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
