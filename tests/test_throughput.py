"""Per-phase throughput figures: the arithmetic of a meter, and what measuring adds to it."""

import time

import pytest
import torch

from dro_plugins.reporting.throughput import WorkMeter, measure


def test_summary_is_the_rate_of_the_summed_work():
    meter = WorkMeter(seconds=4.0, questions=10, tokens=3000)
    assert meter.summary() == {"seconds": 4.0, "questions_per_s": 2.5, "tokens_per_s": 750.0, "peak_memory_gib": None}
    assert WorkMeter().summary()["questions_per_s"] == 0.0  # nothing timed yet: no division by zero
    assert WorkMeter(seconds=1.0, questions=3).summary()["tokens_per_s"] is None  # tokens not counted
    assert WorkMeter.from_dict(meter.to_dict()) == meter  # survives a checkpoint


def test_measure_adds_time_questions_and_tokens():
    meter = WorkMeter()
    for _ in range(2):
        with measure(meter, torch.device("cpu"), questions=3, tokens=100):
            time.sleep(0.02)
    assert (meter.questions, meter.tokens) == (6, 200)
    assert meter.seconds == pytest.approx(0.04, abs=0.03) and meter.seconds >= 0.04
    assert meter.peak_memory_gib is None
