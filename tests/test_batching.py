"""Token-budget micro-batches: the plan, and gradients that do not depend on how a step is split."""

import pytest
import torch

from dro_plugins.modeling.batching import Shape, oversized, padded_tokens, plan_microbatches, run_in_microbatches
from dro_plugins.data.examples import write_examples
from dro_plugins.data.synthetic import make_dataset
from tests.conftest import make_trainer, tiny_run_config


def test_plan_by_hand():
    shapes = [Shape(1, 10), Shape(2, 30), Shape(1, 20), Shape(3, 5)]
    # longest first: [1] is 2 rows x 30 = 60; adding [2] -> 3 x 30 = 90 > 80: new micro-batch [2] (20);
    # adding [0] -> 2 x 20 = 40; adding [3] -> 5 x 20 = 100 > 80: new micro-batch
    assert plan_microbatches(shapes, 80) == [[1], [2, 0], [3]]
    assert padded_tokens([shapes[i] for i in (2, 0)]) == 2 * 20
    assert plan_microbatches(shapes, None) == [[0, 1, 2, 3]]
    assert plan_microbatches(shapes, 1) == [[1], [2], [0], [3]]  # every item alone, none dropped
    assert oversized(shapes, 25) == [1]
    assert plan_microbatches([], 10) == []


def test_padding_limit_by_hand():
    shapes = [Shape(2, 100), Shape(2, 98), Shape(1, 60), Shape(1, 58)]
    # 100 + 98: 4 x 100 = 400 padded, 396 real: 1% padding, kept together; adding 60 -> 5 x 100 = 500 with 104
    # padding (21%): new micro-batch; 60 + 58: 120 padded, 2 padding (1.7%): together
    assert plan_microbatches(shapes, 1000, max_padding=0.05) == [[0, 1], [2, 3]]
    assert plan_microbatches(shapes, 1000) == [[0, 1, 2, 3]]  # no limit: only the budget splits
    assert plan_microbatches(shapes, 1000, max_padding=0.0) == [[0], [1], [2], [3]]


def test_run_in_microbatches_restores_item_order():
    shapes = [Shape(1, n) for n in (3, 9, 1, 7)]
    calls = []

    def run(indices):
        calls.append(list(indices))
        return [f"item{i}" for i in indices]

    assert run_in_microbatches(shapes, 10, run) == ["item0", "item1", "item2", "item3"]
    assert calls == [[1], [3], [0], [2]]  # 9 alone; 7 + 9 and 3 + 7 pad past 10; 3 + 1 would be 2 of 6 padding


@pytest.fixture
def trainer(tmp_path):
    train = write_examples(make_dataset(6, 8, seed=1), tmp_path / "train.jsonl")
    validation = write_examples(make_dataset(2, 8, seed=2), tmp_path / "validation.jsonl")
    return make_trainer(tiny_run_config(str(train), str(validation), str(tmp_path / "run"), dro={"num_samples": 3}))


@pytest.mark.parametrize("role", ["selector", "generator"])
def test_microbatched_gradients_equal_unsplit(trainer, role):
    batch = trainer.train_set
    generator = torch.Generator().manual_seed(0)
    permutations = torch.stack([torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(3)]) for _ in batch])
    weights = torch.softmax(torch.randn(len(batch), 3, generator=generator), -1)
    unit = trainer.units[role]
    frozen = torch.optim.SGD(unit.parameters(), lr=0.0)  # step() leaves weights as they are; grads stay readable

    shapes = trainer.session.shapes(role, batch, permutations)
    total = padded_tokens(shapes)
    grads, splits = {}, {}
    for budget in (None, total // 2 + max(s.length for s in shapes), 1):
        trainer.config.dro.max_tokens_per_microbatch = budget
        splits[budget] = len(trainer.session.plan(role, batch, trainer.session.shapes(role, batch, permutations)))
        trainer.step(role, batch, permutations, weights, frozen)
        grads[budget] = [p.grad.clone() for p in unit.parameters() if p.grad is not None]
    assert sorted(splits.values()) == [1, 2, len(batch)], splits
    reference = grads[None]
    assert reference and any(g.abs().sum() > 0 for g in reference)
    for budget, got in grads.items():
        assert len(got) == len(reference)
        for a, b in zip(reference, got):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), budget
