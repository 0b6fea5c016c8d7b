"""Learning: DRO must teach a tiny selector to find the one passage that holds the answer.

The synthetic task (:mod:`dro_plugins.data.synthetic`): 8 candidates in random order, exactly one holds a value
word drawn fresh for each question, top-k = 2, so chance recall is 0.25. Both models get supervised
warm-ups (paper §6.4); the selector's is kept short enough to leave recall within 0.1 of chance, so the
climb to the pinned thresholds comes from the EM iterations. A control run keeps the selector frozen after
the same warm-ups.

Settings and why (measured on 2 CPU cores, see the issue-2 notes):
- ``passage_words=2``: with 6-word passages a supervised selector escapes its plateau anywhere from 200
  to more than 320 steps; with 2-word passages it does so by ~150 steps, every time we tried.
- ``num_samples=16``: with m = 4 or 8 the selector stayed at chance for 600 steps even with oracle
  weights; m = 16 gives enough samples holding the gold passage per question for a usable signal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dro_plugins.data.examples import write_examples
from dro_plugins.data.synthetic import make_dataset
from tests.conftest import make_trainer, tiny_run_config

pytestmark = pytest.mark.slow

CANDIDATES, TOP_K = 8, 2
CHANCE = TOP_K / CANDIDATES
WARMUP = {"generator_steps": 300, "selector_steps": 100, "learning_rate": 3e-3, "batch_size": 32}
DRO = {"iterations": 14, "num_samples": 16, "learning_rate": 3e-3, "batch_size": 32, "patience": 14}  # no early stop: F1 wobbles ±0.03 near the top


def _fit(root: Path, name: str, **dro) -> dict:
    tree = tiny_run_config(
        str(root / "train.jsonl"),
        str(root / "validation.jsonl"),
        str(root / name),
        data={"num_candidates": CANDIDATES},
        selector={"top_k": TOP_K},
        warmup=WARMUP,
        dro={**DRO, **dro},
        eval_batch_size=100,
    )
    return make_trainer(tree).fit()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    write_examples(make_dataset(1024, CANDIDATES, seed=1, passage_words=2), root / "train.jsonl")
    write_examples(make_dataset(200, CANDIDATES, seed=2, passage_words=2), root / "validation.jsonl")
    return {
        "dro": _fit(root, "dro"),
        "control": _fit(root, "control", train_selector=False, iterations=1),
    }


def _after_warmup(report: dict) -> dict:
    return next(line for line in report["history"] if line["stage"] == "dro" and line["iteration"] == 0)


def test_selector_warmup_leaves_recall_near_chance(reports):
    for report in reports.values():
        assert _after_warmup(report)["recall"] <= CHANCE + 0.1


def test_dro_reaches_pinned_recall_and_em(reports):
    best = reports["dro"]["validation"]
    assert best["recall"] >= 0.9, reports["dro"]["history"]
    assert best["em"] >= 0.8, reports["dro"]["history"]


def test_frozen_selector_control_stays_at_warmup_level(reports):
    control = reports["control"]
    start = _after_warmup(control)
    metrics = ("em", "f1", "recall")
    assert [start[k] for k in metrics] == [_after_warmup(reports["dro"])[k] for k in metrics]  # same warm-ups
    for line in (line for line in control["history"] if line["stage"] == "dro"):
        assert line["recall"] == start["recall"]
        # the generator cannot answer from passages the selector does not pick
        assert line["em"] <= start["recall"] + 0.1
