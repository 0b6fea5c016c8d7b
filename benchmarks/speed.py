"""Speed of a DRO iteration per phase, side by side with the plain Hugging Face way of doing the same work.

Models have random weights built from real configurations (no download): ``tiny`` (the built-in tiny Llama and
its WordPiece vocabulary; CPU, seconds), ``qwen2.5-0.5b`` and ``qwen2.5-1.5b`` (the Qwen 3 tokenizer of
``../shared/tokenizers``), ``llama-3-8b`` (the Llama 3 tokenizer). One base carries the selector's and the
generator's LoRA adapters (rank 8, all linear layers), as in a run whose two models name the same base. The
questions are NQ training questions of ``../shared/data/nq`` with 20 candidates of about 100 words each.

Phases, ours (the code a run executes: :class:`dro_plugins.training.trainer.DROTrainer`'s own E-step, M-step and validation
calls, micro-batched by ``dro.max_tokens_per_microbatch``) against plain Hugging Face:

- ``sampling``: m permutations per question. Plain: ``generate(do_sample=True, num_return_sequences=m)`` with a
  logits processor that enforces the same permutation grammar (the prompt is copied m times).
- ``scoring``: the generator's answer log-likelihood of each permutation. Plain: one forward over the padded
  sequences with the full logits.
- ``selector_m_step`` / ``generator_m_step``: one importance-weighted LoRA step. Plain: a peft forward/backward on
  the m sequences ``[prompt][z_i]`` (selector) or the m generator sequences, full logits; gradient checkpointing as
  in the run (on for CUDA).
- ``validation``: greedy constrained selection, then greedy answers. Plain: constrained ``generate`` + ``generate``.

Figures per phase: questions/s; tokens/s and model FLOPs per question counted on the *ideal* work (each prompt once,
each continuation once; 2N per token forward; 4N frozen + 6N LoRA per token for training; attention included,
counted as PyTorch's FLOP counter counts it, over the full query x key rectangle; recomputation not counted), so
both paths are rated on the same work; MFU against the dense matmul peak measured in the same run (bf16 on CUDA,
float32 on CPU); peak GPU memory. ``--count-flops`` (the default on CPU) also runs each phase under
``torch.utils.flop_counter.FlopCounterMode`` and reports the FLOPs actually executed divided by the ideal.

Usage: ``python benchmarks/speed.py [--shape tiny] [--questions 4] [--candidates 20] [--words 100] [--top-k 5]
[--samples 8] [--out benchmarks/results/speed-tiny.json]``
"""

from __future__ import annotations

import argparse
import json
import lzma
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LogitsProcessor, LogitsProcessorList, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dro_plugins.config import LoraConfig, RunConfig, TinyModelConfig  # noqa: E402
from dro_plugins.data.examples import Example, load_examples  # noqa: E402
from dro_plugins.modeling.causal_lm import left_pad  # noqa: E402
from dro_plugins.modeling.loading import add_lora, build_tiny_model, enable_gradient_checkpointing, tiny_tokenizer, with_pad_token  # noqa: E402
from dro_plugins.modeling.permutation import DecodingState  # noqa: E402
from dro_plugins.build import make_generator, make_selector  # noqa: E402
from dro_plugins.selectors.base import question_seed  # noqa: E402
from dro_plugins.training.trainer import DROTrainer  # noqa: E402
from dro_plugins.modeling.units import AdapterUnit  # noqa: E402
from dro_plugins.training import estep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAPES = {  # real configurations (config.json of each model on the hub); random weights
    "tiny": None,
    "qwen2.5-0.5b": ("qwen3", Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)),
    "qwen2.5-1.5b": ("qwen3", Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)),
    "llama-3-8b": ("llama3", LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5, max_position_embeddings=8192)),
}
WORKLOADS = ("sampling", "scoring", "selector_m_step", "generator_m_step", "validation")
GIB = 2**30


# ---- FLOPs of the ideal work ----------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One forward call's worth of ideal work: ``tokens`` new tokens after ``context`` cached ones, ``logits``
    of them projected to the vocabulary."""

    tokens: int
    context: int
    logits: int


def linear_params(config, lora_rank: int) -> tuple[int, int]:
    """(base, LoRA) parameters of the transformer blocks' linear layers (LoRA on all of them)."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]
    return layers * sum(i * o for i, o in shapes), layers * sum(lora_rank * (i + o) for i, o in shapes)


def ideal_flops(config, lora_rank: int, segments: list[Segment], train: bool) -> float:
    """FLOPs of ``segments``: 2N per token forward; 4N frozen + 6N LoRA per token for training.

    Attention is ``4 x heads x head_dim x tokens x (context + tokens)`` per layer forward (the full rectangle, as
    ``FlopCounterMode`` counts sdpa) and three times that for training; the LM head is ``2 x d x V`` per logit
    forward, twice that for training (frozen: the input gradient only).
    """
    base, lora = linear_params(config, lora_rank)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    total = 0.0
    for s in segments:
        attention = config.num_hidden_layers * 4 * config.num_attention_heads * head * s.tokens * (s.context + s.tokens)
        vocab = 2 * config.hidden_size * config.vocab_size * s.logits
        if train:
            total += (4 * base + 6 * lora) * s.tokens + 3 * attention + 2 * vocab
        else:
            total += 2 * (base + lora) * s.tokens + attention + vocab
    return total


def measured_peak_flops(device: torch.device) -> tuple[float, str]:
    """Dense matmul FLOP/s measured here: bf16 8192^3 on CUDA, float32 1024^3 on CPU (best of a few runs)."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * size**3 / best, str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- models and inputs ----------------------------------------------------------------------------


def build(shape: str, device: torch.device, dtype: torch.dtype, config: RunConfig, tokenizers: Path):
    """Selector and generator (one random-weight base, two LoRA adapters) and the model config."""
    if shape == "tiny":
        tokenizer = tiny_tokenizer()
        base = build_tiny_model("tiny-llama", TinyModelConfig(), tokenizer, seed=0)
    else:
        tokenizer_name, model_config = SHAPES[shape]
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(_unpacked_tokenizer(tokenizers, tokenizer_name)))
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation="sdpa")
    base = base.to(device=device, dtype=dtype)
    model = add_lora(base, config.selector.lora, "selector")
    model = add_lora(model, config.generator.lora, "generator")
    if device.type == "cuda":
        enable_gradient_checkpointing(model)
    selector = make_selector(config, AdapterUnit(model, "selector"), tokenizer)
    generator = make_generator(config, AdapterUnit(model, "generator"), tokenizer)
    return selector, generator, base.config


def _unpacked_tokenizer(root: Path, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"speed-{name}-"))
    (folder / "tokenizer_config.json").write_bytes((root / name / "tokenizer_config.json").read_bytes())
    (folder / "tokenizer.json").write_bytes(lzma.decompress((root / name / "tokenizer.json.xz").read_bytes()))
    return folder


def run_config(args) -> RunConfig:
    lora = LoraConfig(rank=args.lora_rank)
    return RunConfig.model_validate({
        "data": {"train": str(args.data), "validation": str(args.data), "num_candidates": args.candidates},
        "selector": {"model": args.shape, "top_k": args.top_k, "max_passage_words": args.words, "lora": lora.model_dump()},
        "generator": {"model": args.shape, "max_passage_words": args.words, "max_new_tokens": 8, "lora": lora.model_dump()},
        "dro": {"num_samples": args.samples, "batch_size": args.questions},
        "eval_batch_size": args.questions,
    })


# ---- plain Hugging Face baselines -------------------------------------------------------------------


class PermutationGrammarProcessor(LogitsProcessor):
    """``generate``'s logits processor for the selector's permutation grammar: row r may only write what its
    :class:`DecodingState` allows, and ``stop_id`` once its permutation is complete."""

    def __init__(self, grammars, prompt_length: int, stop_id: int):
        self.states = [DecodingState(g) for g in grammars]
        self.prompt_length = prompt_length
        self.stop_id = stop_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_length:
            for state, token in zip(self.states, input_ids[:, -1].tolist()):
                if not state.done:
                    state.advance(token)
        mask = torch.full_like(scores, float("-inf"))
        for row, state in enumerate(self.states):
            mask[row, list(state.allowed()) if not state.done else [self.stop_id]] = 0.0
        return scores + mask


def plain_generate_permutations(selector, batch: list[Example], num_samples: int, sample: bool) -> list[list[list[int]]]:
    """Constrained ``generate`` with ``num_return_sequences`` (the prompt expanded m times); permutations per question."""
    selector.activate()
    model, tokenizer, k = selector.model, selector.tokenizer, selector.top_k
    grammars = [selector.grammar(len(ex.candidates), k) for ex in batch]
    ids, mask, _ = left_pad([selector.prompt_ids(ex, k) for ex in batch], tokenizer.pad_token_id, selector.device)
    stop = tokenizer.eos_token_id
    processor = PermutationGrammarProcessor([g for g in grammars for _ in range(num_samples)], ids.shape[1], stop)
    model.eval()
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, do_sample=sample, top_k=None, top_p=None, temperature=None,
            num_return_sequences=num_samples, max_new_tokens=max(g.max_length for g in grammars) + 1,
            logits_processor=LogitsProcessorList([processor]), pad_token_id=tokenizer.pad_token_id, eos_token_id=stop,
        )
    picked = [state.picked for state in processor.states]
    return [picked[b * num_samples : (b + 1) * num_samples] for b in range(len(batch))]


def _right_padded(sequences, pad: int, device):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def plain_sequence_log_likelihood(model, sequences, targets, pad: int, device) -> torch.Tensor:
    """Sum of target-token log-probs per sequence, from one forward over the padded batch with full logits."""
    ids, mask = _right_padded(sequences, pad, device)
    log_probs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
    totals = []
    for row, (seq, target) in enumerate(zip(sequences, targets)):
        start = len(seq) - len(target)
        positions = torch.arange(start - 1, len(seq) - 1, device=device)
        totals.append(log_probs[row, positions, torch.tensor(target, device=device)].sum())
    return torch.stack(totals)


def generator_rows(generator, batch, permutations) -> tuple[list[list[int]], list[list[int]]]:
    sequences, targets = [], []
    for example, rows in zip(batch, permutations):
        for permutation in rows.tolist():
            prompt, target = generator.sequence(example, permutation)
            sequences.append(prompt + target)
            targets.append(target)
    return sequences, targets


def selector_rows(selector, batch, permutations) -> tuple[list[list[int]], list[list[int]]]:
    sequences, targets = [], []
    for example, rows in zip(batch, permutations):
        grammar = selector.grammar(len(example.candidates), permutations.shape[2])
        prompt = selector.prompt_ids(example, permutations.shape[2])
        for permutation in rows.tolist():
            target = grammar.encode(permutation)
            sequences.append(prompt + target)
            targets.append(target)
    return sequences, targets


def plain_m_step(unit, model, sequences, targets, weights: torch.Tensor, pad: int, device) -> None:
    """One LoRA step of the plain way: weighted NLL of the targets, full logits, backward."""
    unit.activate()
    model.train()
    log_likelihoods = plain_sequence_log_likelihood(model, sequences, targets, pad, device)
    (-(weights.flatten().to(device) * log_likelihoods).sum() / weights.shape[0]).backward()
    model.zero_grad(set_to_none=True)


# ---- the benchmark --------------------------------------------------------------------------------


def ideal_segments(selector, generator, batch, permutations) -> dict[str, tuple[list[Segment], bool]]:
    """Each phase's ideal work for ``batch`` and its sampled ``permutations`` ``[B, m, k]``; True = training."""
    sampling, selector_train, scoring, validation = [], [], [], []
    k = permutations.shape[2]
    for example, rows in zip(batch, permutations):
        grammar = selector.grammar(len(example.candidates), k)
        prompt = len(selector.prompt_ids(example, k))
        continuations = [len(grammar.encode(p)) for p in rows.tolist()]
        sampling.append(Segment(prompt, 0, 1))
        sampling += [Segment(c - 1, prompt, c - 1) for c in continuations]
        selector_train.append(Segment(prompt, 0, 0))
        selector_train += [Segment(c - 1, prompt, len(grammar.choices(p))) for c, p in zip(continuations, rows.tolist())]
        validation += [Segment(prompt, 0, 1), Segment(continuations[0] - 1, prompt, continuations[0] - 1)]
        for permutation in rows.tolist():
            prompt_ids, target = generator.sequence(example, permutation)
            scoring.append(Segment(len(prompt_ids) + len(target), 0, len(target)))
        prompt_ids, target = generator.sequence(example, rows[0].tolist())
        validation += [Segment(len(prompt_ids), 0, 1), Segment(len(target), len(prompt_ids), len(target))]
    return {
        "sampling": (sampling, False),
        "scoring": (scoring, False),
        "selector_m_step": (selector_train, True),
        "generator_m_step": (scoring, True),
        "validation": (validation, False),
    }


def phase_calls(trainer: DROTrainer, batch, permutations, weights, seed: int) -> dict[str, dict]:
    """Per phase: ``ours`` and ``plain`` zero-argument calls doing the same work on ``batch``."""
    selector, generator, device = trainer.selector, trainer.generator, trainer.selector.device
    pad = selector.tokenizer.pad_token_id
    optimizers = trainer.optimizers
    generator_sequences = generator_rows(generator, batch, permutations)
    selector_sequences = selector_rows(selector, batch, permutations)

    def plain_validation():
        picks = [rows[0] for rows in plain_generate_permutations(selector, batch, 1, sample=False)]
        generator.activate()
        prompts = [generator.prompt_ids(ex, p) for ex, p in zip(batch, picks)]
        ids, mask, _ = left_pad(prompts, pad, device)
        with torch.no_grad():
            generator.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=generator.max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=list(generator.stop_ids),
            )

    def plain_scoring():
        generator.activate()
        with torch.no_grad():
            plain_sequence_log_likelihood(generator.model, *generator_sequences, pad, device)

    return {
        "sampling": {"ours": lambda: estep.draw(trainer.session, batch, seed), "plain": lambda: plain_generate_permutations(selector, batch, permutations.shape[1], True)},
        "scoring": {"ours": lambda: estep.score(trainer.session, batch, permutations), "plain": plain_scoring},
        "selector_m_step": {
            "ours": lambda: trainer.step("selector", batch, permutations, weights, optimizers["selector"]),
            "plain": lambda: plain_m_step(selector.unit, selector.model, *selector_sequences, weights, pad, device),
        },
        "generator_m_step": {
            "ours": lambda: trainer.step("generator", batch, permutations, weights, optimizers["generator"]),
            "plain": lambda: plain_m_step(generator.unit, generator.model, *generator_sequences, weights, pad, device),
        },
        "validation": {"ours": trainer.validate, "plain": plain_validation},
    }


def timed(call, device: torch.device) -> tuple[float, float | None]:
    """Seconds of one call and its peak GPU memory (GiB; None on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started = time.perf_counter()
    call()
    _sync(device)
    seconds = time.perf_counter() - started
    return seconds, (torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None)


def _count_cpu_attention() -> None:
    """Teach ``FlopCounterMode`` the CPU sdpa kernel (PyTorch counts only the CUDA ones): 4 x b x h x s_q x s_k x d
    forward (two matmuls), twice that backward (four), as it counts the CUDA kernels."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        batch, heads, queries, dim = query
        return 4 * batch * heads * queries * key[2] * dim

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        batch, heads, queries, dim = query
        return 8 * batch * heads * queries * key[2] * dim


def executed_flops(call) -> float:
    """FLOPs that ``call`` executes, as ``FlopCounterMode`` counts them (matmuls and attention)."""
    _count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def benchmark(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = run_config(args)
    selector, generator, model_config = build(args.shape, device, dtype, config, args.tokenizers)
    examples = load_examples(args.data, args.candidates, args.top_k, args.questions, True)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = DROTrainer(config, selector, generator, examples, examples, Path(run_dir))
        seed = question_seed(0, "speed")
        permutations, _ = estep.draw(trainer.session, examples, seed)  # also a warm-up of every kernel the sampling path uses
        weights = torch.full(permutations.shape[:2], 1.0 / permutations.shape[1])
        calls = phase_calls(trainer, examples, permutations, weights, seed)
        work = ideal_segments(selector, generator, examples, permutations)
        ideal = {phase: ideal_flops(model_config, args.lora_rank, segments, train) for phase, (segments, train) in work.items()}
        tokens = {phase: sum(s.tokens for s in segments) for phase, (segments, _) in work.items()}
        peak, peak_dtype = measured_peak_flops(device)
        count = args.count_flops if args.count_flops is not None else device.type == "cpu"
        rows = []
        for phase in WORKLOADS:
            for path in ("ours", "plain"):
                if device.type == "cuda":  # first call compiles kernels and grows the allocator
                    calls[phase][path]()
                seconds, memory = timed(calls[phase][path], device)
                executed = executed_flops(calls[phase][path]) if count else None
                q = len(examples)
                rows.append({
                    "phase": phase, "path": path, "seconds": seconds, "questions_per_s": q / seconds,
                    "tokens_per_s": tokens[phase] / seconds, "model_flops_per_question": ideal[phase] / q,
                    "mfu": ideal[phase] / seconds / peak, "peak_memory_gib": memory,
                    "executed_flops_per_question": None if executed is None else executed / q,
                    "flop_overhead": None if executed is None else executed / ideal[phase],
                })
    base, lora = linear_params(model_config, args.lora_rank)
    return {
        "shape": args.shape, "device_type": device.type, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "date": date.today().isoformat(), "commit": _commit(),
        "torch": torch.__version__, "questions": len(examples), "candidates": args.candidates, "words": args.words,
        "top_k": args.top_k, "num_samples": args.samples, "lora_rank": args.lora_rank,
        "linear_params": base, "lora_params": lora, "peak_flops": peak, "peak_dtype": peak_dtype,
        "max_tokens_per_microbatch": config.dro.max_tokens_per_microbatch, "rows": rows,
        "e_step_questions_per_s": {
            path: len(examples) / sum(r["seconds"] for r in rows if r["path"] == path and r["phase"] in ("sampling", "scoring"))
            for path in ("ours", "plain")
        },
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(result: dict) -> Table:
    title = (
        f"{result['shape']} on {result['device']} ({result['dtype']}), {result['questions']} questions x "
        f"{result['candidates']} candidates, k={result['top_k']}, m={result['num_samples']}; peak "
        f"{result['peak_flops'] / 1e12:.2f} TFLOP/s {result['peak_dtype']}"
    )
    out = Table(title=title)
    for column in ("phase", "path", "q/s", "tokens/s", "GFLOP/q", "MFU", "GiB", "FLOPs/ideal"):
        out.add_column(column, justify="right")
    for r in result["rows"]:
        out.add_row(
            r["phase"], r["path"], f"{r['questions_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['model_flops_per_question'] / 1e9:.2f}", f"{100 * r['mfu']:.1f}%",
            "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
            "-" if r["flop_overhead"] is None else f"{r['flop_overhead']:.2f}",
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--questions", type=int, default=4, help="questions per phase (one batch)")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--words", type=int, default=100, help="words per passage in the prompts")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8, help="m, permutations per question")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--count-flops", action=argparse.BooleanOptionalAction, default=None, help="default: on CPU only")
    parser.add_argument("--data", type=Path, default=SHARED / "data/nq/train.jsonl")
    parser.add_argument("--tokenizers", type=Path, default=SHARED / "tokenizers")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/speed-<shape>-<device>.json")
    args = parser.parse_args(argv)
    result = benchmark(args)
    Console(width=120).print(table(result))
    out = args.out or REPO / "benchmarks/results" / f"speed-{args.shape}-{result['device_type']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
