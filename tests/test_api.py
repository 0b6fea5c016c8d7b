"""The library entry point and the old import paths: ``dro_plugins.optimize`` does what ``dro optimize`` does, and
every module path from before the layout of folders still imports (the same module object as the new path)."""

import importlib
import json

import pytest
from typer.testing import CliRunner

import dro_plugins
from dro_plugins.cli.main import app
from dro_plugins.compat import MOVED
from tests.conftest import REPO, SHARED_DATA

# what users' scripts and our own checks import (kept working, as the task statement lists)
OLD_NAMES = {
    "dro_plugins.config": ["load_config", "RunConfig"],
    "dro_plugins.data": ["load_run_data", "load_examples", "Example", "Passage", "write_examples", "load_corpus"],
    "dro_plugins.run": ["build_models", "load_trained", "saved_config", "RunPaths", "export_generator", "load_trained_selector"],
    "dro_plugins.runtime": ["Runtime", "gathered", "is_sharded", "reshard", "shard_range", "resolve_device", "is_out_of_memory"],
    "dro_plugins.trainer": ["DROTrainer", "Interrupted"],
    "dro_plugins.metrics": ["exact_match", "f1_score", "passage_has_answer", "normalize_answer", "selection_recall"],
    "dro_plugins.evaluation": ["evaluate", "predict", "summarize", "batches"],
    "dro_plugins.reporting": ["open_reporter", "NoReporter", "optimizer_steps"],
    "dro_plugins.models": ["add_lora", "write_tiny_model", "load_pretrained"],
    "dro_plugins.generator": ["LMGenerator"],
    "dro_plugins.lm": ["compute_dtype", "greedy_generate", "left_pad"],
    "dro_plugins.objective": ["importance_weights", "selector_loss", "generator_loss"],
    "dro_plugins.checkpoint": ["LoopState", "save_checkpoint", "load_checkpoint", "find_checkpoint"],
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_moved_module_imports_under_its_old_path_as_the_same_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_the_names_users_import_are_still_there(module):
    imported = importlib.import_module(module)
    missing = [name for name in OLD_NAMES[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"


def test_the_selector_and_generator_methods_users_call_are_still_there():
    from dro_plugins.generator import LMGenerator
    from dro_plugins.selectors.lm import LMSelector
    from dro_plugins.selectors.retriever import RetrieverSelector

    for cls in (LMSelector, RetrieverSelector):
        assert all(callable(getattr(cls, name, None)) for name in ("sample", "log_prob", "select")), cls
    assert callable(LMSelector.grammar)
    assert all(callable(getattr(LMGenerator, name, None)) for name in ("answer_ids", "log_likelihood", "generate"))


@pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="../shared/data is not beside the checkout")
def test_optimize_from_python_writes_the_report_that_dro_optimize_writes(tmp_path, monkeypatch):
    """The NQ example, shortened, once through the CLI and once through ``dro_plugins.optimize``."""
    monkeypatch.chdir(tmp_path)
    config = REPO / "examples" / "nq" / "config.yaml"
    short = ["data.max_examples=12", "warmup.generator_steps=2", "warmup.selector_steps=2", "dro.iterations=1", "dro.batch_size=6"]
    result = CliRunner().invoke(app, ["optimize", str(config), "--set", "output_dir=cli", *(a for s in short for a in ("--set", s))])
    assert result.exit_code == 0, result.output

    lines = []
    report = dro_plugins.optimize(config, overrides=[*short, "output_dir=python"], log=lines.append)

    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k != "throughput"}
        return [timeless(v) for v in value] if isinstance(value, list) else value

    written = json.loads((tmp_path / "python" / "report.json").read_text())
    assert timeless(written) == timeless(report)
    assert timeless(written) == timeless(json.loads((tmp_path / "cli" / "report.json").read_text()))
    assert any("loading models" in line for line in lines)
    assert (tmp_path / "python" / "selector" / "adapter_model.safetensors").is_file()


def test_python_dash_m_dro_plugins_cli_is_the_dro_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "dro_plugins.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).startswith("dro-plugins ")
