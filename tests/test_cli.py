"""`dro optimize / validate / evaluate` end to end, in process, on a slice of ../shared/data/musique."""

import json

import pytest
from typer.testing import CliRunner

from dro_plugins.cli.main import app
from dro_plugins.training import mstep
from dro_plugins.training.trainer import DROTrainer
from tests.conftest import REPO, SHARED_DATA, tiny_run_config

MUSIQUE = SHARED_DATA / "musique"
pytestmark = pytest.mark.skipif(not MUSIQUE.is_dir(), reason="../shared/data is not beside the checkout")


def musique_config(write_config, tmp_path, name="run", iterations=1):
    tree = tiny_run_config(
        str(MUSIQUE / "train.jsonl"),
        str(MUSIQUE / "validation.jsonl"),
        str(tmp_path / name),
        data={"max_examples": 12, "num_candidates": 6},
        selector={"max_passage_words": 8},
        generator={"max_passage_words": 12},
        warmup={"generator_steps": 2, "selector_steps": 2, "batch_size": 4},
        dro={"iterations": iterations, "num_samples": 2, "batch_size": 4, "patience": 5},
        eval_batch_size=6,
    )
    return write_config(tree, f"{name}.yaml")


def test_optimize_writes_the_run_folder_and_evaluate_scores_it(write_config, tmp_path):
    config = musique_config(write_config, tmp_path)
    result = CliRunner().invoke(app, ["optimize", str(config)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "report.json", "samples/iteration_001.jsonl", "checkpoint/state.json"):
        assert (run / name).is_file(), name
    for role in ("selector", "generator"):
        assert (run / role / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(l["iteration"], l["stage"]) for l in lines] == [(0, "before_warmup"), (0, "dro"), (1, "dro")]
    assert {"em", "f1", "recall", "ess", "weight_entropy", "evidence", "selector_loss", "generator_loss"} <= set(lines[-1])
    assert 1.0 <= lines[-1]["ess"] <= 2.0
    # each line times the phases run since the previous one; an EM iteration has all four
    assert set(lines[0]["throughput"]) == {"validation"} and set(lines[1]["throughput"]) == {"validation"}
    phases = lines[-1]["throughput"]
    assert list(phases) == ["sampling", "scoring", "m_step", "validation"]
    trained = len((run / "samples/iteration_001.jsonl").read_text().splitlines())
    for name, figures in phases.items():
        assert figures["seconds"] > 0 and figures["peak_memory_gib"] is None  # CPU: no GPU memory figure
        questions = 12 if name == "validation" else trained  # max_examples of each file; one M-step epoch
        assert figures["questions_per_s"] == pytest.approx(questions / figures["seconds"], rel=0.05)
        assert (figures["tokens_per_s"] is None) == (name == "validation")
    assert "throughput per phase" in result.output and "m-step" in result.output
    report = json.loads((run / "report.json").read_text())
    assert set(report["validation"]) >= {"em", "f1", "recall"}
    assert len(report["history"]) == 3
    sample = json.loads((run / "samples/iteration_001.jsonl").read_text().splitlines()[0])
    assert len(sample["permutations"]) == 2 and sum(sample["weights"]) == pytest.approx(1.0)

    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(MUSIQUE / "train.jsonl"), "--max-examples", "5"])
    assert result.exit_code == 0, result.output
    scored = json.loads((run / "evaluation_train.json").read_text())
    assert len(scored["predictions"]) == 5 and 0.0 <= scored["f1"] <= 1.0


def test_interrupt_and_resume_give_the_same_result(write_config, tmp_path, monkeypatch):
    straight = musique_config(write_config, tmp_path, "straight", iterations=2)
    assert CliRunner().invoke(app, ["optimize", str(straight)]).exit_code == 0

    resumed = musique_config(write_config, tmp_path, "resumed", iterations=2)
    real_step = mstep.optimizer_step
    calls = {"n": 0}

    def step_then_interrupt(session, role, batch, permutations, weights, optimizer, state=None):
        real_step(session, role, batch, permutations, weights, optimizer, state)
        if state is not None:  # an M-step update, not warm-up
            calls["n"] += 1
            if calls["n"] == 3:
                session.stop_requested = True  # what the Ctrl-C handler does

    monkeypatch.setattr(mstep, "optimizer_step", step_then_interrupt)
    first = CliRunner().invoke(app, ["optimize", str(resumed)])
    assert first.exit_code == 130, first.output
    assert "checkpoint saved" in first.output
    monkeypatch.setattr(mstep, "optimizer_step", real_step)
    second = CliRunner().invoke(app, ["optimize", str(resumed)])
    assert second.exit_code == 0, second.output
    assert "resuming" in second.output

    def metrics(name):
        report = json.loads((tmp_path / name / "report.json").read_text())
        return [(l["iteration"], l["em"], l["f1"], l["recall"], l.get("ess")) for l in report["history"]]

    assert metrics("resumed") == metrics("straight")


def test_validate_exit_codes(write_config, tmp_path):
    good = musique_config(write_config, tmp_path)
    assert CliRunner().invoke(app, ["validate", str(good)]).exit_code == 0
    bad = CliRunner().invoke(app, ["validate", str(good), "--set", "dro.num_samples=0"])
    assert bad.exit_code == 2
    assert "dro.num_samples" in bad.output


def test_changed_config_does_not_silently_resume(write_config, tmp_path):
    config = musique_config(write_config, tmp_path)
    assert CliRunner().invoke(app, ["optimize", str(config)]).exit_code == 0
    clash = CliRunner().invoke(app, ["optimize", str(config), "--set", "dro.num_samples=3"])
    assert clash.exit_code == 2
    assert "different config (dro.num_samples)" in clash.output


NQ = SHARED_DATA / "nq"


@pytest.mark.skipif(not NQ.is_dir(), reason="../shared/data is not beside the checkout")
def test_shared_base_with_microbatches_reaches_the_same_metrics(tmp_path, monkeypatch):
    """NQ example: one base with two adapters and a small token budget vs two copies of it, unsplit."""
    import shutil

    import dro_plugins.training.session
    from dro_plugins.modeling.loading import write_tiny_model

    splits = []
    real_plan = dro_plugins.training.session.plan_microbatches
    monkeypatch.setattr(dro_plugins.training.session, "plan_microbatches", lambda *a: splits.append(len(real_plan(*a))) or real_plan(*a))

    base = write_tiny_model(tmp_path / "base", seed=3)
    copy = shutil.copytree(base, tmp_path / "base-copy")
    example = REPO / "examples" / "nq" / "config.yaml"
    common = [
        "--set", "data.max_examples=16", "--set", "data.num_candidates=8", "--set", "dro.iterations=1",
        "--set", "dro.batch_size=8", "--set", "warmup.generator_steps=4", "--set", "warmup.selector_steps=4",
        "--set", "eval_batch_size=8", "--set", "device=cpu", "--set", f"selector.model={base}",
    ]
    runs = {
        "shared": [f"generator.model={base}", "dro.max_tokens_per_microbatch=1600", f"output_dir={tmp_path / 'shared'}"],
        "separate": [f"generator.model={copy}", "dro.max_tokens_per_microbatch=null", f"output_dir={tmp_path / 'separate'}"],
    }
    lines, most_splits = {}, {}
    for name, extra in runs.items():
        splits.clear()
        result = CliRunner().invoke(app, ["optimize", str(example), *common, *(a for e in extra for a in ("--set", e))])
        assert result.exit_code == 0, result.output
        assert "runs alone" not in result.output
        most_splits[name] = max(splits)
        lines[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert most_splits == {"shared": 8, "separate": 1}  # the generator step: one question per micro-batch
    assert len(lines["shared"]) == len(lines["separate"]) == 3
    for a, b in zip(lines["shared"], lines["separate"]):
        assert set(a) == set(b)
        for key, value in a.items():
            if key == "throughput":  # wall-clock figures
                continue
            assert value == pytest.approx(b[key], abs=1e-4), key


@pytest.mark.skipif(not NQ.is_dir(), reason="../shared/data is not beside the checkout")
@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_optimize_the_nq_example_on_a_tiny_model_with_a_real_tokenizer(name, real_tokenizer_dirs, tmp_path):
    settings = [
        "data.max_examples=8", "data.num_candidates=6", "dro.iterations=2", "dro.num_samples=2", "dro.batch_size=4",
        "warmup.generator_steps=2", "warmup.selector_steps=2", "eval_batch_size=8", "device=cpu", f"output_dir={tmp_path / 'run'}",
        f"selector.tiny.tokenizer={real_tokenizer_dirs[name]}", f"generator.tiny.tokenizer={real_tokenizer_dirs[name]}",
    ]
    result = CliRunner().invoke(app, ["optimize", str(REPO / "examples" / "nq" / "config.yaml"), *(a for s in settings for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if line["stage"] == "dro"] == [0, 1, 2]
    for line in lines:  # every validation question falls in exactly one failure class
        assert set(line["attribution"]) == {"correct", "generation_miss", "selection_miss", "retrieval_miss"}
        assert sum(line["attribution"].values()) == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "run" / "base" / "selector" / "config.json").read_text())) > 0
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(tmp_path / "run" / "base" / "selector"))
    assert vocabulary > 128_000  # the real tokenizer's vocabulary, not the built-in one


def test_flat_f1_picks_the_best_answer_likelihood_and_says_it_stopped_early(write_config, tmp_path, monkeypatch):
    config = musique_config(write_config, tmp_path, "flat", iterations=4)
    scripted = iter([-5.0, -5.0, -4.0, -4.5, -4.6, -4.7])  # before warm-up, iterations 0..4: best is iteration 1

    def validate(self):
        return {"em": 0.0, "f1": 0.0, "recall": 0.5, "pool_recall": 1.0, "answer_log_likelihood": next(scripted), "predictions": [],
                "attribution": {"correct": 0.0, "generation_miss": 1.0, "selection_miss": 0.0, "retrieval_miss": 0.0}}

    monkeypatch.setattr(DROTrainer, "validate", validate)
    result = CliRunner().invoke(app, ["optimize", str(config), "--set", "dro.patience=1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "flat" / "report.json").read_text())
    assert report["validation"]["iteration"] == 1 and report["stopped"] == "early"
    text = " ".join(result.output.split())
    assert "stopped early after iteration 2" in text and "best by f1: iteration 1" in text
    assert "+1.000" in text  # answer log-likelihood, iteration 0 (-5.0) -> best (-4.0)
    assert [line for line in result.output.splitlines() if len(line) > 80] == []


def test_dro_config_lists_every_key_with_its_default():
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    for key in ("dro.max_tokens_per_microbatch", "dro.metric_for_best", "selector.gradient_checkpointing", "generator.tiny.tokenizer", "data.train", "pipeline.haystack"):
        assert key in result.output
    assert "16384" in result.output and "required" in result.output
