"""One short DRO run on synthetic data: what the M-step may and may not change, and NaN handling."""

import json
import random
from dataclasses import replace

import pytest
import torch
import yaml

from dro_plugins.data.examples import write_examples
from dro_plugins.errors import TrainingError
from dro_plugins.data.synthetic import make_dataset
from dro_plugins.data.supervision import supervised_permutation
from tests.conftest import make_trainer, tiny_run_config


@pytest.fixture
def small_run(tmp_path):
    train = write_examples(make_dataset(16, 8, seed=1), tmp_path / "train.jsonl")
    validation = write_examples(make_dataset(8, 8, seed=2), tmp_path / "validation.jsonl")

    runs = iter(range(100))

    def make(**sections):
        return make_trainer(tiny_run_config(str(train), str(validation), str(tmp_path / f"run{next(runs)}"), **sections))

    return make


def _snapshot(named):
    return {name: p.detach().clone() for name, p in named}


def test_m_step_changes_lora_and_leaves_base_weights(small_run):
    trainer = small_run(dro={"iterations": 1, "num_samples": 2, "batch_size": 4})
    model = trainer.selector.model
    assert model is trainer.generator.model  # both roles name tiny-llama: one base, two adapters
    before = _snapshot(model.named_parameters())
    trainer.fit()
    for role, unit in trainer.units.items():
        own = dict(unit.named_parameters())
        assert sum("lora_" in name for name in own) > 0
        for name in (n for n in own if "lora_" in n):
            assert not torch.equal(before[name], own[name].detach()), f"{role}: LoRA parameter {name} did not change"
    base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n and ".selector." not in n and ".generator." not in n]
    assert base
    for name, param in base:
        assert torch.equal(before[name], param.detach()), f"frozen base weight {name} changed"


def test_frozen_selector_is_not_updated(small_run):
    trainer = small_run(dro={"train_selector": False})
    before = _snapshot(trainer.units["selector"].named_parameters())
    generator_before = _snapshot(trainer.units["generator"].named_parameters())
    trainer.fit()
    after = _snapshot(trainer.units["selector"].named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    generator_after = dict(trainer.units["generator"].named_parameters())
    assert any(not torch.equal(generator_before[n], generator_after[n]) for n in generator_before)


def test_nan_batches_are_skipped_then_abort(small_run, monkeypatch):
    trainer = small_run(dro={"max_nan_batches": 3, "batch_size": 4})
    real = trainer.generator.log_likelihood
    calls = {"n": 0}

    def sometimes_nan(batch, permutations):
        values = real(batch, permutations)
        if torch.is_grad_enabled():  # the M-step (E-step and validation score without gradients)
            calls["n"] += 1
            return values * float("nan") if calls["n"] == 1 else values  # poison the first M-step batch only
        return values

    monkeypatch.setattr(trainer.generator, "log_likelihood", sometimes_nan)
    report = trainer.fit()
    assert report["nan_batches"] == 1
    assert report["history"][-1]["nan_batches"] == 1

    always = small_run(dro={"max_nan_batches": 2, "batch_size": 4, "train_selector": False})
    monkeypatch.setattr(always.generator, "log_likelihood", lambda b, p: real(b, p) * (float("nan") if torch.is_grad_enabled() else 1.0))
    with pytest.raises(TrainingError, match="NaN/inf for 2 batches in a row"):
        always.fit()


def test_warmup_target_puts_positives_first_and_draws_the_rest():
    example = make_dataset(1, 8, seed=3)[0]
    gold = next(i for i, p in enumerate(example.candidates) if p.has_answer)
    rng = random.Random(0)
    targets = [supervised_permutation(example, 2, rng) for _ in range(200)]
    assert all(t[0] == gold and t[1] != gold and len(t) == 2 for t in targets)
    # the filler is drawn at random, not taken from first-stage order (which would teach a position)
    assert len({t[1] for t in targets}) == 7
    unlabelled = replace(example, candidates=tuple(replace(p, text="filler", has_answer=False) for p in example.candidates))
    assert supervised_permutation(unlabelled, 2, rng) is None


def test_out_of_memory_becomes_one_line_naming_the_settings(small_run, monkeypatch):
    trainer = small_run(dro={"batch_size": 4})

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.selector, "log_prob", out_of_memory)
    with pytest.raises(TrainingError, match=r"out of GPU memory in the M-step of iteration 1; lower dro\.max_tokens_per_microbatch"):
        trainer.fit()


def test_a_question_over_the_token_budget_runs_alone_with_one_warning(small_run):
    trainer = small_run(dro={"batch_size": 4, "max_tokens_per_microbatch": 10})
    lines = []
    trainer.session.log = lines.append
    trainer.fit()
    warnings = [line for line in lines if "runs alone" in line]
    assert warnings and all("dro.max_tokens_per_microbatch (10)" in line for line in warnings)
    assert len(warnings) == len(set(warnings))  # once per question and role, not once per pass


def test_a_whole_m_step_of_non_finite_losses_stops_the_run_and_a_lower_learning_rate_resumes_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dro_plugins.cli.main import app
    from dro_plugins.modeling.generator import LMGenerator
    from tests.test_bad_inputs import _base_tree

    write_examples(make_dataset(8, 4, seed=1), tmp_path / "train.jsonl")
    write_examples(make_dataset(4, 4, seed=2), tmp_path / "validation.jsonl")
    tree = _base_tree(tmp_path)
    tree["dro"] |= {"max_nan_batches": 100, "train_selector": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    real = LMGenerator.log_likelihood

    def nan_when_training(self, batch, permutations):
        values = real(self, batch, permutations)
        return values * float("nan") if torch.is_grad_enabled() else values  # every M-step loss, nothing else

    monkeypatch.setattr(LMGenerator, "log_likelihood", nan_when_training)
    first = CliRunner().invoke(app, ["optimize", str(tmp_path / "config.yaml")])
    assert first.exit_code == 2, first.output
    assert "non-finite losses or weights after M-step 1" in " ".join(first.output.split())
    assert not (tmp_path / "run" / "report.json").exists()

    monkeypatch.setattr(LMGenerator, "log_likelihood", real)
    again = CliRunner().invoke(app, ["optimize", str(tmp_path / "config.yaml"), "--set", "dro.learning_rate=5e-5"])
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "NaN" not in (tmp_path / "run" / "report.json").read_text() and report["history"][-1]["iteration"] == 1
    assert "learning_rate: 5.0e-05" in (tmp_path / "run" / "config.yaml").read_text()
