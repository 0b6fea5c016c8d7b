"""The learning benchmark's quick mode: it runs end to end, writes the documented files, and DRO learns.

``benchmarks/learning.py --quick``: the synthetic task with 8 candidates and k = 2, one seed, three EM
iterations from a shared warm-up (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

METHODS = {"dro", "no_selector_training", "no_generator_training", "unweighted", "sft_first_k"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("learning-quick")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "learning.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), done.stdout


def test_results_have_final_metrics_and_history_per_method_and_task(quick):
    _, results, _ = quick
    task = results["tasks"]["synthetic_8"]
    assert set(task["methods"]) == METHODS
    iterations = results["settings"]["iterations"]["synthetic_8"]
    for method, entry in task["methods"].items():
        for key in ("em", "f1", "recall"):
            assert 0.0 <= entry[key] <= 1.0, (method, key)
            assert entry[key] == entry["history"][-1][key]  # "final" is the last iteration, not the best
        assert [line["iteration"] for line in entry["history"]] == list(range(iterations + 1))
        assert len(entry["seeds"]) == len(task["seeds"])
    sampled = task["methods"]["dro"]["history"][1:]
    m = results["settings"]["num_samples"]["synthetic_8"]
    assert all(1.0 <= line["ess"] <= m and 0.0 <= line["weight_entropy"] for line in sampled)


def test_chance_and_warmup_rule_are_reported(quick):
    _, results, _ = quick
    task = results["tasks"]["synthetic_8"]
    assert task["chance_recall"] == pytest.approx(2 / 8)
    assert task["warmup_within_rule"] == [True]
    # every method that uses the selector starts from the same warm-up
    starts = {method: entry["history"][0]["recall"] for method, entry in task["methods"].items() if method != "sft_first_k"}
    assert len(set(starts.values())) == 1, starts


def test_dro_beats_a_frozen_selector(quick):
    _, results, _ = quick
    methods = results["tasks"]["synthetic_8"]["methods"]
    assert methods["dro"]["recall"] >= methods["no_selector_training"]["recall"] + 0.1
    assert methods["dro"]["em"] >= methods["no_selector_training"]["em"] + 0.1


def test_plots_and_table_are_written(quick):
    out, _, stdout = quick
    for name in ("synthetic_8_f1_recall_by_method.png", "synthetic_8_ess_weight_entropy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "no_selector_training" in stdout and "chance" in stdout
