"""What a run leaves to look at: attribution files, plots/, TensorBoard scalars, `dro report` and `dro inspect`."""

import json

import pytest
from typer.testing import CliRunner

from dro_plugins.cli.main import app
from dro_plugins.data.synthetic import make_dataset
from dro_plugins.data.examples import write_examples
from tests.conftest import tiny_run_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    train = write_examples(make_dataset(8, 6, seed=3), folder / "train.jsonl")
    validation = write_examples(make_dataset(6, 6, seed=4), folder / "validation.jsonl")
    tree = tiny_run_config(
        str(train), str(validation), str(folder / "run"), data={"num_candidates": 6},
        dro={"iterations": 2, "num_samples": 3, "batch_size": 4, "patience": 5}, report_to="tensorboard", eval_batch_size=6,
    )
    config = folder / "config.yaml"
    config.write_text(json.dumps(tree))
    result = CliRunner().invoke(app, ["optimize", str(config)])
    assert result.exit_code == 0, result.output
    return folder / "run", result.output


def test_attribution_in_every_line_and_ids_per_class(run):
    folder, output = run
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert sum(line["attribution"].values()) == pytest.approx(1.0)
        suffix = "" if line["stage"] == "dro" else f"_{line['stage']}"
        ids = json.loads((folder / "attribution" / f"iteration_{line['iteration']:03d}{suffix}.json").read_text())
        members = sum(ids.values(), [])
        assert len(members) == len(set(members)) == 6  # each validation question in one class
        assert {name: len(members) / 6 for name, members in ids.items()} == pytest.approx(line["attribution"])
    assert "where validation answers fail" in output


def test_plots_are_real_images(run):
    folder, output = run
    for name in ("quality.png", "e_step.png", "losses.png", "attribution.png"):
        data = (folder / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert "plots (quality, e-step, losses, attribution):" in output


def test_tensorboard_has_the_scalars_of_every_iteration_and_optimizer_step(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = run
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"f1", "em", "recall", "ess", "attribution/correct", "throughput/m_step/questions_per_s", "m_step/selector_loss"} <= tags
    assert [e.step for e in events.Scalars("f1")] == [0, 1, 2]
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for line in lines for loss in line.get("generator_losses", [])]
    logged = events.Scalars("m_step/generator_loss")
    assert [e.step for e in logged] == list(range(len(losses))) and [e.value for e in logged] == pytest.approx(losses)


def test_report_redraws_and_prints_the_summary(run):
    folder, _ = run
    (folder / "plots" / "quality.png").unlink()
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "plots" / "quality.png").read_bytes().startswith(PNG)
    assert "before DRO vs the best iteration" in result.output and "where validation answers fail" in result.output


def test_inspect_shows_candidates_samples_and_answer(run):
    folder, _ = run
    question = json.loads((folder / "samples" / "iteration_001.jsonl").read_text().splitlines()[0])["id"]
    result = CliRunner().invoke(app, ["inspect", str(folder), "--question", question, "--iteration", "1"], terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "candidates" in result.output and "E-step samples of iteration 1" in result.output
    assert "importance weights sum to 1.000" in result.output
    assert "generator's answer:" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "{run}/nowhere", "--question", "q0"], "not a run folder"),
        (["inspect", "{run}", "--question", "no-such-id"], "question 'no-such-id' is not among"),
        (["inspect", "{run}", "--question", "{train_id}", "--iteration", "9"], "no E-step samples of iteration 9"),
        (["report", "{run}/nowhere"], "not a run folder"),
    ],
)
def test_clear_errors(run, args, message):
    folder, _ = run
    train_id = json.loads((folder / "samples" / "iteration_001.jsonl").read_text().splitlines()[0])["id"]
    result = CliRunner().invoke(app, [a.format(run=folder, train_id=train_id) for a in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_without_matplotlib_the_run_says_how_to_get_plots(run, monkeypatch):
    import sys

    from dro_plugins.errors import DROError
    from dro_plugins.reporting.plots import draw

    folder, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(DROError, match=r"pip install 'dro-plugins\[report\]'"):
        draw(folder)
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 0 and "matplotlib is missing" in result.output
