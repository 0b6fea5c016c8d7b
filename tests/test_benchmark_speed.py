"""benchmarks/speed.py: its FLOP arithmetic by hand, and a tiny CPU run whose JSON a reader relies on."""

import json
import sys

import pytest
from transformers import LlamaConfig

from tests.conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "benchmarks"))
import speed  # noqa: E402

TOY = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=10)


def test_linear_params_of_a_toy_llama():
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16, down 16x8 = 64+32+32+64+128+128+128 = 576
    # LoRA rank 2: 2 x (8+8 + 8+4 + 8+4 + 8+8 + 8+16 + 8+16 + 16+8) = 2 x 128 = 256
    assert speed.linear_params(TOY, 2) == (2 * 576, 2 * 256)


def test_ideal_flops_by_hand():
    segment = speed.Segment(tokens=3, context=5, logits=2)
    base, lora = 2 * 576, 2 * 256
    attention = 2 * 4 * 2 * 4 * 3 * (5 + 3)  # layers x 4 x heads x head_dim x tokens x keys
    vocab = 2 * 8 * 10 * 2
    assert speed.ideal_flops(TOY, 2, [segment], train=False) == 2 * (base + lora) * 3 + attention + vocab
    assert speed.ideal_flops(TOY, 2, [segment], train=True) == (4 * base + 6 * lora) * 3 + 3 * attention + 2 * vocab


@pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="../shared/data is not beside the checkout")
def test_tiny_cpu_run_writes_every_phase_and_shares_the_prompt(tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--shape", "tiny", "--questions", "2", "--candidates", "5", "--words", "30", "--samples", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"shape", "device", "date", "commit", "peak_flops", "rows", "e_step_questions_per_s"} <= set(result)
    rows = {(r["phase"], r["path"]): r for r in result["rows"]}
    assert set(rows) == {(phase, path) for phase in speed.WORKLOADS for path in ("ours", "plain")}
    for row in rows.values():
        assert row["questions_per_s"] > 0 and row["model_flops_per_question"] > 0 and 0 < row["mfu"]
        assert row["peak_memory_gib"] is None  # CPU
    # the same work is rated the same; what differs is what each path executes for it
    for phase in speed.WORKLOADS:
        assert rows[phase, "ours"]["model_flops_per_question"] == rows[phase, "plain"]["model_flops_per_question"]
    for phase in ("sampling", "scoring", "generator_m_step"):
        assert rows[phase, "ours"]["flop_overhead"] < 1.2, phase
    # the plain way repeats each prompt for every one of the m = 4 samples
    assert rows["sampling", "plain"]["flop_overhead"] > 2.0
    assert rows["selector_m_step", "plain"]["flop_overhead"] > 3.0
