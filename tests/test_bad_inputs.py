"""The bad-input catalogue: every mistake a user can make ends in one line with the right exit code, no traceback,
and no user file modified. Each case: (name, what to break, command, exit code, words the message must hold).

Not covered here: a read-only output folder (the tests run as root, which writes anywhere); a full disk (the same
`OSError` path as a read-only folder: ENOSPC is in the CLI's user-error set).
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dro_plugins.cli.main import app
from dro_plugins.data.examples import write_examples
from dro_plugins.data.synthetic import make_dataset
from tests.conftest import TINY_LORA

GOOD_LINE = {"id": "q1", "question": "who?", "answers": ["ann"], "ctxs": [{"id": str(i), "title": "", "text": f"text {i}"} for i in range(4)]}


def _base_tree(root: Path) -> dict:
    return {
        "data": {"train": "train.jsonl", "validation": "validation.jsonl", "num_candidates": 4},
        "selector": {"model": "tiny-llama", "top_k": 2, "lora": dict(TINY_LORA)},
        "generator": {"model": "tiny-llama", "max_new_tokens": 2, "lora": dict(TINY_LORA)},
        "dro": {"iterations": 1, "num_samples": 2, "batch_size": 4},
        "output_dir": str(root / "run"),
        "device": "cpu",
    }


def _set(tree: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return tree


DELETE = object()


def config_case(name, dotted, value, words, command="validate", code=2):
    return (name, {"config": (dotted, value)}, command, code, words)


def data_case(name, line, words, file="train.jsonl"):
    return (name, {"line": (file, line)}, "validate", 2, words)


CASES = [
    # ---- the config file
    ("config missing", {"raw_config": None}, "validate", 2, ["file not found"]),
    ("config not yaml", {"raw_config": b"data: [\n"}, "validate", 2, ["not valid YAML"]),
    ("config a list", {"raw_config": b"- a\n- b\n"}, "validate", 2, ["mapping"]),
    ("config not utf-8", {"raw_config": "data: {train: caf\u00e9}\n".encode("latin-1")}, "validate", 2, ["UTF-8"]),
    ("config alias bomb", {"raw_config": b"a: &a [x, x, x]\nb: &b [*a, *a, *a]\nseed: *b\n"}, "validate", 2, ["alias", "more than once"]),
    ("config nested 5000 deep", {"raw_config": b"seed: " + b"[" * 5000 + b"]" * 5000 + b"\n"}, "validate", 2, ["nested too deep"]),
    ("config integer of 5000 digits", {"raw_config": b"seed: " + b"9" * 5000 + b"\n"}, "validate", 2, ["not valid YAML", "digits"]),
    ("config is a folder", {"config_is_folder": True}, "validate", 2, ["is a folder, not a file"]),
    ("config is a dangling symlink", {"config_is_folder": "dangling"}, "validate", 2, ["symbolic link that leads nowhere"]),
    ("config with a section twice", {"raw_config": b"dro: {iterations: 1}\ndro: {iterations: 5}\n"}, "validate", 2, ["dro appears twice"]),
    config_case("modules_to_save names no module", "generator.lora.modules_to_save", ["embed_tokens", "no_such_head"], ["generator.lora.modules_to_save", "no_such_head"], "optimize"),
    ("factory calls sys.exit", {"pipeline_file": ("app.py", "import sys\ndef build():\n    sys.exit(0)\n", {"llama_index": "app.py:build"})}, "validate", 2, ["called sys.exit(0)"]),
    ("factory module calls sys.exit", {"pipeline_file": ("app.py", "import sys\nsys.exit(3)\n", {"llama_index": "app.py:build"})}, "validate", 2, ["called sys.exit(3)"]),
    config_case("seed 2**70", "seed", 2**70, ["seed", "less than"]),
    config_case("train file is a folder", "data.train", ".", ["is a folder, not a file"]),
    ("output_dir name too long", {"config": ("output_dir", "x" * 300)}, "optimize", 2, ["shorter"]),
    ("output_dir inside a symlink loop", {"output": "loop"}, "optimize", 2, ["symbolic link"]),
    config_case("unknown key, close", "dro.num_sample", 4, ["did you mean 'dro.num_samples'"]),
    config_case("unknown top-level key", "colour", 1, ["colour", "unknown key"]),
    config_case("num_samples 0", "dro.num_samples", 0, ["dro.num_samples", "greater than or equal to 1"]),
    config_case("negative temperature", "dro.temperature", -1, ["dro.temperature"]),
    config_case("learning rate text", "dro.learning_rate", "fast", ["dro.learning_rate"]),
    config_case("top_k over candidates", "selector.top_k", 9, ["selector.top_k (9) is larger than data.num_candidates"]),
    config_case("no data section", "data", DELETE, ["data: required"]),
    config_case("no generator model", "generator.model", DELETE, ["generator.model: required"]),
    config_case("documents without pipeline", "documents", "corpus.jsonl", ["documents", "needs a pipeline"]),
    config_case("two frameworks", "pipeline", {"haystack": "a.yaml", "llama_index": "b.py:f"}, ["exactly one"]),
    config_case("weighting unknown", "dro.weighting", "magic", ["dro.weighting"]),
    config_case("device unknown", "device", "tpu", ["device"]),
    config_case("token budget 0", "dro.max_tokens_per_microbatch", 0, ["dro.max_tokens_per_microbatch"]),
    config_case("lora rank 0", "selector.lora.rank", 0, ["selector.lora.rank"]),
    config_case("lora dropout 1.5", "generator.lora.dropout", 1.5, ["generator.lora.dropout"]),
    config_case("tiny heads", "selector.tiny.heads", 3, ["divisible"]),
    config_case("patience 0", "dro.patience", 0, ["dro.patience"]),
    config_case("learning rate infinite", "dro.learning_rate", float("inf"), ["dro.learning_rate", "finite"]),
    config_case("temperature infinite", "dro.temperature", float("inf"), ["dro.temperature", "finite"]),
    config_case("learning rate NaN", "warmup.learning_rate", float("nan"), ["warmup.learning_rate", "finite"]),
    config_case("learning rate negative", "generator.learning_rate", -1e-3, ["generator.learning_rate", "greater than 0"]),
    config_case("batch size negative", "dro.batch_size", -1, ["dro.batch_size"]),
    config_case("max_examples 0", "data.max_examples", 0, ["data.max_examples"]),
    config_case("eval batch 0", "eval_batch_size", 0, ["eval_batch_size"]),
    config_case("section is a number", "dro", 5, ["dro"]),
    config_case("gradient checkpointing text", "selector.gradient_checkpointing", "sometimes", ["selector.gradient_checkpointing"]),
    ("override without =", {"argv": ["--set", "dro.num_samples"]}, "validate", 2, ["KEY=VALUE"]),
    ("override into a value", {"argv": ["--set", "device.x=1"]}, "validate", 2, ["is a value, not a section"]),
    ("override bad value", {"argv": ["--set", "dro.iterations=many"]}, "validate", 2, ["dro.iterations"]),
    # ---- question files
    ("train file missing", {"config": ("data.train", "nowhere.jsonl")}, "validate", 2, ["nowhere.jsonl", "file not found"]),
    data_case("not json", "{not json", ["train.jsonl:2", "not valid JSON"]),
    data_case("answers a number", json.dumps(GOOD_LINE | {"answers": 7}), ["train.jsonl:2", "'answers' must be a list of strings"]),
    data_case("answers objects", json.dumps(GOOD_LINE | {"answers": [{"a": 1}]}), ["'answers' must be a list of strings"]),
    data_case("answers empty", json.dumps(GOOD_LINE | {"answers": []}), ["has no answers"]),
    data_case("ctxs null", json.dumps(GOOD_LINE | {"ctxs": None}), ["'ctxs' must be a list", "null"]),
    data_case("ctxs a string", json.dumps(GOOD_LINE | {"ctxs": "passages"}), ["'ctxs' must be a list"]),
    data_case("ctxs empty", json.dumps(GOOD_LINE | {"ctxs": []}), ["has no candidates"]),
    data_case("too few candidates", json.dumps(GOOD_LINE | {"ctxs": GOOD_LINE["ctxs"][:1]}), ["selector.top_k is 2"]),
    data_case("passage without text", json.dumps(GOOD_LINE | {"ctxs": [{"id": "1"}] * 4}), ["'text' field"]),
    data_case("passage text a list", json.dumps(GOOD_LINE | {"ctxs": [{"text": ["a"]}] * 4}), ["'text' must be a string"]),
    data_case("passage not an object", json.dumps(GOOD_LINE | {"ctxs": [1, 2, 3, 4]}), ["'text' field"]),
    data_case("question missing", json.dumps({k: v for k, v in GOOD_LINE.items() if k != "question"}), ["missing field 'question'"]),
    data_case("question null", json.dumps(GOOD_LINE | {"question": None}), ["'question' must be a string"]),
    data_case("id an object", json.dumps(GOOD_LINE | {"id": {"a": 1}}), ["'id' must be a string"]),
    data_case("line a list", json.dumps([1, 2]), ["expected a JSON object"]),
    data_case("has_answer text", json.dumps(GOOD_LINE | {"ctxs": [{"text": "t", "has_answer": "yes"}] * 4}), ["has_answer"]),
    data_case("question with a lone surrogate", json.dumps(GOOD_LINE | {"id": "q2", "question": "who \ud800?"}), ["train.jsonl:2", "invalid Unicode"]),
    data_case("duplicate question ids", json.dumps(GOOD_LINE), ["train.jsonl:2", "also on line 1"]),
    data_case("question too long", json.dumps(GOOD_LINE | {"id": "q2", "question": "x" * 5000}), ["train.jsonl:2", "data.max_question_chars"]),
    data_case("JSON nested too deep", '{"id": "q2", "question": ' + "[" * 100000 + "]" * 100000 + "}", ["train.jsonl:2", "nested too deep"]),
    data_case("JSON integer of 5000 digits", '{"id": "q2", "question": ' + "9" * 5000 + "}", ["train.jsonl:2", "digits"]),
    data_case("validation file bad", json.dumps(GOOD_LINE | {"answers": 7}), ["validation.jsonl:2", "'answers'"], file="validation.jsonl"),
    ("question file not utf-8", {"raw_line": ("train.jsonl", "{\"question\": \"caf\u00e9\"}".encode("latin-1"))}, "validate", 2, ["train.jsonl:2", "UTF-8"]),
    ("question file empty", {"empty": "validation.jsonl"}, "validate", 2, ["no questions found"]),
    # ---- models
    config_case("model folder missing", "selector.model", "./no-such-model", ["selector.model", "does not exist"], "optimize"),
    ("model folder without tokenizer", {"model": "no-tokenizer"}, "optimize", 2, ["holds no tokenizer"]),
    ("model weights truncated", {"model": "truncated"}, "optimize", 2, ["damaged or incomplete"]),
    config_case("lora matches nothing", "selector.lora.target_modules", ["nope"], ["selector.lora", "target_modules"], "optimize"),
    config_case("tiny tokenizer missing", "generator.tiny.tokenizer", "no-tokenizer-here", ["tokenizer folder", "does not exist"], "optimize"),
    config_case("hub id offline", "generator.model", "no-such-org/no-such-model", ["generator.model", "cannot load"], "optimize"),
    config_case("cuda without gpu", "device", "cuda", ["no CUDA GPU"], "optimize"),
    # ---- run folders
    ("output_dir is a file", {"output_file": True}, "optimize", 2, ["is a file, not a folder"]),
    ("output_dir is the current folder", {"output": "cwd"}, "optimize", 2, ["is or holds the current folder"]),
    ("output_dir is the current folder, --restart", {"output": "cwd", "argv": ["--restart"]}, "optimize", 2, ["is or holds the current folder"]),
    ("output_dir is the data folder, --restart", {"output": "data", "argv": ["--restart"]}, "optimize", 2, ["train.jsonl", "folder of its own"]),
    ("output_dir is the config's folder", {"output": "config"}, "optimize", 2, ["config.yaml", "folder of its own"]),
    ("output_dir holds an input's folder", {"output": "ancestor", "argv": ["--restart"]}, "optimize", 2, ["is or holds the folder of"]),
    ("output_dir holds a user's files", {"output": "foreign"}, "optimize", 2, ["no dro run wrote", "notes.txt"]),
    ("output_dir holds a user's files, --restart", {"output": "foreign", "argv": ["--restart"]}, "optimize", 2, ["no dro run wrote"]),
    ("output_dir below a file", {"output": "below-file"}, "optimize", 2, ["which is a file, not a folder"]),
    ("changed config on resume", {"finished_run": "changed"}, "optimize", 2, ["different config", "--restart"]),
    ("checkpoint damaged", {"finished_run": "damage-checkpoint"}, "optimize", 2, ["damaged", "--restart"]),
    ("checkpoint incomplete", {"finished_run": "incomplete-checkpoint"}, "optimize", 2, ["incomplete checkpoint", "--restart"]),
    ("evaluate not a run", {"evaluate": "not-a-run"}, "evaluate", 2, ["not a run folder"]),
    ("evaluate damaged adapter", {"evaluate": "damage-adapter"}, "evaluate", 2, ["cannot load this LoRA adapter"]),
    ("evaluate data missing", {"evaluate": "missing-data"}, "evaluate", 2, ["file not found"]),
    ("evaluate data not utf-8", {"evaluate": "latin-1-data"}, "evaluate", 2, ["UTF-8"]),
    ("evaluate damaged run config", {"evaluate": "damage-config"}, "evaluate", 2, ["config.yaml"]),
    ("evaluate a received run with a factory", {"evaluate": "factory"}, "evaluate", 2, ["asks to run code", "evil.py:build", "--trust-run-code"]),
    ("inspect a received run with a factory", {"evaluate": "factory", "command": "inspect"}, "inspect", 2, ["asks to run code", "--trust-run-code"]),
    ("evaluate a received run trusting remote code", {"evaluate": "remote-code"}, "evaluate", 2, ["selector.trust_remote_code", "--trust-run-code"]),
    ("evaluate --device tpu", {"evaluate": "device"}, "evaluate", 2, ["device"]),
    ("report while metrics.jsonl ends in a torn line", {"evaluate": "torn-metrics", "command": "report"}, "report", 0, ["best by"]),
    ("report with a truncated report.json", {"evaluate": "torn-report", "command": "report"}, "report", 0, ["no report.json yet"]),
    ("report with a damaged metrics line", {"evaluate": "damaged-metrics", "command": "report"}, "report", 2, ["metrics.jsonl:1", "damaged line"]),
    ("inspect with a stray samples file", {"evaluate": "stray-samples", "command": "inspect"}, "inspect", 0, ["q"]),
    # ---- pipelines
    config_case("haystack yaml missing", "pipeline", {"haystack": "missing.yaml"}, ["missing.yaml", "file not found"]),
    ("haystack yaml broken", {"pipeline_file": ("rag.yaml", "components: [1, 2]\n", {"haystack": "rag.yaml"})}, "validate", 2, ["refuses to load"]),
    ("factory raises", {"pipeline_file": ("app.py", "def build():\n    raise RuntimeError('no index')\n", {"llama_index": "app.py:build"})}, "validate", 2, ["your factory", "raised RuntimeError: no index"]),
    ("factory syntax error", {"pipeline_file": ("app.py", "def build(:\n", {"llama_index": "app.py:build"})}, "validate", 2, ["SyntaxError", "app.py:1"]),
    ("factory import missing", {"pipeline_file": ("app.py", "import no_such_module_q\n", {"llama_index": "app.py:build"})}, "validate", 2, ["No module named 'no_such_module_q'"]),
    ("factory spec without colon", {"config": ("pipeline", {"llama_index": "app.py"})}, "validate", 2, ["not 'file.py:function'"]),
    # ---- tiny-model
    ("tiny-model into a full folder", {"tiny_model": "full"}, "tiny-model", 2, ["not empty"]),
    ("tiny-model tokenizer missing", {"tiny_model": "no-tokenizer"}, "tiny-model", 2, ["tokenizer folder"]),
    ("tiny-model seed 2**64", {"tiny_model": "seed"}, "tiny-model", 2, ["--seed"]),
    ("evaluate --max-examples 0", {"evaluate": "max0"}, "evaluate", 2, ["--max-examples"]),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (config, data, run folder) to damage copies of."""
    root = tmp_path_factory.mktemp("finished")
    write_examples(make_dataset(4, 4, seed=1), root / "train.jsonl")
    write_examples(make_dataset(4, 4, seed=2), root / "validation.jsonl")
    (root / "config.yaml").write_text(yaml.safe_dump(_base_tree(root)))
    result = CliRunner().invoke(app, ["optimize", str(root / "config.yaml")])
    assert result.exit_code == 0, result.output
    return root


def _hashes(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file() and "run" not in p.parts}


def _prepare(case: dict, root: Path, finished: Path, tiny_model_dir: Path) -> list[str]:
    """Lay out the case's files under ``root``; return the command's arguments after the command name."""
    write_examples(make_dataset(4, 4, seed=1), root / "train.jsonl")
    write_examples(make_dataset(4, 4, seed=2), root / "validation.jsonl")
    tree = _base_tree(root)
    config = root / "config.yaml"
    argv = [str(config)]
    if "config" in case:
        _set(tree, *case["config"])
    if "line" in case:
        file, line = case["line"]
        (root / file).write_text(json.dumps(GOOD_LINE) + "\n" + line + "\n")
    if "raw_line" in case:
        file, raw = case["raw_line"]
        (root / file).write_bytes((json.dumps(GOOD_LINE) + "\n").encode() + raw + b"\n")
    if "empty" in case:
        (root / case["empty"]).write_text("\n")
    if "model" in case:
        folder = root / "model"
        shutil.copytree(tiny_model_dir, folder)
        if case["model"] == "no-tokenizer":
            for file in folder.glob("tokenizer*"):
                file.unlink()
        else:
            weights = folder / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        tree["selector"]["model"] = str(folder)
    if "output" in case:
        kind = case["output"]
        tree["output_dir"] = {"cwd": "", "data": str(root / "inputs"), "config": str(root / "conf"), "ancestor": str(root / "inputs"),
                              "foreign": str(root / "notes"), "below-file": str(root / "afile" / "out"),
                              "loop": str(root / "loop" / "out")}[kind]
        if kind == "loop":
            (root / "loop").symlink_to(root / "loop")
        if kind in ("data", "ancestor"):
            data = root / "inputs" / ("data" if kind == "ancestor" else "")
            data.mkdir(parents=True)
            for name in ("train.jsonl", "validation.jsonl"):
                (root / name).rename(data / name)
                tree["data"][name.split(".")[0]] = str(data / name)
        if kind == "config":
            (root / "conf").mkdir()
            config = root / "conf" / "config.yaml"
            argv = [str(config)]
            tree["data"] |= {"train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl")}
        if kind == "foreign":
            (root / "notes").mkdir()
            (root / "notes" / "notes.txt").write_text("mine")
        if kind == "below-file":
            (root / "afile").write_text("a file")
    if "output_file" in case:
        (root / "run").write_text("not a folder")
    if "pipeline_file" in case:
        name, body, pipeline = case["pipeline_file"]
        (root / name).write_text(body)
        tree["pipeline"] = pipeline
    if "finished_run" in case:
        config.write_text(yaml.safe_dump(tree))
        assert CliRunner().invoke(app, ["optimize", str(config)]).exit_code == 0
        kind = case["finished_run"]
        if kind == "changed":
            argv += ["--set", "dro.temperature=0.5"]  # a learning rate may change on resume; the sampling may not
        elif kind == "damage-checkpoint":
            state = root / "run" / "checkpoint" / "state.json"
            state.write_text(state.read_text()[:40])
        else:
            (root / "run" / "checkpoint" / "COMPLETE").unlink()
        argv += ["--set", "dro.iterations=2"]  # more iterations: a resume, not a finished run
    if "evaluate" in case:
        shutil.copytree(finished / "run", root / "run")
        kind = case["evaluate"]
        data = root / "validation.jsonl"
        run = root / "run"
        if kind == "not-a-run":
            run = root
        elif kind == "damage-adapter":
            weights = run / "selector" / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:64])
        elif kind == "missing-data":
            data = root / "missing.jsonl"
        elif kind == "latin-1-data":
            data.write_bytes("{\"question\": \"caf\u00e9\"}\n".encode("latin-1"))
        elif kind in ("factory", "remote-code"):
            # the factory would leave a file behind: the hash check after the command sees any new file
            (root / "evil.py").write_text("from pathlib import Path\ndef build():\n    Path(__file__).with_name('ran.txt').write_text('x')\n")
            saved = yaml.safe_load((run / "config.yaml").read_text())
            if kind == "factory":
                saved["pipeline"] = {"llama_index": f"{root / 'evil.py'}:build"}
            else:
                saved["selector"]["trust_remote_code"] = True
            (run / "config.yaml").write_text(yaml.safe_dump(saved))
        elif kind == "device":
            return [str(run), "--data", str(data), "--device", "tpu"]
        elif kind in ("torn-metrics", "damaged-metrics"):
            metrics = run / "metrics.jsonl"
            lines = metrics.read_text().splitlines()
            if kind == "torn-metrics":
                metrics.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
            else:
                metrics.write_text("\n".join([lines[0][:30], *lines[1:]]) + "\n")
        elif kind == "torn-report":
            (run / "report.json").write_text((run / "report.json").read_text()[:50])
        elif kind == "stray-samples":
            (run / "samples" / "iteration_final.jsonl").write_text("{}\n")
        elif kind == "max0":
            return [str(run), "--data", str(data), "--max-examples", "0"]
        elif kind == "damage-config":
            (run / "config.yaml").write_text("data: {train: x.jsonl\n")
        if case.get("command") == "report":
            return [str(run)]
        if case.get("command") == "inspect":
            question = json.loads((run / "samples" / "iteration_001.jsonl").read_text().splitlines()[0])["id"]
            return [str(run), "--question", question]
        return [str(run), "--data", str(data)]
    if "tiny_model" in case:
        folder = root / "tiny"
        if case["tiny_model"] == "seed":
            return [str(folder), "--seed", str(2**64)]
        if case["tiny_model"] == "full":
            folder.mkdir()
            (folder / "keep.txt").write_text("mine")
            return [str(folder)]
        return [str(folder), "--tokenizer", str(root / "nowhere")]
    if case.get("config_is_folder") == "dangling":
        (root / "link.yaml").symlink_to(root / "nowhere.yaml")
        return [str(root / "link.yaml")]
    if "config_is_folder" in case:
        return [str(root)]
    raw = case.get("raw_config", yaml.safe_dump(tree).encode())
    if raw is not None:
        config.write_bytes(raw)
    return argv + case.get("argv", [])


@pytest.mark.parametrize("name, case, command, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(name, case, command, code, words, tmp_path, finished_run, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the current folder holds the user's config and data, as when a user runs dro there
    argv = _prepare(case, tmp_path, finished_run, tiny_model_dir)
    before = _hashes(tmp_path)
    result = CliRunner().invoke(app, [command, *argv])
    output = " ".join(result.output.split())
    assert result.exit_code == code, (name, result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    for word in words:
        assert " ".join(word.split()).lower() in output.lower(), (name, word, result.output)
    assert _hashes(tmp_path) == before, f"{name}: a user file changed"


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60
