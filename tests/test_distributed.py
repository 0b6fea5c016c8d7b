"""Several processes (torchrun, gloo on CPU) give the one-process result: shards, gradients, samples, adapters."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dro_plugins.data.examples import write_examples
from dro_plugins.modeling.batching import MAX_PADDING, Shape, plan_microbatches, run_in_microbatches
from dro_plugins.distributed.runtime import Runtime, shard_range
from dro_plugins.data.synthetic import make_dataset
from dro_plugins.reporting.throughput import WorkMeter, combine_meters
from tests.conftest import tiny_run_config

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def test_shards_are_contiguous_balanced_and_in_order():
    assert [list(shard_range(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [list(shard_range(2, r, 3)) for r in range(3)] == [[0], [1], []]  # a process may get nothing
    assert [list(shard_range(5, 0, 1))] == [[0, 1, 2, 3, 4]]


def _lockstep_runtime(rank: int, world_size: int) -> Runtime:
    """A Runtime that believes it is process ``rank`` of ``world_size`` with sharded weights (no process group)."""
    return Runtime(SimpleNamespace(process_index=rank, num_processes=world_size), fsdp=SimpleNamespace())


def test_lockstep_shares_are_padded_to_the_largest_with_the_last_item():
    items = [f"q{i}" for i in range(10)]
    shares = [_lockstep_runtime(rank, 3).share(items) for rank in range(3)]
    assert shares == [(["q0", "q1", "q2", "q3"], 4), (["q4", "q5", "q6", "q9"], 3), (["q7", "q8", "q9", "q9"], 3)]
    # dropping the padding and concatenating in process order gives the items back
    assert [item for share, own in shares for item in share[:own]] == items
    assert _lockstep_runtime(2, 3).share(["q0", "q1"]) == (["q1"], 0)  # nothing of its own: it still runs a batch
    assert Runtime().share(items) == (items, 10)


def test_padded_microbatch_calls_repeat_the_last_and_keep_the_results():
    shapes = [Shape(1, length) for length in (5, 9, 4, 8)]
    calls = []

    def run(micro):
        calls.append(list(micro))
        return [f"r{i}" for i in micro]

    runtime = _lockstep_runtime(0, 2)
    runtime.calls = lambda n: n + 2  # the busiest process needs two more (the all-reduce of Runtime.calls)
    results = run_in_microbatches(shapes, 18, run, lockstep=runtime.lockstep_plan)
    assert results == ["r0", "r1", "r2", "r3"]
    assert len(calls) == len(plan_microbatches(shapes, 18, MAX_PADDING)) + 2 and calls[-1] == calls[-2] == calls[-3]


def test_a_process_without_micro_batches_still_makes_one_padding_call():
    runtime = _lockstep_runtime(1, 2)
    runtime.calls = lambda n: max(n, 3)
    assert runtime.lockstep_plan([], "filler") == [("filler", True)] * 3
    assert runtime.lockstep_plan([[0], [1]], [1]) == [([0], False), ([1], False), ([1], True)]
    assert Runtime().lockstep_plan([], None) == [(None, True)]  # one process: one zero-loss call joins nothing


class _Blocks(torch.nn.Module):
    """A stand-in causal LM: ``get_base_model`` like a peft model, two blocks, a head."""

    _no_split_modules = ["Linear"]

    def __init__(self, head_dtype=torch.float32):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
        self.head = torch.nn.Embedding(3, 2, dtype=head_dtype)

    def get_base_model(self):
        return self


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (torch.nn.Linear(2, 2), "LoRA adapters, not Linear.*DDP accelerate config"),
        (type("NoBlocks", (_Blocks,), {"_no_split_modules": None})(), "no transformer block.*fsdp_transformer_layer_cls_to_wrap"),
        (_Blocks(head_dtype=torch.bfloat16), "bfloat16 and float32.*drop lora.modules_to_save"),
    ],
)
def test_a_model_fsdp_cannot_shard_is_refused_in_one_line(model, message):
    from dro_plugins.errors import DROError

    plugin = SimpleNamespace(transformer_cls_names_to_wrap=None, reshard_after_forward=True, cpu_offload=None)
    with pytest.raises(DROError, match=message):
        Runtime(SimpleNamespace(), fsdp=plugin).prepare(model)


def test_meters_of_processes_add_up():
    combined = combine_meters([
        {"sampling": WorkMeter(seconds=2.0, questions=5, tokens=100, peak_memory_gib=3.0)},
        {"sampling": WorkMeter(seconds=3.0, questions=4, tokens=80, peak_memory_gib=2.5)},
    ])
    # side by side: the phase lasted as long as the slower process, and did both processes' work
    assert combined["sampling"] == WorkMeter(seconds=3.0, questions=9, tokens=180, peak_memory_gib=3.0)
    assert combined["sampling"].summary()["questions_per_s"] == 3.0


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "asks for DEEPSPEED.*MULTI_GPU.*fsdp_version: 2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1.*fsdp_version: 2"),
    ],
)
def test_an_accelerate_config_dro_cannot_run_is_refused_in_one_line(monkeypatch, environment, message):
    """DeepSpeed and FSDP1 are refused before any process group starts, with the config line that fixes it."""
    from dro_plugins.errors import DROError
    from dro_plugins.distributed.runtime import Runtime

    monkeypatch.setenv("WORLD_SIZE", "2")
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(DROError, match=message):
        Runtime.from_environment("cpu")


def _config(tmp_path, name: str, **sections) -> str:
    train = write_examples(make_dataset(10, 6, seed=3), tmp_path / "train.jsonl")  # 10: uneven over 3 processes
    validation = write_examples(make_dataset(5, 6, seed=4), tmp_path / "validation.jsonl")
    tree = tiny_run_config(
        str(train), str(validation), str(tmp_path / name), data={"num_candidates": 6},
        dro={"iterations": 2, "num_samples": 3, "batch_size": 4, "patience": 5},
        warmup={"generator_steps": 2, "selector_steps": 2, "batch_size": 4}, eval_batch_size=3, report_to="none", **sections,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(tree))
    return str(path)


def _optimize(config: str, processes: int, **env) -> subprocess.CompletedProcess:
    launch = [TORCHRUN, f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    command = [*launch, "-m", "dro_plugins.cli.main", "optimize", config]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _samples(run, iteration):
    return [json.loads(line) for line in (run / "samples" / f"iteration_{iteration:03d}.jsonl").read_text().splitlines()]


ENGINES = {"ddp": {}, "fsdp": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}}  # as `accelerate launch` sets them


def _assert_same_result(run, one):
    """``run`` reached the one-process run's samples, adapters and metrics."""
    for iteration in (1, 2):  # same questions, same order, same draws (seeded per question, never per rank)
        mine, theirs = _samples(run, iteration), _samples(one, iteration)
        assert [s["id"] for s in mine] == [s["id"] for s in theirs]
        assert [s["permutations"] for s in mine] == [s["permutations"] for s in theirs]
        for a, b in zip(mine, theirs):  # float sums differ with batch neighbours, in the 7th digit
            for key in ("selector_log_probs", "log_likelihoods", "weights"):
                assert a[key] == pytest.approx(b[key], abs=1e-5)
    for role in ("selector", "generator"):
        a, b = load_file(run / role / "adapter_model.safetensors"), load_file(one / role / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:  # AdamW's normalised step magnifies float-order noise where a gradient is ~0
            torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=1e-4)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines, reference, strict=True):
        assert (a["em"], a["f1"], a["recall"], a["attribution"]) == (b["em"], b["f1"], b["recall"], b["attribution"])
        assert a["answer_log_likelihood"] == pytest.approx(b["answer_log_likelihood"], abs=1e-4)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_process")
    result = _optimize(_config(folder, "p1"), 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "p1"


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("engine", ENGINES)
def test_two_and_three_processes_reach_the_one_process_result(tmp_path, one_process_run, engine):
    """DDP, and FSDP2 with its weights sharded over the processes (in lockstep, padded shares)."""
    for processes in (2, 3):  # 10 training questions: uneven over 3 processes
        name = f"p{processes}"
        result = _optimize(_config(tmp_path, name), processes, **ENGINES[engine])
        assert result.returncode == 0, result.stderr[-3000:]
        _assert_same_result(tmp_path / name, one_process_run)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        # throughput counts every process's questions once (never a lockstep process's padding)
        sampling = lines[-1]["throughput"]["sampling"]
        assert sampling["questions_per_s"] * sampling["seconds"] == pytest.approx(10, rel=0.01)


GRADIENTS = textwrap.dedent(
    """
    import sys, torch
    from dro_plugins.config import RunConfig, load_config
    from dro_plugins.data.examples import load_run_data
    from dro_plugins.build import build_models
    from dro_plugins.distributed.runtime import Runtime
    from dro_plugins.distributed.fsdp import gathered
    from dro_plugins.training.trainer import DROTrainer

    config = load_config(sys.argv[1])
    runtime = Runtime.from_environment("cpu")
    with runtime.main_first():
        selector, generator = build_models(config, config.output_dir)
    train, validation = load_run_data(config)
    trainer = DROTrainer(config, selector, generator, train, validation, config.output_dir, runtime=runtime)
    batch = train[:5]  # 5 questions: shares 3 and 2
    permutations = torch.tensor([[[0, 1], [2, 3], [4, 5]]] * 5)
    weights = torch.tensor([[0.5, 0.3, 0.2]] * 5)
    grads = {}
    for role in trainer.units:  # selector, generator, and the retriever with retriever.train
        trainer.step(role, batch, permutations, weights, trainer.optimizers[role])
        grads[role] = {n: gathered(p.grad).clone() for n, p in trainer.units[role].named_parameters() if p.grad is not None}
    if runtime.is_main:
        torch.save(grads, sys.argv[2])
    """
)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize(("engine", "atol", "roles"), [
    ("ddp", 1e-6, ("selector", "generator")), ("fsdp", 2e-5, ("selector", "generator")),
    ("ddp", 1e-5, ("selector", "generator", "retriever")),  # three units: the query tower averaged by DDP too
])
def test_gradients_after_one_step_in_two_processes_equal_the_one_process_gradients(tmp_path, engine, atol, roles):
    """FSDP2 scores a micro-batch's answers in one padded forward (every process runs as many), one process in forwards
    grouped by length: the padding moves sums in the 6th digit, hence its wider tolerance."""
    sections = {"retriever": {"train": True, "max_seq_length": 32}} if "retriever" in roles else {}
    script = tmp_path / "grads.py"
    script.write_text(GRADIENTS)
    grads = {}
    for processes in (1, 2):
        out = tmp_path / f"grads{processes}.pt"
        launch = [TORCHRUN, f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
        env = {**os.environ, **(ENGINES[engine] if processes > 1 else {})}
        config = _config(tmp_path, f"g{processes}", **sections)
        result = subprocess.run([*launch, str(script), config, str(out)], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        grads[processes] = torch.load(out)
    assert tuple(grads[1]) == roles
    for role in roles:
        one, two = grads[1][role], grads[2][role]
        assert one.keys() == two.keys() and len(one) > 0
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=atol, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_process_ends_the_run_and_a_rerun_with_another_count_resumes(tmp_path, one_process_run, engine):
    """The resumed run reaches the one-process result: with FSDP2 the checkpoint's full adapters and optimizer states
    are sharded again over the new count."""
    config = _config(tmp_path, "killed")
    died = _optimize(config, 2, DRO_KILL_AT="m-step", DRO_KILL_RANK="1", **ENGINES[engine])  # rank 1 SIGKILLed in the M-step
    assert died.returncode != 0  # the survivor errors out (or torchrun stops it) instead of waiting forever
    resumed = _optimize(config, 3, **ENGINES[engine])  # shards are recomputed from the count, M-step batches are global
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "killed" / "report.json").read_text())["stopped"] == "completed"
    _assert_same_result(tmp_path / "killed", one_process_run)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_sigterm_on_one_process_stops_both_after_the_same_step_and_the_rerun_resumes(tmp_path, one_process_run):
    """SIGTERM reaching one process (a launcher's reaches each at a slightly different moment) stops every process
    after the same M-step batch: a checkpoint is saved, none hangs, and the re-run reaches the one-process result."""
    config = _config(tmp_path, "sigterm")
    stopped = _optimize(config, 2, DRO_KILL_AT="m-step:2", DRO_KILL_RANK="1", DRO_KILL_SIGNAL="SIGTERM")
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and "checkpoint saved" in output, output[-3000:]
    assert "Traceback" not in stopped.stdout
    resumed = _optimize(config, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at iteration 1, phase m-step" in resumed.stdout + resumed.stderr
    _assert_same_result(tmp_path / "sigterm", one_process_run)
