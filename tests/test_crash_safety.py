"""kill -9 at any phase of `dro optimize`, then a plain re-run: the same report, metrics and adapters, bit for bit.

Each kill point is reached deterministically through ``DRO_KILL_AT`` (:mod:`dro_plugins.faults`): the process
SIGKILLs itself there, as an out-of-memory killer or a preempted machine would.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from dro_plugins.data.synthetic import make_dataset
from dro_plugins.data.examples import write_examples
from tests.conftest import TINY_LORA

pytestmark = pytest.mark.slow

KILL_POINTS = [
    "tiny-model-written",
    "warmup:2",
    "validation:2",
    "metrics-appended:2",
    "checkpoint-written:2",
    "checkpoint-swap:3",
    "e-step:2",
    "samples-written",
    "m-step:3",
    "best-published",
    "tensorboard-written:4",
    "plot-written:2",
    "validation:4",
    "report",
]


def _config(root):
    write_examples(make_dataset(12, 6, seed=1), root / "train.jsonl")
    write_examples(make_dataset(6, 6, seed=2), root / "validation.jsonl")
    tree = {
        "data": {"train": "train.jsonl", "validation": "validation.jsonl", "num_candidates": 6},
        "selector": {"model": "tiny-llama", "top_k": 2, "lora": dict(TINY_LORA)},
        "generator": {"model": "tiny-llama", "max_new_tokens": 3, "lora": dict(TINY_LORA)},
        "warmup": {"generator_steps": 3, "selector_steps": 3, "batch_size": 4, "learning_rate": 3e-3},
        "dro": {"iterations": 2, "num_samples": 3, "batch_size": 4, "learning_rate": 3e-3, "patience": 5},
        "eval_batch_size": 6,
        "device": "cpu",
    }
    return tree


def _optimize(root, name, kill_at=None, kill_signal=None):
    import yaml

    tree = _config(root) | {"output_dir": str(root / name)}
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRO_KILL")} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["DRO_KILL_AT"] = kill_at
    if kill_signal:
        env["DRO_KILL_SIGNAL"] = kill_signal
    command = [sys.executable, "-m", "dro_plugins.cli.main", "optimize", str(config)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _result(run):
    report = json.loads((run / "report.json").read_text())
    strip = lambda line: {k: v for k, v in line.items() if k != "throughput"}  # noqa: E731 - wall-clock figures
    report["history"] = [strip(line) for line in report["history"]]
    metrics = [strip(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
    adapters = {f"{role}/{f}": (run / role / f).read_bytes() for role in ("selector", "generator") for f in ("adapter_model.safetensors", "adapter_config.json")}
    for name in adapters:  # the config names the base model, inside this run's own folder
        adapters[name] = adapters[name].replace(str(run).encode(), b"RUN")
    return report, metrics, adapters


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    done = _optimize(root, "straight")
    assert done.returncode == 0, done.stderr
    return root, _result(root / "straight")


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_killed_run_resumes_to_the_same_result(reference, kill_at):
    root, expected = reference
    name = "killed-" + kill_at.replace(":", "-")
    killed = _optimize(root, name, kill_at)
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.returncode, killed.stderr[-2000:])
    again = _optimize(root, name)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    report, metrics, adapters = _result(root / name)
    assert metrics == expected[1], kill_at
    assert report == expected[0], kill_at
    assert adapters == expected[2], kill_at
    assert len({line["iteration"] for line in metrics if line["stage"] == "dro"}) == len([l for l in metrics if l["stage"] == "dro"])
    assert _tensorboard_steps(root / name) == _tensorboard_steps(root / "straight"), kill_at  # each (tag, step) once


def _tensorboard_steps(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if not tag.startswith("throughput/")}


def test_sigterm_in_the_m_step_saves_the_batch_and_resumes_to_the_same_result(reference):
    """SIGTERM (what schedulers, docker stop and timeout send) behaves as Ctrl-C: checkpoint after the batch, one
    line saying how to resume, exit 130; the re-run reaches the uninterrupted result."""
    root, expected = reference
    stopped = _optimize(root, "sigterm", "m-step:3", kill_signal="SIGTERM")
    assert stopped.returncode == 130, (stopped.returncode, stopped.stderr[-2000:])
    output = " ".join((stopped.stdout + stopped.stderr).split())
    assert "SIGTERM: stopping after this batch" in output and "checkpoint saved" in output and "resume with" in output
    assert "Traceback" not in stopped.stdout + stopped.stderr
    again = _optimize(root, "sigterm")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout + again.stderr
    report, metrics, adapters = _result(root / "sigterm")
    assert (report, metrics, adapters) == expected
