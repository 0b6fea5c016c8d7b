"""Throughput of a run per workload: seconds, questions/s, tokens/s and peak GPU memory.

A DRO iteration has four timed workloads: ``sampling`` (the selector draws m permutations per question, E-step),
``scoring`` (the generator's answer log-likelihood of each, E-step), ``m_step`` (both importance-weighted updates)
and ``validation`` (greedy selection and generation). Tokens are the tokens of each question's forward rows
(:attr:`dro_plugins.modeling.batching.Shape.tokens`: the selector's packed row, the generator's m sequences padded to their
longest), without the padding that micro-batching adds across questions; validation counts none.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

WORKLOADS = ("sampling", "scoring", "m_step", "validation")


@dataclass
class WorkMeter:
    """Wall-clock seconds, questions and tokens of one workload, summed over its batches; the peak GPU memory.

    Attributes:
        seconds: wall-clock seconds (the device is synchronised at each end, so queued GPU work is counted).
        questions: questions processed (a question counted once per pass over it).
        tokens: tokens of the questions' forward rows (see the module docstring).
        peak_memory_gib: the largest ``torch.cuda.max_memory_allocated`` of the workload in GiB; None on CPU.
    """

    seconds: float = 0.0
    questions: int = 0
    tokens: int = 0
    peak_memory_gib: float | None = None

    def summary(self) -> dict:
        """``{seconds, questions_per_s, tokens_per_s, peak_memory_gib}``, rounded for a metrics line."""
        rate = 1.0 / self.seconds if self.seconds > 0 else 0.0
        return {
            "seconds": round(self.seconds, 3),
            "questions_per_s": round(self.questions * rate, 3),
            "tokens_per_s": round(self.tokens * rate, 1) if self.tokens else None,
            "peak_memory_gib": None if self.peak_memory_gib is None else round(self.peak_memory_gib, 3),
        }

    @classmethod
    def from_dict(cls, saved: dict) -> WorkMeter:
        return cls(**saved)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def measure(meter: WorkMeter, device: torch.device, questions: int, tokens: int):
    """Time the enclosed work into ``meter`` and add ``questions`` and ``tokens`` to it.

    On CUDA the device is synchronised before and after (one sync per batch, outside any inner loop) and the
    peak allocated memory of the enclosed work is kept.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        meter.peak_memory_gib = max(meter.peak_memory_gib or 0.0, peak)
    meter.seconds += time.perf_counter() - started
    meter.questions += questions
    meter.tokens += tokens


def combine_meters(per_process: list[dict[str, WorkMeter]]) -> dict[str, WorkMeter]:
    """One meter per workload for work done side by side in several processes: questions and tokens add up, the
    workload took as long as its slowest process, peak memory is the largest of one process."""
    combined: dict[str, WorkMeter] = {}
    for meters in per_process:
        for workload, meter in meters.items():
            total = combined.setdefault(workload, WorkMeter())
            total.seconds = max(total.seconds, meter.seconds)
            total.questions += meter.questions
            total.tokens += meter.tokens
            if meter.peak_memory_gib is not None:
                total.peak_memory_gib = max(total.peak_memory_gib or 0.0, meter.peak_memory_gib)
    return combined
