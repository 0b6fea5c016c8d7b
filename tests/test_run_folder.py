"""A run folder is claimed with a marker; --restart deletes only what a run wrote; user files are never touched."""

import hashlib
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from dro_plugins.cli.main import app
from dro_plugins.errors import DROError
from dro_plugins.training.run_folder import MARKER, claim, is_run_entry, is_run_folder, locked
from dro_plugins.data.examples import write_examples
from dro_plugins.data.synthetic import make_dataset
from tests.test_bad_inputs import _base_tree, finished_run  # noqa: F401 - the shared finished tiny run


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_entries_and_their_partial_twins_are_recognised_and_nothing_else():
    assert is_run_entry("metrics.jsonl") and is_run_entry("report.json.partial") and is_run_entry("checkpoint.old")
    assert is_run_entry("retriever")  # the third unit's query tower: --restart removes it with the rest
    assert not is_run_entry("notes.txt") and not is_run_entry("train.jsonl") and not is_run_entry("config.yaml.bak")


def test_restart_in_a_marked_run_folder_keeps_the_users_files(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished_run, tmp_path / "work")
    root, run = tmp_path / "work", tmp_path / "work" / "run"
    (root / "config.yaml").write_text(yaml.safe_dump(_base_tree(root)))  # its output_dir: the copy's run folder
    assert (run / MARKER).is_file(), "dro optimize claims its folder with a marker"
    notes = run / "notes.txt"
    notes.write_text("my notes about this run")
    (run / "mine").mkdir()
    (run / "mine" / "keep.bin").write_bytes(b"\x00\x01")
    stale = run / "samples" / "stale.jsonl"
    stale.write_text("{}\n")
    before = {p: _sha(p) for p in (notes, run / "mine" / "keep.bin", root / "train.jsonl", root / "config.yaml")}

    result = CliRunner().invoke(app, ["optimize", str(root / "config.yaml"), "--restart"])

    assert result.exit_code == 0, result.output
    assert {p: _sha(p) for p in before} == before
    assert not stale.exists(), "--restart removes what the earlier run wrote"
    assert (run / "report.json").is_file() and (run / MARKER).is_file()


def test_a_run_folder_from_before_markers_is_still_resumed(finished_run, tmp_path):
    shutil.copytree(finished_run / "run", tmp_path / "run")
    (tmp_path / "run" / MARKER).unlink()
    assert is_run_folder(tmp_path / "run")
    claim(tmp_path / "run", [], restart=False)
    assert (tmp_path / "run" / MARKER).is_file()


def test_a_folder_with_a_user_file_named_like_a_run_config_is_not_a_run_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("mine: 1\n")
    (tmp_path / "out" / "train.jsonl").write_text("{}\n")
    assert not is_run_folder(tmp_path / "out")
    with pytest.raises(DROError, match="no dro run wrote .*train.jsonl"):
        claim(tmp_path / "out", [], restart=True)
    assert (tmp_path / "out" / "config.yaml").read_text() == "mine: 1\n"


def test_empty_output_dir_override_is_the_current_folder_and_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = _base_tree(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    write_examples(make_dataset(4, 4, seed=1), tmp_path / "train.jsonl")
    write_examples(make_dataset(4, 4, seed=2), tmp_path / "validation.jsonl")
    (tmp_path / "notes.txt").write_text("mine")
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}
    for value, extra in [("", []), ("", ["--restart"]), (".", ["--restart"])]:
        result = CliRunner().invoke(app, ["optimize", "config.yaml", "--set", f"output_dir={value}", *extra])
        assert result.exit_code == 2, result.output
        assert "output_dir" in result.output and "Traceback" not in result.output
        assert value == "" or "current folder" in result.output  # '' parses as null: refused by the config itself
    assert {p.name: _sha(p) for p in tmp_path.iterdir()} == before


def test_a_second_optimize_on_a_folder_in_use_is_refused_naming_the_holder(finished_run, tmp_path):
    import os
    import socket

    shutil.copytree(finished_run, tmp_path / "work")
    root = tmp_path / "work"
    (root / "config.yaml").write_text(yaml.safe_dump(_base_tree(root)))
    before = _sha(root / "run" / "report.json")
    with locked(root / "run"):  # as a running dro optimize holds it
        result = CliRunner().invoke(app, ["optimize", str(root / "config.yaml"), "--restart"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "in use by another dro optimize" in text and f"pid {os.getpid()} on {socket.gethostname()}" in text
    assert _sha(root / "run" / "report.json") == before, "--restart must not delete a folder another run writes"
    with locked(root / "run"):  # released on exit: it can be taken again
        pass


def test_a_resume_against_a_changed_pipeline_is_refused_unless_asked(finished_run, tmp_path):
    from dro_plugins.config import dump_config, load_config
    from dro_plugins.training.run_folder import RunPaths, prepare

    shutil.copytree(finished_run, tmp_path / "work")
    root = tmp_path / "work"
    (root / "config.yaml").write_text(yaml.safe_dump(_base_tree(root)))
    config = load_config(root / "config.yaml")
    paths = RunPaths(root / "run")
    paths.config.write_text(dump_config(config))  # the copy's saved config names the copy's files
    paths.fingerprint.unlink(missing_ok=True)
    trained = {"graph": "aaaa", "prompt template": "1111", "documents": "d0"}

    # a run folder from before fingerprints adopts this run's; the same pipeline resumes silently
    assert prepare(config, root / "config.yaml", False, trained) == [f"resuming the run in {paths.root}"]
    assert yaml.safe_load(paths.fingerprint.read_text()) == trained
    assert prepare(config, root / "config.yaml", False, dict(trained)) == [f"resuming the run in {paths.root}"]

    edited = trained | {"prompt template": "2222", "documents": "d1"}
    with pytest.raises(DROError, match=r"another pipeline \(documents, prompt template changed\); pass --restart .* --resume-anyway"):
        prepare(config, root / "config.yaml", False, edited)
    assert yaml.safe_load(paths.fingerprint.read_text()) == trained, "a refused resume keeps what the run trained against"

    lines = prepare(config, root / "config.yaml", False, edited, resume_anyway=True)
    assert lines[0] == "resuming with the changed pipeline (documents, prompt template), as --resume-anyway asked"
    assert yaml.safe_load(paths.fingerprint.read_text()) == edited

    assert prepare(config, root / "config.yaml", True, trained) == [] and yaml.safe_load(paths.fingerprint.read_text()) == trained


def test_served_evaluation_of_a_run_without_a_pipeline_says_why_in_one_line(finished_run):
    result = CliRunner().invoke(app, ["evaluate", str(finished_run / "run"), "--data", str(finished_run / "validation.jsonl"), "--served"])
    assert result.exit_code == 2
    assert "--served runs the pipeline a run was trained from, and this run has none" in " ".join(result.output.split())
